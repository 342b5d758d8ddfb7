"""The fused kernels multiply straight from stored bits and agree with decode + BLAS."""

import numpy as np
import pytest

from swtool import kernels
from swtool.checkpoint.safetensors import decode_float32, encode_float32


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("n_rows", [1, 7, 64])
@pytest.mark.parametrize("n_out", [300, 301, 303])  # the kernel works on 4 weight rows at a time
def test_fused_matmul_matches_decode_then_blas(dtype, n_rows, n_out):
    rng = np.random.default_rng(n_rows)
    weight = rng.standard_normal((n_out, 257)).astype(np.float32) * 0.05
    weight[17, 33] = 40.0  # a super-weight-sized element
    stored = encode_float32(weight, dtype).reshape(weight.shape)
    x = rng.standard_normal((n_rows, 257)).astype(np.float32)
    x[:, 33] = 900.0  # and a massive input channel
    expected = x.astype(np.float64) @ decode_float32(stored, dtype).astype(np.float64).T
    got = kernels.matmul_stored(x, stored, dtype)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("n_rows", [1, 7, 64])
@pytest.mark.parametrize("columns", [slice(None), slice(200, 531)])
def test_fused_matmul_of_a_weight_stored_transposed(dtype, n_rows, columns):
    """GPT-2's Conv1D keeps W as S = W.T [in, out]: the kernels multiply by it from its bits, column blocks too."""
    rng = np.random.default_rng(n_rows)
    stored_weight = rng.standard_normal((257, 600)).astype(np.float32) * 0.05  # S [in, out]
    stored_weight[33, 300] = 40.0
    stored = encode_float32(stored_weight, dtype).reshape(stored_weight.shape)
    view = stored[:, columns].T  # W's rows `columns`, a non-contiguous view over the stored bits
    assert kernels.is_transposed_view(view)
    x = rng.standard_normal((n_rows, 257)).astype(np.float32)
    x[:, 33] = 900.0
    expected = x.astype(np.float64) @ decode_float32(stored, dtype).astype(np.float64)[:, columns]
    got = kernels.matmul_stored(x, view, dtype)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("transposed", [False, True])
def test_every_f16_bit_pattern_decodes_like_numpy(transposed):
    """All 65536 half-precision patterns (infinities and subnormals too) reach the product exactly as
    numpy decodes them; NaNs stay NaN. out[0, r] = 1 * W[r, 0] + 0 * W[r, 1] = W[r, 0]."""
    patterns = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    weight = np.stack([patterns, np.zeros_like(patterns)], axis=1)  # W [65536, 2]: column 1 is zero
    stored = np.ascontiguousarray(weight.T).T if transposed else weight  # S = W.T stored [in, out], or W
    assert kernels.is_transposed_view(stored) == transposed
    got = kernels.matmul_stored(np.array([[1.0, 0.0]], np.float32), stored, "F16")[0]
    np.testing.assert_array_equal(got, patterns.astype(np.float32))  # exact; NaN == NaN here; -0 sums to +0


def test_every_bf16_exponent_decodes_exactly():
    """bf16 is the top half of a float32: every exponent, with a sign and mantissa bits, multiplies exactly."""
    patterns = (np.arange(0, 65536, 97, dtype=np.uint32)).astype(np.uint16)
    got = kernels.matmul_stored(np.ones((1, 1), np.float32), patterns[:, None], "BF16")[0]
    np.testing.assert_array_equal(got, (patterns.astype(np.uint32) << 16).view(np.float32))


@pytest.mark.parametrize("chosen, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_workers_sleep_between_kernels_unless_the_user_chose(chosen, expected):
    """swtool.jit sets OMP_WAIT_POLICY=PASSIVE before numba starts its OpenMP workers (they sleep
    between parallel regions instead of spinning); a policy set by the user is kept."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER")}
    if chosen:
        env["OMP_WAIT_POLICY"] = chosen
    code = ("import os, numpy as np, numba; from swtool import kernels; "
            "kernels.matmul_stored(np.ones((4, 64), np.float32), np.ones((8, 64), np.uint16), 'BF16'); "
            "print(numba.threading_layer(), os.environ['OMP_WAIT_POLICY'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["omp", expected]

"""The fused kernels multiply straight from stored bits and agree with decode + BLAS."""

import os

import numpy as np
import pytest

from swtool import kernels
from swtool.kernels import common, dense
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
    """swtool.kernels.jit sets OMP_WAIT_POLICY=PASSIVE before numba starts its OpenMP workers (they sleep
    between parallel regions instead of spinning); a policy set by the user is kept."""
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


# --- bf16 products: bf16_pairs (AVX-512 CPUs) and dense.py's loop (every other CPU) ---------
# Both kernels run the same tests. Without AVX-512 the bf16_pairs cases fail, so a runner without it cannot
# pass having tested nothing of the kernel AVX-512 CPUs use, unless SWTOOL_ALLOW_NO_AVX512=1 accepts that:
# then they are skipped with that reason, and the run's header says which kernels ran (tests/conftest.py).

ALLOW_NO_AVX512 = "SWTOOL_ALLOW_NO_AVX512"


def require_pairs_kernel():
    """Return if bf16_pairs runs here; else skip (SWTOOL_ALLOW_NO_AVX512=1) or fail, saying why."""
    if kernels.pairs_available():
        return
    if os.environ.get(ALLOW_NO_AVX512) == "1":
        pytest.skip(f"no AVX-512 for numba here: bf16_pairs untested ({ALLOW_NO_AVX512}=1), dense.py's loop tested")
    pytest.fail(f"no AVX-512 for numba here (CPU or NUMBA_CPU_NAME): bf16_pairs, the bf16 kernel of AVX-512 CPUs, "
                f"cannot be tested; set {ALLOW_NO_AVX512}=1 to accept testing only dense.py's loop")


@pytest.fixture(params=["bf16_pairs", "dense"])
def bf16_product(request, monkeypatch):
    """x @ W.T from bf16 bits through kernels.matmul_stored, on the kernel of the case: bf16_pairs, or
    dense.py's loop, chosen as a CPU without AVX-512 chooses it (pairs_available() False).
    Each call checks that the kernel of the case is the one that ran."""
    from swtool.kernels import bf16_pairs

    if request.param == "bf16_pairs":
        require_pairs_kernel()
    else:
        monkeypatch.setattr(kernels, "pairs_available", lambda: False)
    pairs_calls = []
    real_pairs = bf16_pairs.matmul
    monkeypatch.setattr(bf16_pairs, "matmul", lambda x, stored: pairs_calls.append(x.shape) or real_pairs(x, stored))

    def product(x, stored):
        pairs_calls.clear()
        out = kernels.matmul_stored(x, stored, "BF16")
        assert bool(pairs_calls) == (request.param == "bf16_pairs"), f"matmul_stored did not run {request.param}"
        return out

    product.kernel = request.param
    return product


@pytest.mark.parametrize("allowed, outcome", [(None, pytest.fail.Exception), ("1", pytest.skip.Exception)])
def test_without_avx512_the_pairs_cases_fail_unless_allowed(monkeypatch, allowed, outcome):
    monkeypatch.setattr(kernels, "pairs_available", lambda: False)
    monkeypatch.delenv(ALLOW_NO_AVX512, raising=False)
    if allowed:
        monkeypatch.setenv(ALLOW_NO_AVX512, allowed)
    with pytest.raises(outcome, match="bf16_pairs"):
        require_pairs_kernel()


@pytest.mark.parametrize("n_columns", [1, 2, 31, 32, 33, 64, 95, 257, 4113])
@pytest.mark.parametrize("n_rows", [1, 4, 5, 7, 10, 20])
def test_bf16_kernel_matches_float64_at_every_width(bf16_product, n_columns, n_rows):
    """Whole vectors of 32 columns and the columns past the last one (odd widths too), with the
    matrix starting 2 bytes past a 4-byte boundary (safetensors only aligns bf16 data to 2)."""
    rng = np.random.default_rng(n_columns)
    weight = rng.standard_normal((37, n_columns)).astype(np.float32) * 0.05
    weight[5, n_columns // 2] = 40.0
    bits = encode_float32(weight, "BF16").reshape(weight.shape)
    buffer = np.zeros(bits.size + 3, dtype=np.uint16)
    stored = buffer[1:1 + bits.size].reshape(bits.shape)  # 2 bytes past the buffer's alignment
    stored[...] = bits
    x = rng.standard_normal((n_rows, n_columns)).astype(np.float32)
    x[:, n_columns // 2] = 900.0
    expected = x.astype(np.float64) @ decode_float32(bits, "BF16").astype(np.float64).T
    got = bf16_product(x, stored)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    if bf16_product.kernel == "bf16_pairs":  # and bf16_pairs agrees with the loop it replaces
        portable = np.empty((common.padded_rows(x).shape[0], 37), np.float32)
        dense.matmul_rows(common.padded_rows(x), stored, portable)
        np.testing.assert_allclose(got, portable[:n_rows], rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("column", [0, 1, 30, 31])
def test_bf16_kernel_decodes_every_bf16_exponent_in_both_halves_of_a_pair(bf16_product, column):
    """A pair's even weight (shifted up) and odd weight (its low half cleared) are
    both exact, in every lane: out[0, r] = W[r, column] for patterns across all exponents."""
    patterns = np.arange(0, 65536, 97, dtype=np.uint32).astype(np.uint16)
    patterns = patterns[(patterns & 0x7F80) != 0x7F80]  # finite: 0 * inf would be NaN
    stored = np.zeros((patterns.size, 64), dtype=np.uint16)
    stored[:, column] = patterns
    stored[:, column ^ 1] = 0x4000  # the other half of the pair: 2.0, times a zero input
    x = np.zeros((1, 64), np.float32)
    x[0, column] = 1.0
    got = bf16_product(x, stored)[0]
    np.testing.assert_array_equal(got, (patterns.astype(np.uint32) << 16).view(np.float32))


def test_pairs_kernel_is_off_when_numba_targets_a_generic_cpu(tmp_path):
    """NUMBA_CPU_NAME=generic (a portable cache) gets dense.py's loop, not the AVX-512 kernel,
    with the same result."""
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    code = ("import numpy as np; from swtool import kernels; "
            "w = (np.arange(8 * 64, dtype=np.uint32) % 7 + 0x3f80).astype(np.uint16).reshape(8, 64); "
            "y = kernels.matmul_stored(np.ones((3, 64), np.float32), w, 'BF16'); "
            "print(kernels.pairs_available(), float(y.sum()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    available, total = result.stdout.split()
    assert available == "False"
    w = (np.arange(8 * 64, dtype=np.uint32) % 7 + 0x3F80).astype(np.uint16).reshape(8, 64)
    assert float(total) == pytest.approx(3 * float((w.astype(np.uint32) << 16).view(np.float32).sum()), rel=1e-6)


@pytest.mark.parametrize("path", ["rows BF16", "rows F16", "rows F32", "columns F32", "pairs BF16", "statistics F32",
                                  "blocks Q4_0", "dequantize Q8_0", "dequantize F16"])
def test_writable_and_read_only_weights_reach_the_kernels_read_only(monkeypatch, path):
    """A weight mapped from a file is read-only, one built in memory writable; Numba compiles a kernel once per
    argument type, so both reach the kernels read-only: one compiled specialization (and cache entry), not two."""
    import numba

    from swtool import quant
    from swtool.kernels import bf16_pairs, gguf_blocks
    from swtool.quant import blocks, floats

    kind, dtype = path.split()
    seen = []

    def spy(module, name, weight_at):
        """The kernel records the type it is given, in place of running (and compiling) it."""
        def call(*args):
            seen.append(numba.typeof(args[weight_at]))
            return 0.0  # what the statistics kernels return; the products' wrappers read their `out`
        monkeypatch.setattr(module, name, call)

    weight = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    x = np.ones((3, 256), np.float32)
    if kind in ("rows", "columns", "pairs", "statistics"):
        stored = encode_float32(weight if kind != "columns" else weight.T.copy(), dtype)
        stored = stored.reshape(weight.shape if kind != "columns" else weight.T.shape)
        if kind == "pairs":
            require_pairs_kernel()
        else:
            monkeypatch.setattr(kernels, "pairs_available", lambda: False)  # bf16 through dense.py's loop
        names = {"rows": [(dense, "matmul_rows", 1)], "columns": [(dense, "matmul_columns", 1)],
                 "pairs": [(bf16_pairs, "matmul", 1)],
                 "statistics": [(dense, "sum_of_squares", 0), (dense, "count_larger", 0)]}[kind]
        for module, name, at in names:
            spy(module, name, at)

        def run(array):
            if kind == "statistics":
                kernels.sum_of_squares(array, dtype), kernels.count_larger(array, dtype, 0.5)
            else:
                kernels.matmul_stored(x, array.T if kind == "columns" else array, dtype)
    else:
        # any bytes of the right length: the kernels are not run
        stored = np.random.default_rng(1).integers(0, 256, (8, quant.row_bytes(dtype, 256)), dtype=np.uint8)
        if kind == "blocks":
            spy(gguf_blocks, "matmul_blocks_rows", 1)
            run = lambda array: kernels.matmul_stored(x, array, dtype)  # noqa: E731
        else:
            spy(blocks, "dequantize_rows", 0)
            spy(floats, "dequantize_f16", 0)
            run = lambda array: quant.dequantize(array, dtype, weight.shape)  # noqa: E731
    read_only = stored.copy()
    read_only.flags.writeable = False
    assert stored.flags.writeable
    run(stored)
    run(read_only)
    assert seen and all(not t.mutable for t in seen), seen

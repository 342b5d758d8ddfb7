"""The fused kernels multiply straight from stored bits and agree with decode + BLAS."""

import numpy as np
import pytest

from swtool import kernels
from swtool.checkpoint.safetensors import decode_float32, encode_float32


def test_f16_table_decodes_every_bit_pattern_like_numpy():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    expected = bits.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(kernels.F16_TABLE.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("n_rows", [1, 7, 64])
def test_fused_matmul_matches_decode_then_blas(dtype, n_rows):
    rng = np.random.default_rng(n_rows)
    weight = rng.standard_normal((300, 257)).astype(np.float32) * 0.05
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

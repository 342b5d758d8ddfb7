"""swtool.quant writes the same bytes as ggml and reads them back to the same floats.

The oracle is libggml itself (llama-cpp-python's libggml-base.so, through ctypes;
see ggml_oracle.py): ggml_quantize_chunk without an importance matrix, and each
type's to_float. Every comparison is exact: 0 differing bytes, 0 differing float bits.
"""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from fixtures.ggml_oracle import Ggml, GgmlUnavailable
from swtool.errors import SwtoolError
from swtool.quant import TYPES, block_size, dequantize, quantize, row_bytes

K_QUANTS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)


@pytest.fixture(scope="module")
def ggml():
    try:
        return Ggml()
    except GgmlUnavailable as e:
        pytest.fail(f"the ggml oracle is missing: {e}")


def assert_same_bytes(ours, ref, qtype):
    """Exact equality; on failure, say where the first differing block is."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.uint8
    differ = ours != ref
    if differ.any():
        row, byte = np.argwhere(differ)[0]
        nbytes = GGML_QUANT_SIZES[qtype][1]
        block = byte // nbytes
        pytest.fail(f"{qtype.name}: {int(differ.sum())} bytes differ from ggml; first in row {row}, block {block}:\n"
                    f"ours {ours[row, block * nbytes:(block + 1) * nbytes].tolist()}\n"
                    f"ggml {ref[row, block * nbytes:(block + 1) * nbytes].tolist()}")


def assert_same_floats(ours, ref):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.float32
    differ = ours.view(np.uint32) != ref.view(np.uint32)
    assert not differ.any(), f"{int(differ.sum())} floats differ; first at {np.argwhere(differ)[0]}"


def check_against_ggml(ggml, values, qtype):
    """quantize == ggml's bytes, and dequantize(those bytes) == ggml's to_float of them."""
    ours = quantize(values, qtype)
    ref = ggml.quantize(values, qtype)
    assert_same_bytes(ours, ref, qtype)
    assert_same_floats(dequantize(ref, qtype, values.shape), ggml.dequantize(ref, qtype, values.shape))


# ---------------------------------------------------------------------------
# inputs

def random_values(kind, shape, seed):
    rng = np.random.default_rng(seed)
    if kind == "normal":  # the scale of real LLM weights
        return rng.normal(0.0, 0.02, shape)
    if kind == "uniform":
        return rng.uniform(-1.0, 1.0, shape)
    if kind == "heavy":  # Student t, 2 degrees of freedom: frequent large values
        return rng.standard_t(2, shape) * 0.05
    if kind == "positive":  # min > 0 in every block (the K-quant min search clamps it to 0)
        return np.abs(rng.normal(0.5, 0.2, shape)) + 0.01
    if kind == "magnitudes":  # every block its own scale, from 1e-8 to 1e4
        blocks = rng.normal(size=shape).reshape(shape[0], -1, 32)
        return (blocks * 10.0 ** rng.uniform(-8, 4, blocks.shape[:2] + (1,))).reshape(shape)
    if kind == "tiny":  # scales that are half-precision subnormals or round to 0
        return rng.normal(0.0, 1e-6, shape) * 10.0 ** rng.integers(-3, 1, (shape[0], 1))
    if kind == "integers":  # many exact ties in x / d
        return rng.integers(-8, 8, shape).astype(np.float64)
    raise ValueError(kind)


KINDS = ["normal", "uniform", "heavy", "positive", "magnitudes", "tiny", "integers"]


def with_outliers(values, seed):
    """A super-weight-sized value (about 100x the row's spread) in some blocks, at varied positions."""
    rng = np.random.default_rng(seed)
    values = values.copy()
    rows, cols = values.shape
    for position in (0, 31, 32, 100, 255, 256, cols - 1):
        row = int(rng.integers(rows))
        values[row, position % cols] = rng.choice([-1.0, 1.0]) * 100 * values.std()
    values[rows // 2, 5:9] = [2.5, -2.5, 3.0, -1.75]  # several outliers in one block
    return values


def special_blocks():
    """All-zero (+0/-0), constant, one non-zero, below ggml's GROUP_MAX_EPS, denormal, two-valued blocks,
    and ties whose sign ggml's first-wins scans decide (a signed zero as min or max, +-amax)."""
    j = np.arange(512) % 32
    ramp = 0.1 + (j % 7) * 0.01
    rows = [
        np.where(j == 2, 0.0, np.where(j == 5, -0.0, ramp)),  # min is a zero: +0.0 comes first
        np.where(j == 1, -0.0, np.where(j == 6, 0.0, ramp)),  # min is a zero: -0.0 comes first
        np.where(j == 3, 0.0, np.where(j == 4, -0.0, -ramp)),  # max is a zero
        np.where(j == 1, -0.5, np.where(j == 3, 0.5, ramp / 10)),  # |max| tie: -0.5 first
        np.where(j == 1, 0.5, np.where(j == 30, -0.5, ramp / 10)),  # |max| tie: +0.5 first
        np.zeros(512),
        np.full(512, -0.0),
        np.where(np.arange(512) % 3 == 0, -0.0, 0.0),
        np.full(512, 0.7),
        np.full(512, -0.3),
        np.full(512, 1e-3),
        np.where(np.arange(512) == 77, 1.0, 0.0),
        np.where(np.arange(512) == 300, -5e-4, 0.0),
        np.full(512, 1e-16),
        np.full(512, 1e-40),  # float32 denormals
        np.where(np.arange(512) % 2 == 0, 1.0, -1.0),
        np.where(np.arange(512) % 16 < 8, 0.25, 0.0),
        np.linspace(-1, 1, 512),
        np.concatenate([np.zeros(256), np.full(256, 65000.0)]),
    ]
    return np.array(rows, dtype=np.float32)


# ---------------------------------------------------------------------------
# the bytes, against ggml

@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", KINDS)
def test_random_rows_match_ggml(ggml, qtype, kind):
    values = random_values(kind, (24, 768), seed=KINDS.index(kind)).astype(np.float32)
    check_against_ggml(ggml, values, qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(1, 256), (3, 4096), (130, 512)])
def test_shapes_match_ggml(ggml, qtype, shape):
    values = random_values("normal", shape, seed=shape[0]).astype(np.float32)
    check_against_ggml(ggml, values, qtype)


@pytest.mark.parametrize("qtype", [t for t in TYPES if block_size(t) == 32], ids=lambda t: t.name)
def test_rows_of_32_multiples_match_ggml(ggml, qtype):
    """SmolLM2's hidden size, 576 = 18 x 32, only fits the 32-blocks."""
    check_against_ggml(ggml, random_values("heavy", (9, 576), seed=5).astype(np.float32), qtype)
    check_against_ggml(ggml, random_values("normal", (5, 32), seed=6).astype(np.float32), qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["normal", "heavy", "magnitudes"])
def test_planted_outliers_match_ggml(ggml, qtype, kind):
    values = with_outliers(random_values(kind, (16, 1024), seed=11), seed=12).astype(np.float32)
    check_against_ggml(ggml, values, qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_zero_constant_and_tiny_blocks_match_ggml(ggml, qtype):
    check_against_ggml(ggml, special_blocks(), qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_smollm2_tensors_match_ggml(ggml, smollm2_tensors, qtype):
    for name, weight in smollm2_tensors.items():
        if weight.shape[1] % block_size(qtype) == 0:  # K-quants: only ffn_down's 1536-wide rows fit
            check_against_ggml(ggml, weight, qtype)


def test_smollm2_super_weight_survives_q4_0_as_ggml_says(ggml, smollm2_tensors):
    """The known damage, in ggml's own Q4_0: the super weight sets its block's scale and survives
    exactly (d = -5.3125 / -8 is an f16), its block-mates fall on that coarse grid, the smaller ones
    to zero; swtool quantizes and reads the same."""
    weight = smollm2_tensors["model.layers.2.mlp.down_proj.weight"]
    data = ggml.quantize(weight, T.Q4_0)
    back = ggml.dequantize(data, T.Q4_0, weight.shape)
    assert back[507, 430] == weight[507, 430] == -5.3125  # the block's max sets d
    block = slice(416, 448)
    step = 5.3125 / 8
    np.testing.assert_array_equal(back[507, block], step * np.round(back[507, block] / step))
    assert np.count_nonzero(weight[507, block]) == 32 and np.count_nonzero(back[507, block]) < 32
    assert_same_floats(dequantize(quantize(weight, T.Q4_0), T.Q4_0, weight.shape), back)


# ---------------------------------------------------------------------------
# the floats, against ggml's to_float on arbitrary blocks

HALF_FIELDS = {  # byte offsets of the half-precision scales inside one block
    T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_NL: (0,), T.IQ4_XS: (0,),
}


def random_blocks(qtype, rows, cols, seed):
    """Random bytes in every code and scale field; the half scales random but finite."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, row_bytes(qtype, cols)), dtype=np.uint8)
    if qtype in (T.F16, T.BF16, T.F32):  # clear the top exponent bit of every Inf/NaN
        words = data.view(np.uint32 if qtype == T.F32 else np.uint16)
        exponent, top = {T.F16: (0x7C00, 0x4000), T.BF16: (0x7F80, 0x4000), T.F32: (0x7F800000, 0x40000000)}[qtype]
        non_finite = (words & exponent) == exponent
        words[non_finite] ^= top
        return data
    nbytes = GGML_QUANT_SIZES[qtype][1]
    blocks = data.reshape(rows, -1, nbytes)
    for at in HALF_FIELDS[qtype]:
        halves = rng.normal(0, 1, blocks.shape[:2]) * 10.0 ** rng.uniform(-7, 4, blocks.shape[:2])
        blocks[:, :, at:at + 2] = halves.astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    return data


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_arbitrary_blocks_like_ggml(ggml, qtype):
    rows, cols = 12, 1024
    data = random_blocks(qtype, rows, cols, seed=int(qtype))
    expected = ggml.dequantize(data, qtype, (rows, cols))
    assert np.isfinite(expected).all()
    assert_same_floats(dequantize(data, qtype, (rows, cols)), expected)


# ---------------------------------------------------------------------------
# the API

def test_shapes_dtypes_and_names():
    values = random_values("normal", (2, 3, 512), seed=0)  # float64, three axes
    data = quantize(values, "q4_k")
    assert data.dtype == np.uint8 and data.shape == (2, 3, 2 * 144)
    assert row_bytes(T.Q4_K, 512) == 288 and row_bytes(T.F16, 10) == 20 and block_size("Q8_0") == 32
    back = dequantize(data, T.Q4_K, (2, 3, 512))
    assert back.shape == (2, 3, 512) and back.dtype == np.float32
    assert np.abs(back - values).max() < 0.02  # a sanity bound, not the oracle: Q4_K of N(0, 0.02)
    assert quantize(np.zeros((0, 64), np.float32), T.Q8_0).shape == (0, 68)


def test_dequantize_takes_any_view_of_the_bytes():
    values = random_values("normal", (3, 64), seed=1).astype(np.float32)
    half = values.astype(np.float16)  # what gguf's reader returns for an F16 tensor
    np.testing.assert_array_equal(dequantize(half, T.F16, values.shape), half.astype(np.float32))
    data = quantize(values, T.Q8_0)
    np.testing.assert_array_equal(dequantize(data.tobytes(), T.Q8_0, values.shape),
                                  dequantize(data, T.Q8_0, values.shape))


def test_row_length_must_fit_the_block():
    with pytest.raises(SwtoolError, match="Q4_K needs rows whose length is a multiple of 256; got rows of 576"):
        quantize(np.zeros((4, 576), np.float32), T.Q4_K)
    with pytest.raises(SwtoolError, match="multiple of 32"):
        quantize(np.zeros((4, 100), np.float32), T.Q8_0)


def test_non_finite_values_are_refused():
    values = np.zeros((5, 256), np.float32)
    values[3, 17] = np.nan
    values[4, 0] = -np.inf
    for qtype in (T.Q8_0, T.Q6_K, T.F16):
        with pytest.raises(SwtoolError, match=f"cannot quantize to {qtype.name}: row 3 holds NaN or Inf"):
            quantize(values, qtype)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_K])
def test_every_row_with_nan_or_inf_is_counted(qtype):
    """Q8_0 finds NaN and Inf inside its one pass over a row, not in a check of its own:
    NaN next to ordinary values, in a block of NaNs only (amax 0), next to denormals
    (the block whose 1/d is inf), +Inf and -Inf; the clean rows are not counted."""
    values = np.full((8, 256), 0.01, np.float32)
    values[1, 40] = np.nan
    values[2, 64:96] = np.nan
    values[3, 96:128] = 1e-41
    values[3, 100] = np.nan
    values[5, 255] = np.inf
    values[6, 0] = -np.inf
    with pytest.raises(SwtoolError, match=rf"cannot quantize to {qtype.name}: row 1 holds NaN or Inf \(5 such rows\)"):
        quantize(values, qtype)
    clean = np.delete(values, [1, 2, 3, 5, 6], axis=0)
    assert quantize(clean, qtype).shape[0] == 3


def test_bad_types_and_sizes_are_refused():
    with pytest.raises(SwtoolError, match="unsupported quantization type 'iq2_xs'; supported: F32, F16"):
        quantize(np.zeros((1, 256), np.float32), "iq2_xs")
    with pytest.raises(SwtoolError, match="unsupported quantization type"):
        quantize(np.zeros((1, 256), np.float32), T.TQ1_0)
    with pytest.raises(SwtoolError, match="float array"):
        quantize(np.zeros((1, 256), np.int32), T.Q8_0)
    with pytest.raises(SwtoolError, match=r"Q8_0 data of shape \(2, 64\) should be 136 bytes; got 100"):
        dequantize(np.zeros(100, np.uint8), T.Q8_0, (2, 64))

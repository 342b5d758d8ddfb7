"""swtool.quant with importance weights writes the same bytes as ggml with an imatrix.

The oracle is libggml's ggml_quantize_chunk(type, src, dst, 0, rows, cols, imatrix)
(fixtures/ggml_oracle.py), which runs each type's importance-weighted quantize_row_*_impl.
Every comparison is exact: 0 differing bytes; and swtool's decoder gives ggml's to_float
floats for those bytes, bit for bit. The importance vectors are shaped like what
llama-quantize reads from an imatrix file (the mean square of each column's input
activations: positive, a few columns thousands of times the rest), plus flat ones,
lognormal ones, and ones with the zeros of columns a calibration run never saw.
IQ4_NL and IQ4_XS are compared without importance too (tests/test_quant.py also
runs them, as every type of the table).
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from fixtures.ggml_oracle import Ggml, GgmlUnavailable
from swtool.errors import SwtoolError
from swtool.quant import block_size, dequantize, quantize

WEIGHTED = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS)
IMPORTANCE = ["activations", "ones", "lognormal", "unseen_columns"]


@pytest.fixture(scope="module")
def ggml():
    try:
        return Ggml()
    except GgmlUnavailable as e:
        pytest.fail(f"the ggml oracle is missing: {e}")


def importance_vector(kind, cols, seed, heavy_columns=()):
    """One weight per column, float32; `heavy_columns` are among the heaviest under "activations"."""
    rng = np.random.default_rng(seed)
    if kind == "activations":  # mean x**2 per column: chi-square-like, a few massive-activation columns
        weights = rng.chisquare(1, cols) * 1e-2 + 1e-6
        heavy = list(rng.choice(cols, 4, replace=False)) + list(heavy_columns)
        weights[heavy] *= 1e4
    elif kind == "ones":
        weights = np.ones(cols)
    elif kind == "lognormal":
        weights = rng.lognormal(0.0, 1.5, cols)
    elif kind == "unseen_columns":  # a quarter of the columns exactly 0, whole blocks of them too
        weights = rng.lognormal(0.0, 1.0, cols)
        weights[rng.random(cols) < 0.25] = 0.0
        weights[64:128] = 0.0
    else:
        raise ValueError(kind)
    return weights.astype(np.float32)


def planted(rows, cols, seed):
    """N(0, 0.02) with one super weight, 100x the largest of the rest, in one row; (values, its column)."""
    rng = np.random.default_rng(seed)
    values = rng.normal(0.0, 0.02, (rows, cols)).astype(np.float32)
    row, col = rows // 3, int(rng.integers(cols))
    values[row, col] = -100 * np.abs(values).max()
    return values, col


def check(ggml, values, qtype, importance):
    """Our bytes == ggml's for this importance (or none), and our decoder == ggml's to_float on them."""
    ours = quantize(values, qtype, importance=importance)
    ref = ggml.quantize(values, qtype, importance)
    differ = ours != ref
    if differ.any():
        row, byte = np.argwhere(differ)[0]
        pytest.fail(f"{qtype.name}: {int(differ.sum())} of {ref.size} bytes differ from ggml; first in row {row}, "
                    f"byte {byte}: ours {ours[row, byte]}, ggml {ref[row, byte]}")
    back, expected = dequantize(ref, qtype, values.shape), ggml.dequantize(ref, qtype, values.shape)
    assert np.array_equal(back.view(np.uint32), expected.view(np.uint32))


# ---------------------------------------------------------------------------
# synthetic tensors (the fast lane)

@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
@pytest.mark.parametrize("importance", IMPORTANCE)
def test_planted_super_weight_with_importance_matches_ggml(ggml, qtype, importance):
    values, col = planted(12, 1024, seed=3)
    check(ggml, values, qtype, importance_vector(importance, 1024, seed=4, heavy_columns=[col]))


@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["normal", "heavy", "positive"])
def test_random_rows_with_importance_match_ggml(ggml, qtype, kind):
    rng = np.random.default_rng(len(kind))
    values = {"normal": lambda: rng.normal(0.0, 0.02, (8, 768)),
              "heavy": lambda: rng.standard_t(2, (8, 768)) * 0.05,  # frequent large values
              "positive": lambda: np.abs(rng.normal(0.5, 0.2, (8, 768))) + 0.01}[kind]().astype(np.float32)
    check(ggml, values, qtype, importance_vector("lognormal", 768, seed=7))


@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
def test_zero_constant_and_tiny_blocks_with_importance_match_ggml(ggml, qtype):
    """All-zero and signed-zero blocks, constants, one value, values below GROUP_MAX_EPS, float32 denormals,
    half-precision subnormal scales, a block of two values, a large one beside zeros."""
    n = np.arange(512)
    rows = np.array([
        np.zeros(512), np.full(512, -0.0), np.full(512, 0.7), np.full(512, -0.3),
        np.where(n == 77, 1.0, 0.0), np.where(n == 300, -5e-4, 0.0), np.full(512, 1e-16), np.full(512, 1e-40),
        np.random.default_rng(0).normal(0, 1e-6, 512), np.where(n % 2 == 0, 1.0, -1.0),
        np.linspace(-1, 1, 512), np.concatenate([np.zeros(256), np.full(256, 65000.0)]),
    ], dtype=np.float32)
    for importance in IMPORTANCE:
        check(ggml, rows, qtype, importance_vector(importance, 512, seed=9))


@pytest.mark.parametrize("qtype", [T.IQ4_NL, T.IQ4_XS], ids=lambda t: t.name)
def test_iq4_without_importance_matches_ggml(ggml, qtype):
    """ggml_quantize_chunk with no imatrix: the same scale search, weighted by x**2."""
    values, _ = planted(12, 1024, seed=5)
    check(ggml, values, qtype, None)
    check(ggml, np.random.default_rng(6).standard_t(2, (6, 512)).astype(np.float32), qtype, None)


def test_q8_0_ignores_importance_as_ggml_does(ggml):
    values, col = planted(4, 256, seed=8)
    importance = importance_vector("activations", 256, seed=8, heavy_columns=[col])
    check(ggml, values, T.Q8_0, importance)
    assert np.array_equal(quantize(values, T.Q8_0, importance=importance), quantize(values, T.Q8_0))


def test_bad_importance_is_refused():
    values = np.zeros((2, 64), np.float32)
    with pytest.raises(SwtoolError, match=r"one weight per column \(64\); got float32 \(32,\)"):
        quantize(values, T.Q4_0, importance=np.ones(32, np.float32))
    with pytest.raises(SwtoolError, match="one weight per column"):
        quantize(values, T.Q4_0, importance=np.ones(64, np.int64))
    for bad in (np.nan, np.inf, -1.0):
        importance = np.ones(64, np.float32)
        importance[5] = bad
        with pytest.raises(SwtoolError, match="finite and non-negative"):
            quantize(values, T.Q4_0, importance=importance)


# ---------------------------------------------------------------------------
# real tensors (the smollm2_tensors fixture: tests/conftest.py)

@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
@pytest.mark.parametrize("importance", IMPORTANCE)
def test_smollm2_tensors_with_importance_match_ggml(ggml, smollm2_tensors, qtype, importance):
    checked = 0
    for name, weight in smollm2_tensors.items():
        cols = weight.shape[1]
        if cols % block_size(qtype) == 0:  # 256-blocks: only ffn_down's rows fit
            # layer 2's super weight sits at column 430 of ffn_down: among the heaviest under "activations"
            check(ggml, weight, qtype, importance_vector(importance, cols, seed=cols, heavy_columns=[430]))
            checked += 1
    assert checked >= 2

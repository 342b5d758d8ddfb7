"""Fused GGUF block kernels (swtool/kernels/gguf_blocks.py): x @ W.T straight from Q8_0 ... Q6_K, IQ4_NL, IQ4_XS blocks.

The reference is gguf-py's dequantizer (gguf.quants.dequantize, NumPy, independent of
swtool) followed by a float64 NumPy matmul. Blocks come from gguf-py's quantizer where it
has one (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and from swtool.quant, which writes ggml's bytes
exactly (tests/test_quant.py holds it to libggml), for the K-quants gguf-py cannot write.
"""

import dataclasses

import gguf
import numpy as np
import pytest

from swtool import forward as forward_module
from swtool import block_types, kernels
from swtool.checkpoint import gguf_file
from swtool.checkpoint.gguf_file import read_gguf
from swtool.kernels import gguf_blocks
from swtool.forward import Edit, Pass, ScaleElements, World
from swtool.quant import dequantize, quantize

T = gguf.GGMLQuantizationType
GGUF_PY_WRITES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
U = 2.0 ** -24  # float32 unit roundoff


def quantized(weight, name):
    """ggml's blocks of `weight` for type `name`: gguf-py's quantizer when it has one, else swtool.quant."""
    if name in GGUF_PY_WRITES:
        return gguf.quants.quantize(weight, T[name])
    return quantize(weight, T[name])


def reference(x, stored, name, n_cols):
    """x @ W.T in float64, W decoded by gguf-py."""
    weight = gguf.quants.dequantize(stored, T[name]).reshape(stored.shape[0], n_cols)
    return x.astype(np.float64) @ weight.astype(np.float64).T, weight


def assert_float32_product(got, x, weight, expected):
    """|got - exact| within the float32 error bound of a dot product: any summation order of K
    products, with or without fused multiply-adds, errs by at most gamma_K * sum |x_k w_k|,
    gamma_K = K u / (1 - K u); the kernel adds one partial sum per 256 columns, so 2K bounds it."""
    n = 2 * x.shape[1]
    bound = n * U / (1 - n * U) * (np.abs(x).astype(np.float64) @ np.abs(weight).astype(np.float64).T)
    assert np.all(np.abs(got - expected) <= bound), float(np.max(np.abs(got - expected) - bound))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_block_table_is_ggmls():
    for name in kernels.BLOCK_TYPES:
        assert gguf.GGML_QUANT_SIZES[T[name]] == block_types.block_shape(name)


@pytest.mark.parametrize("name", kernels.BLOCK_TYPES)
@pytest.mark.parametrize("n_rows", [1, 7, 64])
def test_fused_product_matches_gguf_py_dequantize_then_float64(name, n_rows):
    rng = np.random.default_rng(n_rows)
    block = gguf.GGML_QUANT_SIZES[T[name]][0]
    # columns: 3 segments of 256 and, for 32-blocks, a last short one; rows not a multiple of 4
    n_cols = 768 if block == 256 else 608
    weight = (rng.standard_normal((303, n_cols)) * 0.05).astype(np.float32)
    weight[17, 33] = 40.0  # a super-weight-sized element
    weight[200] *= 1e-3  # a row of small scales
    stored = quantized(weight, name)
    x = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    x[:, 33] = 900.0  # and a massive input channel
    expected, decoded = reference(x, stored, name, n_cols)
    got = gguf_blocks.matmul_blocks(x, stored, name)
    assert got.shape == (n_rows, 303) and got.dtype == np.float32
    assert_float32_product(got, x, decoded, expected)
    # the dispatch in kernels.py takes the same route
    np.testing.assert_array_equal(kernels.matmul_stored(x, stored, name), got)


@pytest.mark.parametrize("name", kernels.BLOCK_TYPES)
def test_block_decoders_give_gguf_py_floats_exactly(name):
    """The decoders (swtool.quant.blocks) behind the kernel's tile and swtool.quant.dequantize give
    exactly ggml's floats (gguf-py's), including extreme blocks."""
    rng = np.random.default_rng(3)
    n_cols = 512
    weight = (rng.standard_normal((40, n_cols)) * 0.05).astype(np.float32)
    weight[1] = 0.0  # zero blocks
    weight[2] = 3.0  # constant blocks
    weight[3] *= 1e-6  # tiny scales (half subnormals)
    weight[4] *= 1e4  # large scales
    weight[5, ::2] = -weight[5, ::2] * 50  # mixed signs, one side dominant
    stored = quantized(weight, name)
    expected = gguf.quants.dequantize(stored, T[name]).reshape(weight.shape)
    np.testing.assert_array_equal(dequantize(stored, name, weight.shape), expected)


def test_mismatched_row_bytes_are_refused():
    stored = quantize(np.zeros((4, 64), np.float32), T.Q8_0)
    with pytest.raises(ValueError):
        gguf_blocks.matmul_blocks(np.zeros((2, 96), np.float32), stored, "Q8_0")


# --- through forward.Pass.linear: dispatch, row permutation, world edits, transforms ----------

class OneTensor:
    """A checkpoint holding one GGUF tensor (what Pass needs of a checkpoint)."""

    def __init__(self, info):
        self.info = info

    def tensor(self, name):
        return self.info


@pytest.fixture(scope="module")
def gguf_tensors(tmp_path_factory):
    """{type: (GGUFTensor with a row permutation, float32 W in HF row order as gguf-py decodes it)}."""
    rng = np.random.default_rng(11)
    weight = (rng.standard_normal((66, 512)) * 0.05).astype(np.float32)
    weight[9, 70] = 25.0
    order = rng.permutation(weight.shape[0])  # stored row of each HF row, as gguf_model's Q/K orders are
    path = tmp_path_factory.mktemp("gguf_kernels") / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    names = list(kernels.BLOCK_TYPES) + ["F16", "BF16", "F32"]
    for name in names:
        if name in kernels.BLOCK_TYPES:
            writer.add_tensor(name, quantized(weight, name), raw_dtype=T[name])
        elif name == "BF16":
            writer.add_tensor(name, gguf.quants.quantize(weight, T.BF16), raw_dtype=T.BF16)
        else:
            writer.add_tensor(name, weight.astype(np.float16 if name == "F16" else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(path)
    parsed = read_gguf(path)
    result = {}
    for tensor in reader.tensors:
        stored_values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
        info = dataclasses.replace(parsed.tensors[tensor.name], row_order=order)
        assert info.dtype == tensor.name
        result[tensor.name] = (info, stored_values[order].astype(np.float32))
    return result


@pytest.fixture
def spy(monkeypatch):
    """Counts the products taken by each route: the fused block kernel and the dequantize + BLAS decode."""
    calls = {"fused": 0, "decoded": 0}
    fused, decode = gguf_blocks.matmul_blocks, gguf_file.dequantize_blocks

    def counting_fused(*args):
        calls["fused"] += 1
        return fused(*args)

    def counting_decode(*args):
        calls["decoded"] += 1
        return decode(*args)

    monkeypatch.setattr(gguf_blocks, "matmul_blocks", counting_fused)
    monkeypatch.setattr(gguf_file, "dequantize_blocks", counting_decode)
    return calls


@pytest.mark.parametrize("name", list(kernels.BLOCK_TYPES) + ["F16", "BF16", "F32"])
@pytest.mark.parametrize("n_tokens", [5, kernels.BLOCK_MAX_ROWS + 1])
def test_linear_of_a_permuted_gguf_tensor(gguf_tensors, spy, name, n_tokens):
    """Pass.linear: HF rows in order (row_order honoured), the fused kernel for few rows and
    decode + BLAS for many, world edits and ScaleElements both changing W[9, 70] as for safetensors."""
    info, weight = gguf_tensors[name]
    rng = np.random.default_rng(n_tokens)
    x = rng.standard_normal((2, n_tokens, 512)).astype(np.float32)  # two worlds
    x[:, :, 70] = 300.0
    worlds = [World("intact"), World("removed", (Edit(name, 9, 70, 0.0),))]
    ctx = Pass(OneTensor(info), worlds, n_tokens)
    got = ctx.linear(x, name)
    removed = weight.copy()
    removed[9, 70] = 0.0
    for world, matrix in ((0, weight), (1, removed)):
        expected = x[world].astype(np.float64) @ matrix.astype(np.float64).T
        assert_float32_product(got[world], x[world], matrix, expected)
    if name in kernels.BLOCK_TYPES:
        fused = n_tokens * 2 <= kernels.BLOCK_MAX_ROWS
        assert spy["fused"] == (1 if fused else 0)
        # the decoded route reads the whole tensor; the edit's value is always read from its row
        assert spy["decoded"] == (1 if fused else 2)
    # a transform needs the decoded weight: scale W[9, 70] by 0.5 in every world
    spy["fused"] = 0
    halved = weight.copy()
    halved[9, 70] *= np.float32(0.5)
    ctx = Pass(OneTensor(info), [World("intact")], n_tokens, transforms=[ScaleElements([Edit(name, 9, 70, 0.5)])])
    got = ctx.linear(x[:1], name)[0]
    assert_float32_product(got, x[0], halved, x[0].astype(np.float64) @ halved.astype(np.float64).T)
    assert spy["fused"] == 0


# --- the SmolLM2 Q4_1 GGUF: new path against the old one (gguf-py dequantize + BLAS) ------------

PROMPT = "Apple Inc. is a worldwide tech company."


def _old_decode(self, stored):
    """GGUFTensor._decode before gguf_kernels.py: block types through gguf-py's NumPy dequantizer."""
    if not self.quantized:
        return gguf_file.decode_float32(stored, gguf_file.PLAIN_TYPES[self.dtype][1])
    return gguf_file.dequantize_with_gguf_py(stored, self.dtype, self.shape[-1])


@pytest.fixture
def old_path(monkeypatch):
    """Switch to the old path: no block type is multiplied from its blocks, gguf-py decodes them all."""
    def switch():
        monkeypatch.setattr(forward_module, "FUSED_DTYPES", ("BF16", "F16", "F32"))
        monkeypatch.setattr(gguf_file.GGUFTensor, "_decode", _old_decode)
    return switch


@pytest.fixture(scope="module")
def q4_1_gguf(smollm2):
    from fixtures import smollm2 as builder

    return builder.fetch_gguf()


@pytest.mark.real
def test_smollm2_q4_1_logits_and_scan_match_the_old_path(q4_1_gguf, old_path, spy):
    from swtool.detect import Settings, scan
    from swtool.model import load_model
    from swtool.tokenizer import encode

    model = load_model(q4_1_gguf)
    ids = encode(model.directory, PROMPT)
    zero = ScaleElements([Edit("model.layers.11.mlp.down_proj.weight", 507, 1229, 0.0)])
    new_logits = forward_module.forward(model, ids)[0]
    new_zeroed = forward_module.forward(model, ids, transforms=[zero])[0]
    assert spy["fused"] > 200  # every linear and the tied Q8_0 head, from their blocks
    new_found, new_report = scan(model, ids, Settings(PROMPT))

    old_path()
    old_logits = forward_module.forward(model, ids)[0]
    old_zeroed = forward_module.forward(model, ids, transforms=[zero])[0]
    old_found, old_report = scan(model, ids, Settings(PROMPT))

    # measured gap 4.9e-6 x max: the two paths round differently through SmolLM2's 30 layers
    for new, old in ((new_logits, old_logits), (new_zeroed, old_zeroed)):
        np.testing.assert_allclose(new, old, atol=2e-5 * np.abs(old).max())
    assert forward_module.mean_nll(new_zeroed[None], ids)[0] > forward_module.mean_nll(new_logits[None], ids)[0] + 2
    # the same super weights, with the same stored values (both decoders give ggml's floats)
    assert len(new_found) >= 2
    assert [(sw.layer, sw.row, sw.col, sw.value) for sw in new_found] == \
        [(sw.layer, sw.row, sw.col, sw.value) for sw in old_found]


@pytest.mark.real
def test_smollm2_q4_1_perplexity_matches_the_old_path(q4_1_gguf, old_path):
    """eval's route: chunks of 16 tokens (fused) and of 96 (Numba dequantize + BLAS)."""
    from pathlib import Path

    from swtool.evaluate import perplexity
    from swtool.model import load_model
    from swtool.tokenizer import encode

    model = load_model(q4_1_gguf)
    text = (Path(__file__).resolve().parents[1] / "fixtures" / "prose.txt").read_text()
    ids = encode(model.directory, text)[:192]
    new = [perplexity(model, ids, ctx=ctx)[0] for ctx in (16, 96)]
    old_path()
    old = [perplexity(model, ids, ctx=ctx)[0] for ctx in (16, 96)]
    np.testing.assert_allclose(new, old, rtol=1e-5)

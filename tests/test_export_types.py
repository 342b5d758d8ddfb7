"""The export types no SmolLM2 test reaches, on tiny models whose rows fit the K-quants' 256-value blocks.

Oracles:
  - llama.cpp's own quantizer (llama_model_quantize, what llama-quantize runs) applied to swtool's F32
    export of the same model: swtool's file for a mix (q3_k_s ... q5_k_m), or for a plain type that
    llama.cpp has a file type for, must be that file, tensor by tensor (type and bytes) and key by key;
  - llama.cpp loading the plain-type exports: its logits must be those swtool computes from the same
    file, and so must the logits of the F32 file llama.cpp itself decodes it to;
  - gguf-py's GGUFReader for reading the files back.
"""


import gguf
import numpy as np
import pytest

from fixtures import llama_oracle
from fixtures.llama_oracle import quantize as llama_quantize
from swtool.forward import forward
from swtool.gguf_export import ExportOptions, export, quantize_gguf
from swtool.model import load_model
from swtool.quant.policy import ModelFacts, choose_type, parse_target
from fixtures.tiny import add_a_merge, random_tokens

T = gguf.GGMLQuantizationType

# name -> (family, config overrides of fixtures/tiny.py's TINY)
SHAPES = {
    # every row 256 values, so each K-quant lands where the rules put it; 16 layers, so each mix rule
    # (the first n/16 or n/8 layers, use_more_bits) picks some layers and not others
    "wide": ("llama", dict(hidden_size=256, intermediate_size=256, num_hidden_layers=16)),
    # ffn_down rows of 288 fit no K-quant (llama.cpp's fallbacks); the output tied to the embedding
    "fallback": ("llama", dict(hidden_size=256, intermediate_size=288, num_hidden_layers=8, tie_word_embeddings=True)),
    # 80 layers: llama.cpp's "70B" (grouped-query Llama, or Qwen2), whose attn_v gets more bits, and its
    # "65B" (a key/value head per head), whose attn_v does not
    "llama-70b": ("llama", dict(num_hidden_layers=80)),
    "llama-65b": ("llama", dict(num_hidden_layers=80, num_key_value_heads=4)),
    "qwen2-72b": ("qwen2", dict(num_hidden_layers=80)),
    # 4 query heads per key/value head (n_gqa 4): the IQ4 file types give attn_v Q5_K
    "gqa": ("llama", dict(hidden_size=256, intermediate_size=256, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=2)),
    # 8 experts, as Mixtral-8x7B: attn_v and attn_k Q8_0 in every file type, attn_output Q5_K in some
    "mixtral": ("mixtral", dict(hidden_size=256, intermediate_size=256, num_hidden_layers=8, num_local_experts=8)),
    # one attn_qkv matrix, which llama.cpp's rules treat as attn_v
    "phi3": ("phi3", dict(hidden_size=256, intermediate_size=256, num_hidden_layers=8)),
}
MIXES = ("q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m")
# the plain types llama-quantize has a file type for
LLAMA_PLAIN = ("bf16", "q4_1", "q5_0", "q5_1", "q6_k", "iq4_nl", "iq4_xs")
PLAIN = ("bf16", "q3_k", "q5_k", "q6_k", "q4_1", "q5_0", "q5_1")  # on "wide", every weight in the type
COMPUTED = PLAIN + ("iq4_nl", "iq4_xs")  # the IQ4 files also hold the Q5_K ffn_down of their rule
CASES = ([("wide", kind) for kind in MIXES + LLAMA_PLAIN]
         + [("fallback", kind) for kind in ("q3_k_s", "q3_k_m", "q5_k_m", "iq4_xs")]
         + [("llama-70b", "q3_k_m"), ("llama-65b", "q3_k_m"), ("qwen2-72b", "q4_k_s")]
         + [("gqa", "iq4_nl"), ("gqa", "iq4_xs")]
         + [("mixtral", kind) for kind in ("q4_0", "q3_k_m", "q4_k_m", "iq4_xs")] + [("phi3", "q3_k_m")])

# llama.cpp's logits of a plain-type file against swtool's, relative to swtool's largest: llama.cpp
# multiplies the weights by activations rounded to 8 bits (Q8_K for the K-quants, Q8_0/Q8_1 for the
# others) or to bf16, swtool by float32 ones. Measured on "wide" (40 tokens): bf16 4.5e-3, q3_k 2.6e-2,
# q5_k 1.9e-2, q6_k 2.3e-2, q4_1 1.3e-2, q5_0 1.5e-2, q5_1 1.3e-2, iq4_nl 1.6e-2, iq4_xs 2.4e-2.
ROUNDED_ACTIVATIONS = {"bf16": 6e-3, "q3_k": 3e-2, "q5_k": 3e-2, "q6_k": 3e-2, "q4_1": 2e-2, "q5_0": 2e-2, "q5_1": 2e-2,
                       "iq4_nl": 2e-2, "iq4_xs": 3e-2}
# the same against llama.cpp's own F32 decoding of the file: only its f16 KV cache differs.
# Measured: 3.4e-4 to 4.7e-4, as for swtool's F32 export (3e-4).
DECODED = 1e-3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(shape, kind): swtool's export of SHAPES[shape] as `kind`, each model and file made once."""
    from fixtures.tiny import build_tiny

    models, files = {}, {}
    out = tmp_path_factory.mktemp("exports")

    def make(shape, kind):
        if shape not in models:
            family, overrides = SHAPES[shape]
            models[shape] = tmp_path_factory.mktemp(shape)
            build_tiny(models[shape], family, "float32", **overrides)
            add_a_merge(models[shape])
        if (shape, kind) not in files:
            options = ExportOptions(kind, progress=False, scan=False)
            files[shape, kind] = export(models[shape], out / f"{shape}-{kind}.gguf", options).path
        return files[shape, kind]

    return make


def llama_ftype(kind):
    from llama_cpp import llama_cpp as L

    return getattr(L, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")


def read_back(path):
    """({key: (value, types)}, {tensor name: (ggml type, raw bytes)}) of a GGUF file, read by gguf-py."""
    reader = gguf.GGUFReader(path)
    meta = {key: (field.contents(), [int(t) for t in field.types]) for key, field in reader.fields.items()
            if not key.startswith("GGUF.")}
    return meta, {t.name: (t.tensor_type, np.asarray(t.data).view(np.uint8).reshape(-1)) for t in reader.tensors}


def assert_same_file(ours, theirs):
    """Every tensor's type and bytes, every metadata key: llama-quantize reorders the tensors, which
    llama.cpp reads in either order."""
    our_meta, our_tensors = read_back(ours)
    their_meta, their_tensors = read_back(theirs)
    assert set(our_tensors) == set(their_tensors)
    for name, (qtype, data) in their_tensors.items():
        assert our_tensors[name][0] == qtype, (name, our_tensors[name][0].name, qtype.name)
        assert np.array_equal(our_tensors[name][1], data), name
    assert our_meta == their_meta


def llama_logits(path, ids):
    llm = llama_oracle.load(path, n_ctx=64)
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[:len(ids)])


@pytest.mark.parametrize("shape, kind", CASES, ids=[f"{shape}-{kind}" for shape, kind in CASES])
def test_export_is_the_file_llama_quantize_writes(exported, tmp_path, shape, kind):
    theirs = llama_quantize(exported(shape, "f32"), tmp_path / "llama.gguf", llama_ftype(kind))
    assert_same_file(exported(shape, kind), theirs)


@pytest.mark.parametrize("shape, kind", [("llama-70b", "q4_k_s"), ("mixtral", "q3_k_m")])
def test_quantize_reads_the_models_shape_from_the_input(exported, tmp_path, shape, kind):
    """swtool quantize has no config.json: the layers, heads and experts the rules read (a 70B, 8 experts)
    come from the GGUF's metadata."""
    f32 = exported(shape, "f32")
    ours = quantize_gguf(f32, tmp_path / "swtool.gguf", ExportOptions(kind, handling="none", progress=False, scan=False)).path
    assert_same_file(ours, llama_quantize(f32, tmp_path / "llama.gguf", llama_ftype(kind)))


@pytest.mark.parametrize("kind", PLAIN)
def test_plain_type_is_every_weights_type(exported, kind):
    """The type asked for, but for the norms (F32) and, in a quantized file, output.weight: Q6_K, as
    llama-quantize's rule for it gives when its rows fit Q6_K's blocks."""
    asked = T[kind.upper()]
    _, tensors = read_back(exported("wide", kind))
    assert len(tensors) == 16 * 9 + 3  # the blocks' tensors, token_embd, output_norm, output
    for name, (qtype, _) in tensors.items():
        if name.endswith("_norm.weight"):
            assert qtype == T.F32, name
        elif name == "output.weight" and asked != T.BF16:
            assert qtype == T.Q6_K, name
        else:
            assert qtype == asked, name


@pytest.mark.parametrize("kind", COMPUTED)
def test_llama_cpp_computes_what_swtool_reads_from_the_file(exported, tmp_path, kind):
    path = exported("wide", kind)
    ids = [int(t) for t in random_tokens(40, seed=1, vocab=300)]
    ours = forward(load_model(path), ids)[0]
    scale = np.abs(ours).max()
    gap = np.abs(llama_logits(path, ids) - ours).max() / scale
    assert gap < ROUNDED_ACTIVATIONS[kind], gap
    from llama_cpp import llama_cpp as L

    decoded = llama_quantize(path, tmp_path / "decoded.gguf", L.LLAMA_FTYPE_ALL_F32, allow_requantize=True)
    assert {qtype for qtype, _ in read_back(decoded)[1].values()} == {T.F32}
    gap = np.abs(llama_logits(decoded, ids) - ours).max() / scale
    assert gap < DECODED, gap


# what no llama_model_quantize comparison above reaches, on the rules alone
EXPERTS_8 = ModelFacts(n_layers=8, n_gqa=4, n_expert=8)
RULED = ("blk.0.attn_v.weight", "blk.0.attn_k.weight", "blk.0.attn_output.weight", "blk.0.ffn_down_exps.weight")


@pytest.mark.parametrize("kind, pure", [("q4_0", True), ("iq4_xs", True), ("q4_k_m", True), ("q2_k", False),
                                        ("q4_k", False)])
def test_pure_and_swtools_own_types_keep_every_weight_in_the_type(kind, pure):
    """--pure turns every rule off; swtool's q2_k..q5_k are no llama-quantize file type, so even 8 experts
    leave their weights in the type."""
    target = parse_target(kind)
    for name in RULED:
        assert choose_type(name, (256, 256), target, EXPERTS_8, tied_output=False, pure=pure).qtype == target.qtype


@pytest.mark.parametrize("kind, without, with_imatrix", [("iq4_nl", T.Q5_K, T.IQ4_NL), ("iq4_xs", T.Q5_K, T.IQ4_XS),
                                                         ("q4_0", T.Q4_0, T.Q4_1), ("q5_0", T.Q5_0, T.Q5_1)])
def test_first_ffn_down_rules_read_the_importance_matrix(kind, without, with_imatrix):
    """llama.cpp's rules for ffn_down of the first n/8 layers, with and without an importance matrix
    (swtool has none yet: issue 18); the layers after them keep the type."""
    target, model = parse_target(kind), ModelFacts(n_layers=16)
    for layer, has_imatrix, expected in ((1, False, without), (1, True, with_imatrix), (2, True, target.qtype)):
        choice = choose_type(f"blk.{layer}.ffn_down.weight", (256, 256), target, model, tied_output=False,
                             has_imatrix=has_imatrix)
        assert choice.qtype == expected, (layer, has_imatrix)


def test_model_facts_of_the_hyperparameters():
    assert ModelFacts.of("llama", 32, 32, 8, 8) == ModelFacts(32, n_gqa=4, n_expert=8, is_70b=False)
    assert ModelFacts.of("llama", 80, 64, 8).is_70b and not ModelFacts.of("llama", 80, 64, 64).is_70b
    assert not ModelFacts.of("llama", 80, 64, 8, 8).is_70b  # llama.cpp sizes 8 experts as a Mixtral
    assert ModelFacts.of("olmo", 80, 64, 64).is_70b  # llama.cpp's olmo: 80 layers are a 70B, whatever the heads
    assert ModelFacts.of("llama", 16, 9, None) == ModelFacts(16, n_gqa=1)  # no head_count_kv: no GQA

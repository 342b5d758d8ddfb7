"""Every supported architecture family against transformers: logits, and a planted super weight found.

Each case is a tiny random model that transformers itself builds and saves
(fixtures/tiny.py). Adding a family is adding a case here and an entry in
tiny.FAMILIES.
"""

from dataclasses import dataclass

import numpy as np
import pytest

from swtool.detect import Settings, scan
from swtool.forward import forward
from swtool.model import load_model
from swtool.tokenizer import DEFAULT_PROMPT, encode
from fixtures.tiny import Plant, random_tokens, reference_logits


@dataclass(frozen=True)
class Case:
    family: str  # key of tiny.FAMILIES
    down_proj: str  # the Hugging Face name of layer 2's down projection
    gguf_down_proj: str = "blk.2.ffn_down.weight"
    plant: Plant = Plant(2, 41, 101)
    expert: int | None = None  # mixtures: the expert the catalog must name (None: a dense MLP)
    # share of the super activation that may survive zeroing the weight. After a post-MLP norm
    # (Gemma 2/3, OLMo 2) the intact row is ~sqrt(hidden) * gain, and without the weight the row's
    # ordinary output z (~1 once normalised) still passes the gain: ~|z| / sqrt(64) = |z| / 8 is left
    sa_left: float = 0.01
    # the logits test's initializer_range: GELU MLPs need pre-activations past ~1, where tanh-GELU
    # and erf-GELU part, and the default 0.02 leaves them near 0.1 (Gemma's fixture is wide already)
    init: float | None = None


CASES = [
    Case("llama", "model.layers.2.mlp.down_proj.weight"),
    Case("llama3", "model.layers.2.mlp.down_proj.weight"),
    Case("llama-bias", "model.layers.2.mlp.down_proj.weight"),
    Case("llama-linear", "model.layers.2.mlp.down_proj.weight"),
    Case("llama-dynamic", "model.layers.2.mlp.down_proj.weight"),
    Case("mistral", "model.layers.2.mlp.down_proj.weight"),
    Case("qwen2", "model.layers.2.mlp.down_proj.weight"),
    # the planted weight sits in expert 2's w2 only; llama.cpp stacks the experts in one tensor
    Case("mixtral", "model.layers.2.block_sparse_moe.experts.2.w2.weight", "blk.2.ffn_down_exps.weight",
         Plant(2, 41, 101, expert=2), expert=2),
    Case("qwen3-moe", "model.layers.2.mlp.experts.2.down_proj.weight", "blk.2.ffn_down_exps.weight",
         Plant(2, 41, 101, expert=2), expert=2),
    Case("qwen2-moe", "model.layers.2.mlp.experts.2.down_proj.weight", "blk.2.ffn_down_exps.weight",
         Plant(2, 41, 101, expert=2), expert=2),
    Case("olmoe", "model.layers.2.mlp.experts.2.down_proj.weight", "blk.2.ffn_down_exps.weight",
         Plant(2, 41, 101, expert=2), expert=2),
    Case("phi3", "model.layers.2.mlp.down_proj.weight"),
    Case("phi3-longrope", "model.layers.2.mlp.down_proj.weight"),
    Case("phi3-partial-longrope", "model.layers.2.mlp.down_proj.weight"),
    Case("stablelm", "model.layers.2.mlp.down_proj.weight"),
    Case("stablelm-parallel", "model.layers.2.mlp.down_proj.weight"),
    Case("granite", "model.layers.2.mlp.down_proj.weight"),
    Case("starcoder2", "model.layers.2.mlp.c_proj.weight", init=0.1),
    Case("gpt-neox", "gpt_neox.layers.2.mlp.dense_4h_to_h.weight", init=0.1),
    Case("gpt-neox-sequential", "gpt_neox.layers.2.mlp.dense_4h_to_h.weight", init=0.1),
    # Conv1D: the tensor is stored [in, out]; row/col still mean output/input channel
    Case("gpt2", "transformer.h.2.mlp.c_proj.weight", init=0.1),
    Case("gpt2-untied", "transformer.h.2.mlp.c_proj.weight", init=0.1),
    Case("qwen3", "model.layers.2.mlp.down_proj.weight"),
    Case("olmo", "model.layers.2.mlp.down_proj.weight"),
    Case("olmo2", "model.layers.2.mlp.down_proj.weight", sa_left=0.1),
    Case("gemma", "model.layers.2.mlp.down_proj.weight"),
    Case("gemma2", "model.layers.2.mlp.down_proj.weight", sa_left=0.1),
    Case("gemma3", "model.layers.2.mlp.down_proj.weight", sa_left=0.1),
]
IDS = [case.family for case in CASES]
DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_logits_match_transformers(tiny_factory, case, dtype):
    wide = {} if case.init is None else {"initializer_range": case.init}
    directory, _ = tiny_factory(case.family, dtype, **wide)
    tokens = random_tokens(19, seed=3)  # longer than the sliding windows and short contexts of the cases
    expected = reference_logits(directory, tokens)
    got = forward(load_model(directory), tokens)[0]
    assert got.shape == expected.shape
    # measured gap: at most 2.7e-6 * max (gemma3, float16), 0.2e-6 to 0.8e-6 * max for the others. Scaled
    # by the logits alone, not by at least 1: Granite's logits_scaling leaves them below 0.1, where a
    # floor of 1 would let its norm epsilon read 10x off pass
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def stored_element(directory, name, index):
    """One element of a tensor as stored in the checkpoint, read with the safetensors library (torch)."""
    from safetensors import safe_open

    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)[tuple(index)].float().item()
    raise KeyError(name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_planted_super_weight_is_found(tiny_factory, case, dtype):
    directory, _ = tiny_factory(case.family, dtype, plants=(case.plant,))
    model = load_model(directory)
    found, report = scan(model, encode(model.directory, DEFAULT_PROMPT), Settings(DEFAULT_PROMPT))
    assert [(sw.layer, sw.row, sw.col) for sw in found] == [(case.plant.layer, case.plant.row, case.plant.col)]
    sw = found[0]
    assert (sw.tensor, sw.gguf_tensor) == (case.down_proj, case.gguf_down_proj)
    assert sw.expert == case.expert
    assert sw.value == pytest.approx(case.plant.value, rel=1e-2) and sw.rank == 1
    # the catalog's tensor_index finds the same element in the file through safetensors' own reader
    assert stored_element(directory, sw.tensor, sw.tensor_index) == sw.value
    assert sw.dtype == DTYPE_NAMES[dtype]
    v = sw.verification
    assert v["verified"] and v["super_activation_removed"] < case.sa_left * v["super_activation_intact"]
    assert report["profile"][case.plant.layer]["down_proj_output"]["channel"] == case.plant.row
    assert report["profile"][case.plant.layer]["down_proj_input"]["channel"] == case.plant.col


def test_llama_cpp_names_from_a_partial_map_equal_the_full_map():
    """Architecture.gguf_name builds gguf-py's name map only up to the block asked for, then whole:
    every name must be the one the full map gives, in any order of asking."""
    import gguf

    from swtool.arch import architecture_for

    config = {"model_type": "llama", "num_hidden_layers": 6, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-5}
    arch = architecture_for(config)
    full = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 6)
    names = ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.5.mlp.up_proj.weight", "model.embed_tokens.weight", "lm_head.weight",
             "model.layers.3.post_attention_layernorm.weight", "model.norm.weight"]
    for name in names:
        assert arch.gguf_name(name) == full.get_name(name, try_suffixes=(".weight", ".bias")), name

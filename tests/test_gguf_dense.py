"""GGUF export of the dense families beyond Llama, past what the converter-equality harness
(test_gguf_converter.py) holds: super-weight records and protection in each family, GPT-2's
Conv1D coordinates, and the settings llama.cpp's converter drops but swtool keeps or refuses.

The models are tiny random ones (fixtures/tiny.py) with SmolLM2's vocabulary, whose
pre-tokenizer llama.cpp knows; transformers computes their reference logits.
"""

import json
import shutil

import numpy as np
import pytest

from fixtures.gguf_compare import dequantized, read_contents
from swtool.errors import SwtoolError
from swtool.gguf_export import ExportOptions, export
from fixtures.tiny import Plant, build_tiny, random_tokens, torch_logits

pytestmark = [pytest.mark.real, pytest.mark.llama_cpp]

PLANT = Plant(layer=1, row=3, col=5)
FAMILIES = ["olmo", "olmo2", "granite", "starcoder2", "stablelm", "gpt-neox", "gpt2"]


def smollm2_model(directory, smollm2, family, plants=(), **overrides):
    """A tiny `family` model with SmolLM2's vocabulary in `directory`; returns the torch model."""
    config = json.loads((smollm2 / "config.json").read_text())
    model = build_tiny(directory, family, "float32", plants=plants, vocab_size=config["vocab_size"],
                       bos_token_id=config["bos_token_id"], eos_token_id=config["eos_token_id"], **overrides)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(smollm2 / name, directory / name)
    return model


def scan(directory, out):
    from swtool.catalog import scan_catalog, write_catalog
    from swtool.detect import Settings
    from swtool.model import load_model
    from swtool.tokenizer import DEFAULT_PROMPT

    catalog, _ = scan_catalog(load_model(directory), DEFAULT_PROMPT, Settings(prompt=DEFAULT_PROMPT), progress=False)
    write_catalog(catalog, out)
    return catalog


def gguf_keys(path):
    """{key: value} of the GGUF at `path` (fixtures/gguf_compare.py: held to gguf-py's reading, without
    gguf-py's seconds of decoding the vocabulary element by element)."""
    return {name: value for name, (_, value) in read_contents(path).keys.items()}


def tensor_type(path, name):
    return read_contents(path).tensors[name][1]


@pytest.mark.parametrize("family", FAMILIES)
def test_super_weight_is_recorded_and_kept_in_every_family(smollm2, tmp_path, family):
    """scan finds the planted weight; export --type q4_0 --catalog records it in swtool.* and stores its
    tensor in Q8_0, where it keeps its value at [row = output, col = input] (GPT-2's Conv1D holds it
    at c_proj.weight[col, row])."""
    model = smollm2_model(tmp_path / "hf", smollm2, family, plants=[PLANT])
    catalog = scan(tmp_path / "hf", tmp_path / "catalog.json")
    found = {(sw["layer"], sw["row"], sw["col"]): sw for sw in catalog["super_weights"]}
    assert (PLANT.layer, PLANT.row, PLANT.col) in found
    export(tmp_path / "hf", tmp_path / "q4_0.gguf", ExportOptions("q4_0", catalog=str(tmp_path / "catalog.json"),
                                                                  progress=False))
    keys = gguf_keys(tmp_path / "q4_0.gguf")
    records = list(zip(keys["swtool.super_weights.layer"], keys["swtool.super_weights.row"],
                       keys["swtool.super_weights.col"], keys["swtool.super_weights.tensor"]))
    assert (PLANT.layer, PLANT.row, PLANT.col, "blk.1.ffn_down.weight") in records
    assert tensor_type(tmp_path / "q4_0.gguf", "blk.1.ffn_down.weight") == "Q8_0"
    assert tensor_type(tmp_path / "q4_0.gguf", "blk.0.ffn_down.weight") == "Q4_0"
    down = dequantized(tmp_path / "q4_0.gguf", "blk.1.ffn_down.weight")  # [out, in], as gguf-py dequantizes it
    planted = down_projection(model, family)[PLANT.row, PLANT.col]
    assert planted == PLANT.value
    assert abs(down[PLANT.row, PLANT.col] - planted) <= np.abs(down[PLANT.row]).max() / 127  # one Q8_0 step


def down_projection(model, family):
    """Layer PLANT.layer's down projection of the torch model as W [out, in]."""
    if family == "gpt2":
        return model.transformer.h[PLANT.layer].mlp.c_proj.weight.detach().numpy().T  # Conv1D: [in, out]
    if family == "gpt-neox":
        return model.gpt_neox.layers[PLANT.layer].mlp.dense_4h_to_h.weight.detach().numpy()
    mlp = model.model.layers[PLANT.layer].mlp
    return (mlp.c_proj if family == "starcoder2" else mlp.down_proj).weight.detach().numpy()


def test_gpt_neox_export_keeps_a_rope_base_the_converter_drops(smollm2, tmp_path):
    """The tiny GPT-NeoX rotates with base 1000; GPTNeoXModel writes no rope.freq_base, so llama.cpp
    would take 10000. swtool's export writes it: llama.cpp and swtool's reading of the file both
    give transformers' logits, which base 10000 would change by far more than the tolerance (a
    wider init and 40 tokens, so that attention and positions weigh in the logits)."""
    from fixtures import llama_oracle

    from swtool.forward import forward
    from swtool.model import load_model

    model = smollm2_model(tmp_path / "hf", smollm2, "gpt-neox", initializer_range=0.1)
    export(tmp_path / "hf", tmp_path / "f32.gguf", ExportOptions("f32", progress=False))
    assert gguf_keys(tmp_path / "f32.gguf")["gptneox.rope.freq_base"] == 1000.0
    tokens = [int(t) for t in random_tokens(40, seed=3, vocab=model.config.vocab_size)]
    expected = torch_logits(model, tokens)
    tolerance = 2e-3 * np.abs(expected).max()  # llama.cpp keeps its KV cache in f16
    llm = llama_oracle.load(tmp_path / "f32.gguf", n_ctx=64)
    llm.eval(tokens)
    assert np.abs(np.asarray(llm.scores[:len(tokens)]) - expected).max() <= tolerance
    assert np.abs(forward(load_model(tmp_path / "f32.gguf"), tokens)[0] - expected).max() <= 2e-5 * np.abs(expected).max()
    other_base = smollm2_model(tmp_path / "base", smollm2, "gpt-neox", initializer_range=0.1, rotary_emb_base=10000.0)
    assert np.abs(torch_logits(other_base, tokens) - expected).max() > 3 * tolerance


@pytest.mark.parametrize("setting", [dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_weights=False)])
def test_gpt2_export_refuses_attention_scaling_llama_cpp_lacks(smollm2, tmp_path, setting):
    smollm2_model(tmp_path / "hf", smollm2, "gpt2", **setting)
    with pytest.raises(SwtoolError, match="llama.cpp's gpt2 architecture scales attention by 1/sqrt"):
        export(tmp_path / "hf", tmp_path / "f32.gguf", ExportOptions("f32", progress=False))
    assert not (tmp_path / "f32.gguf").exists()

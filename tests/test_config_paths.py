"""Model configurations no other test reads: a GGUF with linear RoPE scaling, and Qwen2 configs as the
Hub spells them (use_sliding_window false with a sliding_window set). Logits against transformers."""

import json
import shutil

import gguf
import numpy as np
import torch
import transformers

from fixtures.hf_to_gguf import write_gguf
from swtool.forward import forward
from swtool.model import load_model
from fixtures.tiny import random_tokens, torch_logits

TOKENS = random_tokens(40, seed=7)  # well past the 16-position context of the linear-RoPE model


def rope_scaling_keys(kind, factor):
    """`llama.rope.scaling.*` as convert_hf_to_gguf writes them (gguf-py's key names)."""
    string, number = gguf.GGUFValueType.STRING, gguf.GGUFValueType.FLOAT32
    return [(gguf.Keys.Rope.SCALING_TYPE.format(arch="llama"), kind, string, None),
            (gguf.Keys.Rope.SCALING_FACTOR.format(arch="llama"), factor, number, None)]


def test_gguf_with_linear_rope_scaling_gives_transformers_logits(tiny_factory, tmp_path):
    """rope_scaling {"rope_type": "linear", "factor": 4} travels as llama.rope.scaling.type/factor;
    the same file without those keys is the unscaled model, far from transformers."""
    directory, model = tiny_factory("llama-linear")
    config = json.loads((directory / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 4.0
    scaled = write_gguf(directory, tmp_path / "linear.gguf", "f32", extra=rope_scaling_keys("linear", 4.0))
    reader = gguf.GGUFReader(scaled)
    assert reader.fields["llama.rope.scaling.type"].contents() == "linear"
    expected = torch_logits(model, TOKENS)
    tolerance = 2e-6 * np.abs(expected).max()  # measured 5.2e-7 x max
    got = forward(load_model(scaled), TOKENS)[0]
    assert np.abs(got - expected).max() < tolerance
    unscaled = forward(load_model(write_gguf(directory, tmp_path / "plain.gguf", "f32")), TOKENS)[0]
    assert np.abs(unscaled - expected).max() > 10 * tolerance  # so the scaling was read and applied


# --- Qwen2 as the Hub spells it ------------------------------------------------------------------------------

def qwen2_copy(tiny_factory, tmp_path, **hub_keys):
    """The tiny Qwen2 with its config.json as Qwen2/Qwen2.5 on the Hub have it: no layer_types, and
    use_sliding_window / sliding_window / max_window_layers as given."""
    directory, _ = tiny_factory("qwen2")
    copy = tmp_path / "qwen2"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    config.pop("layer_types", None)
    config.update(hub_keys)
    (copy / "config.json").write_text(json.dumps(config))
    return directory, copy


def transformers_logits(directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return torch_logits(model, TOKENS)


def test_qwen2_hub_window_is_off_when_use_sliding_window_is_false(tiny_factory, tmp_path):
    """Qwen2.5-0.5B's config: use_sliding_window false, sliding_window 32768, max_window_layers 21;
    here a 5-token window from layer 1 that transformers ignores, and so must swtool."""
    original, copy = qwen2_copy(tiny_factory, tmp_path, use_sliding_window=False, sliding_window=5,
                                max_window_layers=1)
    expected = transformers_logits(copy)
    got = forward(load_model(copy), TOKENS)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max())  # measured 2.6e-7 x max
    np.testing.assert_allclose(got, forward(load_model(original), TOKENS)[0], rtol=0, atol=1e-6)


def test_qwen2_window_slides_from_max_window_layers(tiny_factory, tmp_path):
    """use_sliding_window true without layer_types: layers from max_window_layers on see 5 tokens."""
    original, copy = qwen2_copy(tiny_factory, tmp_path, use_sliding_window=True, sliding_window=5,
                                max_window_layers=2)
    expected = transformers_logits(copy)
    tolerance = 2e-6 * np.abs(expected).max()  # measured 2.7e-7 x max
    got = forward(load_model(copy), TOKENS)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)
    assert np.abs(got - forward(load_model(original), TOKENS)[0]).max() > 10 * tolerance  # the window mattered
    every_layer = qwen2_copy(tiny_factory, tmp_path / "all", use_sliding_window=True, sliding_window=5,
                             max_window_layers=0)[1]
    assert np.abs(got - forward(load_model(every_layer), TOKENS)[0]).max() > 10 * tolerance  # and where it starts

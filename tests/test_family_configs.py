"""Config spellings of Qwen3, Gemma and Gemma 2/3 found on the Hub read as transformers reads them.

tests/test_families.py checks each family as transformers 5 saves it. Checkpoints on
the Hub were often saved by older versions: Gemma 1 says "gelu" (meaning tanh-GELU),
Gemma 2 has no layer_types, Gemma 3 spells its two RoPEs rope_theta /
rope_local_base_freq / rope_scaling with a sliding_window_pattern. Each rewritten
config.json is loaded by both transformers and swtool.
"""

import json
import shutil

import numpy as np
import pytest

from swtool.errors import SwtoolError
from swtool.forward import forward
from swtool.model import load_model
from fixtures.tiny import random_tokens, reference_logits

TOKENS = random_tokens(19, seed=3)  # past the tiny sliding windows (5)


def rewritten(tiny_factory, family, tmp_path, edit):
    """A copy of the tiny float32 `family` model whose config.json went through edit(config)."""
    directory, _ = tiny_factory(family, "float32")
    copy = tmp_path / family
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return directory, copy


def assert_same_as_transformers_and_original(original, copy):
    got = forward(load_model(copy), TOKENS)[0]
    expected = reference_logits(copy, TOKENS)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())  # gap <= 2.5e-6 x max
    np.testing.assert_allclose(got, forward(load_model(original), TOKENS)[0], rtol=0, atol=1e-6)


def test_gemma_gelu_means_tanh_gelu(tiny_factory, tmp_path):
    """google/gemma-7b's config says hidden_act "gelu"; transformers runs gelu_pytorch_tanh."""
    original, copy = rewritten(tiny_factory, "gemma", tmp_path, lambda c: c.update(hidden_act="gelu"))
    assert_same_as_transformers_and_original(original, copy)


def test_gemma2_without_layer_types_slides_on_even_layers(tiny_factory, tmp_path):
    original, copy = rewritten(tiny_factory, "gemma2", tmp_path, lambda c: c.pop("layer_types"))
    assert_same_as_transformers_and_original(original, copy)


def test_gemma3_hub_spelling_of_its_two_ropes_and_window_pattern(tiny_factory, tmp_path):
    def hub_spelling(config):
        params = config.pop("rope_parameters")
        config.pop("layer_types")
        config.pop("_sliding_window_pattern", None)
        config["sliding_window_pattern"] = 2  # layers 1 and 3 global, as layer_types said
        config["rope_theta"] = params["full_attention"]["rope_theta"]
        config["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        config["rope_scaling"] = {"rope_type": "linear", "factor": params["full_attention"]["factor"]}

    original, copy = rewritten(tiny_factory, "gemma3", tmp_path, hub_spelling)
    assert_same_as_transformers_and_original(original, copy)


def test_qwen3_without_layer_types_slides_from_max_window_layers(tiny_factory, tmp_path):
    """Hub configs (Qwen2.5/Qwen3 era) have no layer_types: the window starts at max_window_layers."""
    original, copy = rewritten(tiny_factory, "qwen3", tmp_path, lambda c: c.pop("layer_types"))
    assert_same_as_transformers_and_original(original, copy)


def test_qwen3_window_is_off_unless_use_sliding_window(tiny_factory, tmp_path):
    """Hub configs often name a sliding_window with use_sliding_window false: transformers then ignores it."""
    def window_off(config):
        config.pop("layer_types")
        config["use_sliding_window"] = False

    original, copy = rewritten(tiny_factory, "qwen3", tmp_path, window_off)
    got = forward(load_model(copy), TOKENS)[0]
    expected = reference_logits(copy, TOKENS)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())  # gap 3.9e-7 x max
    assert not np.allclose(got, forward(load_model(original), TOKENS)[0], atol=1e-3)  # the window mattered


def test_bidirectional_gemma_is_refused(tiny_factory, tmp_path):
    _, copy = rewritten(tiny_factory, "gemma3", tmp_path, lambda c: c.update(use_bidirectional_attention=True))
    with pytest.raises(SwtoolError, match="use_bidirectional_attention"):
        load_model(copy)

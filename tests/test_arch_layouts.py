"""Family layouts beyond the parametrised logits test: Conv1D weights stored transposed,
the name and config variants of Hub checkpoints, and where observers look.

transformers is the oracle throughout; the checkpoint variants are written with
the safetensors library itself, not with swtool's writer.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from swtool.arch import architecture_for
from swtool.detect import Settings, scan
from swtool.errors import SwtoolError
from swtool.forward import Edit, ScaleElements, World, forward
from swtool.model import load_model
from swtool.tokenizer import DEFAULT_PROMPT, encode
from fixtures.tiny import Plant, random_tokens, reference_logits


def tolerance(expected):
    """Against transformers: measured gaps at most 8.7e-7 x max |expected| over these layouts, logits and
    tap points alike (a relative floor: hidden states are small in these tiny models)."""
    return 1e-5 * np.abs(expected).max()


def rewrite(directory, out, rename=lambda name: name, config=None):
    """A copy of a float32 checkpoint with renamed tensors and/or an edited config.json."""
    shutil.copytree(directory, out)
    tensors = load_file(directory / "model.safetensors")
    save_file({rename(name): t for name, t in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        (out / "config.json").write_text(json.dumps(config(json.loads((directory / "config.json").read_text()))))
    return out


# --- GPT-2's Conv1D: W = stored.T --------------------------------------------------------

def test_gpt2_editing_a_conv1d_weight_matches_transformers(tiny_factory):
    """Edit(c_proj, row j, col m) scales output j's weight from input m: c_proj.weight[m, j] as stored."""
    directory, _ = tiny_factory("gpt2", "float32")
    tokens = random_tokens(9)
    name, row, col, factor = "transformer.h.1.mlp.c_proj.weight", 3, 17, 80.0  # large enough to matter
    edited = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        edited.transformer.h[1].mlp.c_proj.weight[col, row] *= factor
        expected = edited(torch.tensor([list(tokens)])).logits[0].numpy()
    loaded = load_model(directory)
    intact = forward(loaded, tokens)[0]
    assert np.abs(intact - expected).max() > 100 * tolerance(expected)  # the edit shows at this tolerance
    # as a weight transform (decode + BLAS, the transform sees W = stored.T) ...
    by_transform = forward(loaded, tokens, transforms=[ScaleElements([Edit(name, row, col, factor)])])[0]
    np.testing.assert_allclose(by_transform, expected, rtol=0, atol=tolerance(expected))
    # ... and as a world beside the intact model (fused kernel on the stored bits, then the edit)
    worlds = forward(loaded, tokens, worlds=[World("intact"), World("edited", (Edit(name, row, col, factor),))])
    np.testing.assert_allclose(worlds[1], expected, rtol=0, atol=tolerance(expected))
    np.testing.assert_allclose(worlds[0], intact, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpt2_long_input_through_decode_and_blas_matches_transformers(tiny_factory, dtype):
    """Past kernels.FUSED_MAX_ROWS rows, transposed weights are decoded column-wise and go through BLAS."""
    from swtool import kernels

    directory, _ = tiny_factory("gpt2", dtype)
    tokens = random_tokens(kernels.FUSED_MAX_ROWS + 30, seed=5)
    expected = reference_logits(directory, tokens)
    np.testing.assert_allclose(forward(load_model(directory), tokens)[0], expected, rtol=0,
                               atol=tolerance(expected))


def test_gpt2_hub_names_without_transformer_prefix(tiny_factory, tmp_path):
    """openai-community/gpt2 names its tensors h.0.attn.c_attn.weight, wte.weight, ...: same model."""
    plant = Plant(2, 41, 101)
    directory, _ = tiny_factory("gpt2", "float32", plants=(plant,))
    hub = rewrite(directory, tmp_path / "hub", rename=lambda name: name.removeprefix("transformer."))
    assert "wte.weight" in load_file(hub / "model.safetensors")
    tokens = random_tokens(19, seed=3)
    expected = reference_logits(directory, tokens)
    np.testing.assert_allclose(forward(load_model(hub), tokens)[0], expected, rtol=0, atol=tolerance(expected))
    model = load_model(hub)
    found, _ = scan(model, encode(model.directory, DEFAULT_PROMPT), Settings(DEFAULT_PROMPT))
    assert [(sw.tensor, sw.gguf_tensor, sw.row, sw.col, sw.tensor_index) for sw in found] == [
        ("h.2.mlp.c_proj.weight", "blk.2.ffn_down.weight", plant.row, plant.col, [plant.col, plant.row])]


def test_gpt2_prompt_longer_than_its_positions_is_a_clear_error(tiny_factory):
    directory, _ = tiny_factory("gpt2", "float32")
    model = load_model(directory)
    with pytest.raises(SwtoolError, match="learned positions for 256"):
        forward(model, random_tokens(257))


# --- GPT-NeoX / Pythia as the Hub has it ---------------------------------------------------

def test_pythia_hub_config_and_lm_head_name(tiny_factory, tmp_path):
    """Pythia's config.json says rotary_pct / rotary_emb_base (no rope_parameters); the head may be lm_head."""
    directory, _ = tiny_factory("gpt-neox", "float32")  # rotary_pct 0.5, base 1000

    def hub_config(config):
        params = config.pop("rope_parameters")
        config["rotary_pct"], config["rotary_emb_base"] = params["partial_rotary_factor"], params["rope_theta"]
        return config

    hub = rewrite(directory, tmp_path / "hub", rename=lambda n: "lm_head.weight" if n == "embed_out.weight" else n,
                  config=hub_config)
    tokens = random_tokens(19, seed=3)
    expected = reference_logits(directory, tokens)
    np.testing.assert_allclose(reference_logits(hub, tokens), expected, rtol=0, atol=1e-6)  # transformers agrees
    np.testing.assert_allclose(forward(load_model(hub), tokens)[0], expected, rtol=0, atol=tolerance(expected))


# --- Phi-3 as the Hub has it -------------------------------------------------------------------

@pytest.mark.parametrize("rope_type", ["su", "longrope"])
def test_phi3_hub_rope_scaling_spelling(tiny_factory, tmp_path, rope_type):
    """Phi-3-mini-128k's config.json: rope_theta + rope_scaling {type, short/long_factor}, the trained
    context only at top level, no factor: it is max_position_embeddings / original_max_position_embeddings."""
    directory, _ = tiny_factory("phi3-longrope", "float32")

    def hub_config(config):
        params = config.pop("rope_parameters")
        config["rope_theta"] = params["rope_theta"]
        config["rope_scaling"] = {"type": rope_type, "short_factor": params["short_factor"],
                                  "long_factor": params["long_factor"]}
        return config

    hub = rewrite(directory, tmp_path / "hub", config=hub_config)
    for n_tokens in (12, 19):  # within the 16-token trained context (short factors) and past it (long)
        tokens = random_tokens(n_tokens, seed=3)
        expected = reference_logits(directory, tokens)
        if rope_type == "longrope":  # transformers 5.24 itself rejects "su" here (it renames su only after
            # copying original_max_position_embeddings into the rope parameters, which it does for longrope)
            np.testing.assert_allclose(reference_logits(hub, tokens), expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(forward(load_model(hub), tokens)[0], expected, rtol=0, atol=tolerance(expected))


# --- observation points, against transformers' own modules ------------------------------------

# family -> (path to layer i's down projection module, number of final hidden states that are pre-norm)
DOWN_MODULES = {
    "phi3": lambda m, i: m.model.layers[i].mlp.down_proj,
    "stablelm-parallel": lambda m, i: m.model.layers[i].mlp.down_proj,
    "granite": lambda m, i: m.model.layers[i].mlp.down_proj,
    "starcoder2": lambda m, i: m.model.layers[i].mlp.c_proj,
    "gpt-neox": lambda m, i: m.gpt_neox.layers[i].mlp.dense_4h_to_h,
    "gpt2": lambda m, i: m.transformer.h[i].mlp.c_proj,
}


@pytest.mark.parametrize("family", sorted(DOWN_MODULES))
def test_observers_see_what_transformers_computes(tiny_factory, family):
    """down_in / down_out are the down projection's input and raw output; resid is the block's output."""
    directory, _ = tiny_factory(family, "float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokens = random_tokens(11, seed=4)
    seen = {}

    class Keep:
        def observe(self, point, layer, x):
            seen[(point, layer)] = x[0].copy()

    forward(load_model(directory), tokens, observers=[Keep()])
    captured = {}
    hooks = [DOWN_MODULES[family](model, i).register_forward_hook(
        lambda mod, inp, out, i=i: captured.update({("down_in", i): inp[0][0].numpy(), ("down_out", i): out[0].numpy()}))
        for i in range(4)]
    with torch.no_grad():
        hidden = model(torch.tensor([list(tokens)]), output_hidden_states=True).hidden_states
    for hook in hooks:
        hook.remove()
    for layer in range(4):
        for point in ("down_in", "down_out"):
            expected = captured[(point, layer)]
            np.testing.assert_allclose(seen[(point, layer)], expected, rtol=0, atol=tolerance(expected))
        if layer < 3:  # transformers' last hidden state is after the final norm
            expected = hidden[layer + 1][0].numpy()
            np.testing.assert_allclose(seen[("resid", layer)], expected, rtol=0, atol=tolerance(expected))
    # the parallel/sequential residual split: resid - resid_mid is the MLP's contribution
    scale = json.loads((directory / "config.json").read_text()).get("residual_multiplier", 1.0)
    # float32 rounding of the residual sum only: measured gap 4.0e-8 x max |resid| (under one ulp)
    np.testing.assert_allclose(seen[("resid", 1)] - seen[("resid_mid", 1)], scale * seen[("down_out", 1)],
                               rtol=0, atol=5e-7 * np.abs(seen[("resid", 1)]).max())


# --- llama.cpp names ------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["phi3", "stablelm", "granite", "starcoder2", "gpt-neox", "gpt2-untied"])
def test_every_tensor_has_a_llama_cpp_name(tiny_factory, family):
    """gguf-py's own name map knows every tensor swtool reads, each under its own name, except
    StableLM's per-head q/k norms, which llama.cpp stacks into one tensor per layer."""
    directory, _ = tiny_factory(family, "float32")
    arch = load_model(directory).arch
    names = {name: arch.gguf_name(name) for name in arch.tensor_shapes()}  # raises for an unknown tensor
    assert len(set(names.values())) == len(names) - _stacked_per_head_norms(arch)
    assert names[arch.down_proj_name(2)] == "blk.2.ffn_down.weight"


def _stacked_per_head_norms(arch):
    """How many names collapse because llama.cpp stacks StableLM's per-head q/k norms into one tensor each."""
    if not getattr(arch, "qk_norm", False):
        return 0
    return arch.n_layers * ((arch.heads.n - 1) + (arch.heads.n_kv - 1))


def test_gpt2_config_spelling_reaches_the_architecture():
    """GPT-2's n_layer / n_embd / n_head / n_positions / n_inner are what transformers reads, not the generic keys."""
    config = transformers.GPT2Config(n_layer=3, n_embd=48, n_head=4, n_positions=32, n_inner=None,
                                     vocab_size=100).to_dict()
    config["intermediate_size"] = 999  # GPT2Config ignores it; so must swtool
    arch = architecture_for(config)
    assert (arch.n_layers, arch.hidden_size, arch.heads.n, arch.n_positions, arch.intermediate_size) == \
        (3, 48, 4, 32, 4 * 48)

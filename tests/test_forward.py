"""swtool's streaming forward pass against transformers on tiny random models of each family."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from swtool.forward import Edit, ScaleElements, World, forward
from swtool.model import load_model
from fixtures.tiny import random_tokens, reference_logits


def test_sharded_checkpoint_matches_single_file(tiny_factory):
    single, _ = tiny_factory("llama", "bfloat16")
    sharded, _ = tiny_factory("llama", "bfloat16", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    tokens = random_tokens(7)
    np.testing.assert_array_equal(forward(load_model(sharded), tokens), forward(load_model(single), tokens))


def test_single_safetensors_file_path_with_config_beside_it(tiny_factory, tmp_path):
    directory, _ = tiny_factory("llama", "float32")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(directory / name, tmp_path / ("weights.safetensors" if name.endswith("safetensors") else name))
    tokens = random_tokens(6)
    np.testing.assert_array_equal(forward(load_model(tmp_path / "weights.safetensors"), tokens),
                                  forward(load_model(directory), tokens))


def test_classic_rope_scaling_spelling_reads_like_rope_parameters(tiny_factory, tmp_path):
    """Hub checkpoints spell Llama 3 RoPE as rope_theta + rope_scaling; transformers 5 writes rope_parameters."""
    directory, _ = tiny_factory("llama3", "float32")
    shutil.copytree(directory, tmp_path / "classic")
    config = json.loads((directory / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
    (tmp_path / "classic" / "config.json").write_text(json.dumps(config))
    tokens = random_tokens(30)  # past original_max_position_embeddings (16), where llama3 scaling matters
    np.testing.assert_array_equal(forward(load_model(tmp_path / "classic"), tokens),
                                  forward(load_model(directory), tokens))
    np.testing.assert_allclose(forward(load_model(directory), tokens)[0], reference_logits(directory, tokens),
                               atol=1e-5 * np.abs(reference_logits(directory, tokens)).max())  # gap 2.6e-7 x max


def test_zeroing_a_weight_matches_transformers_with_that_weight_zeroed(tiny_factory, tmp_path):
    directory, model = tiny_factory("qwen2", "float32")
    tokens = random_tokens(9)
    name, row, col = "model.layers.1.mlp.down_proj.weight", 3, 17
    ablated = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        ablated.model.layers[1].mlp.down_proj.weight[row, col] = 0.0
        expected = ablated(torch.tensor([list(tokens)])).logits[0].numpy()
    loaded = load_model(directory)
    by_transform = forward(loaded, tokens, transforms=[ScaleElements([Edit(name, row, col, 0.0)])])[0]
    tolerance = 1e-5 * np.abs(expected).max()  # measured gap 2.7e-7 x max
    np.testing.assert_allclose(by_transform, expected, atol=tolerance)
    # the same edit as a world, side by side with the intact model, in one pass
    worlds = forward(loaded, tokens, worlds=[World("intact"), World("zeroed", (Edit(name, row, col, 0.0),))])
    np.testing.assert_allclose(worlds[1], expected, atol=tolerance)
    np.testing.assert_allclose(worlds[0], forward(loaded, tokens)[0], atol=1e-6)
    assert not np.allclose(worlds[0], worlds[1], atol=1e-6)


def test_observers_see_down_proj_input_and_output(tiny_factory):
    directory, model = tiny_factory("llama", "float32")
    tokens = random_tokens(5)
    seen = {}

    class Keep:
        def observe(self, point, layer, x):
            seen[(point, layer)] = x.copy()

    forward(load_model(directory), tokens, observers=[Keep()])
    captured = {}
    hooks = [model.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda mod, inp, out: captured.update(x=inp[0][0].detach().numpy(), y=out[0].detach().numpy()))]
    with torch.no_grad():
        model.float()(torch.tensor([list(tokens)]))
    for h in hooks:
        h.remove()
    for point, key in (("down_in", "x"), ("down_out", "y")):  # measured gaps 6.6e-7 and 4.3e-7 x max
        np.testing.assert_allclose(seen[(point, 1)][0], captured[key], atol=5e-6 * np.abs(captured[key]).max())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_long_input_through_decode_and_blas_matches_transformers(tiny_factory, family):
    """Past kernels.FUSED_MAX_ROWS token rows the pass decodes weights and calls BLAS instead."""
    from swtool import kernels

    directory, _ = tiny_factory(family, "bfloat16")
    tokens = random_tokens(kernels.FUSED_MAX_ROWS + 30, seed=5)
    expected = reference_logits(directory, tokens)
    got = forward(load_model(directory), tokens)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())  # gap 3.7e-7 x max


# --- attention over long inputs (query slices) ------------------------------------------

@pytest.mark.parametrize("n_tokens, window, softcap", [(300, None, None), (300, 70, None), (257, None, 30.0),
                                                       (128, None, None)])
def test_sliced_attention_is_torch_attention(n_tokens, window, softcap):
    """ops.attention cuts inputs longer than QUERY_BLOCK into query slices against the keys each
    slice can see; torch's scaled_dot_product_attention on the full masked matrix agrees."""
    from swtool import ops

    rng = np.random.default_rng(n_tokens)
    q = rng.standard_normal((2, 4, n_tokens, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, n_tokens, 16)).astype(np.float32) * 2
    v = rng.standard_normal((2, 2, n_tokens, 16)).astype(np.float32)
    mask = ops.causal_mask(n_tokens, window)
    got = ops.attention(q, k, v, mask, scale=0.25, softcap=softcap)

    tq, tk, tv = (torch.from_numpy(a).double() for a in (q, k, v))
    tk, tv = tk.repeat_interleave(2, dim=1), tv.repeat_interleave(2, dim=1)  # grouped KV heads
    scores = tq @ tk.transpose(-1, -2) * 0.25
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + torch.from_numpy(mask).double()
    expected = (torch.softmax(scores, dim=-1) @ tv).numpy()
    np.testing.assert_allclose(got, expected, atol=5e-6 * np.abs(expected).max())  # gap 4.9e-7 x max

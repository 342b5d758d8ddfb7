"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) beyond the family cases: both
checkpoint layouts, edits of one expert's weights, routing recomputed per world, the catalog
naming the expert, Qwen2-MoE's shared expert (edits; a super weight in it found, ablated,
evaluated), dense layers and Hub config spellings.

The two layouts are both written by transformers itself: save_pretrained's default
(the Hub's per-expert `block_sparse_moe.experts.E.w2.weight`) and
save_pretrained(save_original_format=False) (transformers 5's stacked
`mlp.experts.down_proj` [experts, hidden, ff]).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer

from swtool.catalog import build_catalog, validate
from swtool.detect import Settings, scan
from swtool.errors import CheckpointError, SwtoolError
from swtool.forward import Edit, ScaleElements, World, forward
from swtool.model import load_model
from swtool.tokenizer import DEFAULT_PROMPT, encode
from fixtures.cli_run import swtool_in_process
from fixtures.tiny import Plant, random_tokens, reference_logits, stacked_copy

PLANT = Plant(2, 41, 101, expert=2)
STACKED_DOWN = "model.layers.{layer}.mlp.experts.down_proj"
PER_EXPERT_DOWN = "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight"


def tensor_names(directory):
    with safe_open(directory / "model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.fixture(params=["per_expert", "stacked"])
def layout(request):
    return request.param


def mixtral_dir(tiny_factory, tmp_path, layout, dtype="float32", plants=()):
    directory, _ = tiny_factory("mixtral", dtype, plants=plants)
    return directory if layout == "per_expert" else stacked_copy(directory, tmp_path / "stacked")


def expert_element(layout, layer, expert, row, col):
    """(tensor name, Edit) for W2[row, col] of one expert in this layout."""
    if layout == "per_expert":
        name = PER_EXPERT_DOWN.format(layer=layer, expert=expert)
    else:
        name = STACKED_DOWN.format(layer=layer)
    return name, Edit(name, row, col, 0.0, expert)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_per_expert_and_stacked_layouts_give_identical_logits(tiny_factory, tmp_path, dtype):
    per_expert, _ = tiny_factory("mixtral", dtype)
    stacked = stacked_copy(per_expert, tmp_path / "stacked")
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in tensor_names(per_expert)
    assert {"model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj",
            "model.layers.0.mlp.gate.weight"} <= tensor_names(stacked)
    assert not any("block_sparse_moe" in name for name in tensor_names(stacked))
    tokens = random_tokens(19, seed=4)
    got_stacked = forward(load_model(stacked), tokens)
    np.testing.assert_array_equal(got_stacked, forward(load_model(per_expert), tokens))
    expected = reference_logits(stacked, tokens)  # transformers reading the stacked layout
    np.testing.assert_allclose(got_stacked[0], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_edits_hit_one_experts_weight_as_transform_and_as_world(tiny_factory, tmp_path, layout):
    """Scale W2[row, col] of expert 1 in layer 1 (x1000) against transformers doing the same; the
    same element of expert 0 gives other logits, so the edit addresses the expert, not just [row, col]."""
    directory = mixtral_dir(tiny_factory, tmp_path, layout)
    tokens = random_tokens(11, seed=6)
    layer, row, col, factor = 1, 5, 17, 1000.0

    def transformers_scaled(expert):
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        with torch.no_grad():
            model.model.layers[layer].mlp.experts.down_proj[expert, row, col] *= factor
            return model(torch.tensor([list(tokens)])).logits[0].numpy()

    expected, other_expert = transformers_scaled(1), transformers_scaled(0)
    name, edit = expert_element(layout, layer, 1, row, col)
    edit = Edit(edit.tensor, row, col, factor, edit.expert)
    loaded = load_model(directory)
    tolerance = 1e-5 * np.abs(expected).max()
    by_transform = forward(loaded, tokens, transforms=[ScaleElements([edit])])[0]
    np.testing.assert_allclose(by_transform, expected, rtol=0, atol=tolerance)
    by_world = forward(loaded, tokens, worlds=[World("intact"), World("scaled", (edit,))])
    np.testing.assert_allclose(by_world[1], expected, rtol=0, atol=tolerance)
    np.testing.assert_allclose(by_world[0], forward(loaded, tokens)[0], rtol=0, atol=1e-6)
    assert np.abs(expected - other_expert).max() > 100 * tolerance  # expert 0's element is another weight


def test_edit_of_a_stacked_tensor_without_its_expert_is_an_error(tiny_factory, tmp_path):
    """Silently editing no expert (or every expert) would be a wrong experiment; say so instead."""
    directory = mixtral_dir(tiny_factory, tmp_path, "stacked")
    edit = Edit(STACKED_DOWN.format(layer=1), 5, 17, 0.0)  # expert missing
    loaded = load_model(directory)
    with pytest.raises(SwtoolError, match="must name its expert"):
        forward(loaded, random_tokens(5), worlds=[World("intact"), World("zeroed", (edit,))])
    with pytest.raises(SwtoolError, match="must name its expert"):
        forward(loaded, random_tokens(5), transforms=[ScaleElements([edit])])


def test_each_world_routes_its_own_tokens(tiny_factory, tmp_path, layout):
    """Zeroing the planted super weight reroutes layer 3 in transformers; the world without it matches."""
    directory = mixtral_dir(tiny_factory, tmp_path, layout, plants=(PLANT,))
    tokens = random_tokens(13, seed=8)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.tensor([list(tokens)])
    with torch.no_grad():
        intact = model(ids, output_router_logits=True)
        model.model.layers[PLANT.layer].mlp.experts.down_proj[PLANT.expert, PLANT.row, PLANT.col] = 0.0
        ablated = model(ids, output_router_logits=True)
    k = model.config.num_experts_per_tok
    routes = [set(map(tuple, out.router_logits[3].topk(k, dim=-1).indices.sort(dim=-1).values.tolist()))
              for out in (intact, ablated)]
    assert routes[0] != routes[1]  # the removed weight changes which experts layer 3 uses

    _, edit = expert_element(layout, PLANT.layer, PLANT.expert, PLANT.row, PLANT.col)
    got = forward(load_model(directory), tokens, worlds=[World("intact"), World("removed", (edit,))])
    for world, expected in enumerate((intact.logits[0].numpy(), ablated.logits[0].numpy())):
        np.testing.assert_allclose(got[world], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_scan_of_stacked_layout_names_the_expert_and_the_stacked_tensor(tiny_factory, tmp_path):
    directory = mixtral_dir(tiny_factory, tmp_path, "stacked", dtype="bfloat16", plants=(PLANT,))
    model = load_model(directory)
    tokens = encode(model.directory, DEFAULT_PROMPT)
    found, report = scan(model, tokens, Settings(DEFAULT_PROMPT))
    assert [(sw.layer, sw.expert, sw.row, sw.col) for sw in found] == [(2, 2, 41, 101)]
    (sw,) = found
    assert (sw.tensor, sw.gguf_tensor) == ("model.layers.2.mlp.experts.down_proj", "blk.2.ffn_down_exps.weight")
    with safe_open(directory / "model.safetensors", "pt") as f:  # the element [expert, row, col] of that tensor
        assert sw.value == f.get_tensor(sw.tensor)[2, 41, 101].float().item() == pytest.approx(PLANT.value, rel=1e-2)
    assert sw.rank == 1 and 0.5 < sw.router_weight <= 1.0
    assert sw.verification["verified"]
    assert report["profile"][2]["down_proj_input"] | {"value": 0} == {"value": 0, "channel": 101, "expert": 2,
                                                                       "token": sw.token}
    catalog = build_catalog(model, DEFAULT_PROMPT, tokens, Settings(DEFAULT_PROMPT), found, report)
    validate(catalog)
    entry = catalog["super_weights"][0]
    assert (entry["expert"], entry["tensor"], entry["row"], entry["col"]) == (2, sw.tensor, 41, 101)


def test_gguf_names_follow_llama_cpp_stacking(tiny_factory):
    """llama.cpp's converter stacks expert E's w1/w2/w3 into blk.N.ffn_{gate,down,up}_exps (gguf-py's name map)."""
    directory, _ = tiny_factory("mixtral", "float32")
    arch = load_model(directory).arch
    assert arch.gguf_name("model.layers.3.block_sparse_moe.experts.1.w2.weight") == "blk.3.ffn_down_exps.weight"
    assert arch.gguf_name("model.layers.3.block_sparse_moe.experts.0.w1.weight") == "blk.3.ffn_gate_exps.weight"
    assert arch.gguf_name("model.layers.3.block_sparse_moe.experts.2.w3.weight") == "blk.3.ffn_up_exps.weight"
    assert arch.gguf_name("model.layers.3.mlp.experts.down_proj") == "blk.3.ffn_down_exps.weight"
    assert arch.gguf_name("model.layers.3.block_sparse_moe.gate.weight") == "blk.3.ffn_gate_inp.weight"


def test_cli_table_names_the_expert(tiny_factory, tmp_path):
    directory, _ = tiny_factory("mixtral", "bfloat16", plants=(PLANT,))
    result = swtool_in_process("scan", directory, "--no-progress", "-o", tmp_path / "catalog.json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split()[:5] == ["layer", "row", "col", "expert", "tensor"]
    # a safetensors input: its own tensor name (a GGUF input would say blk.2.ffn_down_exps.weight)
    assert lines[3].split()[:5] == ["2", "41", "101", "2", "model.layers.2.block_sparse_moe.experts.2.w2.weight"]
    (entry,) = json.loads((tmp_path / "catalog.json").read_text())["super_weights"]
    assert entry["expert"] == 2 and entry["tensor"] == "model.layers.2.block_sparse_moe.experts.2.w2.weight"


def test_missing_expert_tensor_is_a_clear_error(tiny_factory, tmp_path):
    directory, _ = tiny_factory("mixtral", "float32")
    with safe_open(directory / "model.safetensors", "pt") as f:
        kept = {name: f.get_tensor(name) for name in f.keys() if name != PER_EXPERT_DOWN.format(layer=1, expert=3)}
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(kept, broken / "model.safetensors")
    shutil.copy(directory / "config.json", broken / "config.json")
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.block_sparse_moe\.experts\.3\.w2"):
        load_model(broken)


# --- Qwen2-MoE, Qwen3-MoE, OLMoE: experts `mlp.experts.E.{gate,up,down}_proj` on the Hub -----------

QWEN_STYLE = ["qwen3-moe", "qwen2-moe", "olmoe"]


def tolerance(expected):
    """Against transformers: measured gaps at most 3.4e-6 x max |expected| (the routed cases, where float
    sums of different order meet a top-k choice), 7e-7 elsewhere."""
    return 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("family", QWEN_STYLE)
def test_qwen_style_layouts_give_identical_logits(tiny_factory, tmp_path, family):
    """save_pretrained's default writes Hub-style per-expert tensors; the stacked re-save reads the same."""
    per_expert, _ = tiny_factory(family, "bfloat16")
    stacked = stacked_copy(per_expert, tmp_path / "stacked")
    assert {"model.layers.2.mlp.experts.3.down_proj.weight", "model.layers.2.mlp.experts.3.gate_proj.weight",
            "model.layers.2.mlp.experts.3.up_proj.weight", "model.layers.2.mlp.gate.weight"} <= tensor_names(per_expert)
    assert {"model.layers.2.mlp.experts.down_proj", "model.layers.2.mlp.experts.gate_up_proj"} <= tensor_names(stacked)
    tokens = random_tokens(19, seed=4)
    got_stacked = forward(load_model(stacked), tokens)
    np.testing.assert_array_equal(got_stacked, forward(load_model(per_expert), tokens))
    expected = reference_logits(stacked, tokens)
    np.testing.assert_allclose(got_stacked[0], expected, rtol=0, atol=tolerance(expected))


@pytest.mark.parametrize("family", QWEN_STYLE)
def test_qwen_style_scan_of_stacked_layout_names_the_expert(tiny_factory, tmp_path, family):
    per_expert, _ = tiny_factory(family, "bfloat16", plants=(PLANT,))
    model = load_model(stacked_copy(per_expert, tmp_path / "stacked"))
    tokens = encode(model.directory, DEFAULT_PROMPT)
    found, _ = scan(model, tokens, Settings(DEFAULT_PROMPT))
    assert [(sw.layer, sw.expert, sw.row, sw.col) for sw in found] == [(2, 2, 41, 101)]
    (sw,) = found
    assert (sw.tensor, sw.gguf_tensor, sw.tensor_index) == ("model.layers.2.mlp.experts.down_proj",
                                                          "blk.2.ffn_down_exps.weight", [2, 41, 101])
    with safe_open(model.directory / "model.safetensors", "pt") as f:
        assert sw.value == f.get_tensor(sw.tensor)[2, 41, 101].float().item() == pytest.approx(PLANT.value, rel=1e-2)
    assert sw.verification["verified"]


@pytest.mark.parametrize("layout", ["per_expert", "stacked"])
def test_qwen2_moe_shared_expert_edit_matches_transformers(tiny_factory, tmp_path, layout):
    """The shared expert (sigmoid-gated, beside the routed ones) is a real, editable part of the layer."""
    directory, _ = tiny_factory("qwen2-moe", "float32")
    if layout == "stacked":
        directory = stacked_copy(directory, tmp_path / "stacked")
    tokens = random_tokens(11, seed=6)
    layer, row, col, factor = 1, 5, 17, 1000.0
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        intact = model(torch.tensor([list(tokens)])).logits[0].numpy()
        model.model.layers[layer].mlp.shared_expert.down_proj.weight[row, col] *= factor
        expected = model(torch.tensor([list(tokens)])).logits[0].numpy()
    assert np.abs(expected - intact).max() > 100 * tolerance(expected)  # the edit shows at this tolerance
    edit = Edit(f"model.layers.{layer}.mlp.shared_expert.down_proj.weight", row, col, factor)
    loaded = load_model(directory)
    by_world = forward(loaded, tokens, worlds=[World("intact"), World("scaled", (edit,))])
    np.testing.assert_allclose(by_world[0], intact, rtol=0, atol=tolerance(intact))
    np.testing.assert_allclose(by_world[1], expected, rtol=0, atol=tolerance(expected))
    by_transform = forward(loaded, tokens, transforms=[ScaleElements([edit])])[0]
    np.testing.assert_allclose(by_transform, expected, rtol=0, atol=tolerance(expected))


def test_qwen2_moe_dense_layers_by_decoder_sparse_step(tiny_factory):
    """decoder_sparse_step 2: layers 0 and 2 are dense MLPs (no shared expert), 1 and 3 mixtures."""
    directory, _ = tiny_factory("qwen2-moe", "float32", decoder_sparse_step=2)
    names = tensor_names(directory)
    assert "model.layers.2.mlp.down_proj.weight" in names and "model.layers.1.mlp.shared_expert_gate.weight" in names
    assert not any(name.startswith("model.layers.2.mlp.experts") for name in names)
    tokens = random_tokens(19, seed=3)
    expected = reference_logits(directory, tokens)
    np.testing.assert_allclose(forward(load_model(directory), tokens)[0], expected, rtol=0, atol=tolerance(expected))
    arch = load_model(directory).arch
    assert arch.down_proj_name(2) == "model.layers.2.mlp.down_proj.weight"
    assert arch.gguf_name("model.layers.2.mlp.down_proj.weight") == "blk.2.ffn_down.weight"
    assert arch.down_proj_name(3, 1) == "model.layers.3.mlp.experts.1.down_proj.weight"
    with pytest.raises(SwtoolError, match="per expert"):
        arch.down_proj_name(3)


def test_qwen3_moe_hub_config_says_num_experts(tiny_factory, tmp_path):
    """transformers 5 saves Qwen3-MoE's expert count as num_local_experts; Hub configs say num_experts."""
    directory, _ = tiny_factory("qwen3-moe", "float32")
    copy = tmp_path / "hub"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    config["num_experts"] = config.pop("num_local_experts")
    (copy / "config.json").write_text(json.dumps(config))
    tokens = random_tokens(19, seed=3)
    expected = reference_logits(copy, tokens)
    got = forward(load_model(copy), tokens)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance(expected))
    np.testing.assert_array_equal(got, forward(load_model(directory), tokens)[0])


def test_olmoe_clips_after_the_qk_norms(tiny_factory):
    """The tiny OLMoE's clip (1.5) bites on its normalised q/k/v: logits differ from an unclipped copy,
    and swtool follows transformers in both."""
    tokens = random_tokens(19, seed=3)
    logits = []
    for clip in (1.5, None):
        directory, _ = tiny_factory("olmoe", "float32", clip_qkv=clip)
        expected = reference_logits(directory, tokens)
        got = forward(load_model(directory), tokens)[0]
        np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance(expected))
        logits.append(expected)
    assert np.abs(logits[0] - logits[1]).max() > 100 * tolerance(logits[0])


def test_qwen2_moe_hub_config_without_layer_types_slides_odd_layers(tiny_factory, tmp_path):
    """Hub Qwen2-MoE configs have no layer_types: transformers slides layers 0 and 2 (below max_window_layers 3)."""
    directory, _ = tiny_factory("qwen2-moe", "float32")
    tokens = random_tokens(19, seed=3)  # past the window of 5
    logits = []
    for name, use_window in (("hub", True), ("no-window", False)):
        copy = tmp_path / name
        shutil.copytree(directory, copy)
        config = json.loads((copy / "config.json").read_text())
        config.pop("layer_types")
        config["use_sliding_window"] = use_window
        (copy / "config.json").write_text(json.dumps(config))
        expected = reference_logits(copy, tokens)
        np.testing.assert_allclose(forward(load_model(copy), tokens)[0], expected, rtol=0, atol=tolerance(expected))
        logits.append(expected)
    assert np.abs(logits[0] - logits[1]).max() > 100 * tolerance(logits[0])  # the window matters here


@pytest.mark.parametrize("key, value", [("decoder_sparse_step", "2"), ("decoder_sparse_step", 0),
                                        ("mlp_only_layers", "0"), ("mlp_only_layers", [0.5]),
                                        ("norm_topk_prob", "false"), ("num_local_experts", 1)])
def test_bad_mixture_config_is_one_line(tiny_factory, tmp_path, key, value):
    directory, _ = tiny_factory("qwen3-moe", "float32")
    copy = tmp_path / "bad"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    config[key] = value  # num_local_experts 1 < num_experts_per_tok 2
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=key if key != "num_local_experts" else "num_experts_per_tok"):
        load_model(copy)
    result = swtool_in_process("scan", copy, "--no-progress")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")


# --- Qwen2-MoE: a super weight in the shared expert's down projection ----------------------------

SHARED_PLANT = Plant(2, 41, 101, expert="shared")
SHARED_DOWN = "model.layers.2.mlp.shared_expert.down_proj.weight"
PROSE = Path(__file__).resolve().parents[1] / "fixtures" / "prose.txt"


@pytest.fixture(scope="module", params=["per_expert", "stacked"])
def shared_planted(request, tiny_factory, tmp_path_factory):
    """A bf16 tiny Qwen2-MoE with a super weight planted in layer 2's shared expert, in either layout."""
    directory, _ = tiny_factory("qwen2-moe", "bfloat16", plants=(SHARED_PLANT,))
    if request.param == "stacked":
        directory = stacked_copy(directory, tmp_path_factory.mktemp("shared") / "stacked")
    return directory


def transformers_shared_expert(directory, tokens, zeroed=False):
    """transformers on `tokens`, the planted element zeroed or not: (residual after layer 2 [T, hidden],
    the shared expert's sigmoid gate [T], its down projection's input [T, ff]), read by forward hooks."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    mlp = model.model.layers[SHARED_PLANT.layer].mlp
    seen = {}
    hooks = [mlp.shared_expert_gate.register_forward_hook(lambda m, i, out: seen.update(gate=torch.sigmoid(out))),
             mlp.shared_expert.down_proj.register_forward_pre_hook(lambda m, i: seen.update(down_in=i[0]))]
    with torch.no_grad():
        if zeroed:
            mlp.shared_expert.down_proj.weight[SHARED_PLANT.row, SHARED_PLANT.col] = 0.0
        out = model(torch.tensor([list(tokens)]), output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    # the sparse block sees the batch's tokens flattened, [B * T, ...]; B is 1 here
    return (out.hidden_states[SHARED_PLANT.layer + 1][0].numpy(), seen["gate"].reshape(-1).numpy(),
            seen["down_in"].reshape(len(tokens), -1).numpy())


def test_shared_expert_plant_makes_a_super_activation_in_transformers(shared_planted):
    """The oracle first: in transformers the planted weight makes a massive, gated residual value in
    channel `row`, and zeroing that one element of the shared expert removes it."""
    tokens = encode(shared_planted, DEFAULT_PROMPT)
    resid, gate, _ = transformers_shared_expert(shared_planted, tokens)
    resid_zeroed, _, _ = transformers_shared_expert(shared_planted, tokens, zeroed=True)
    row = SHARED_PLANT.row
    assert np.abs(resid[:, row]).min() > 100 * np.median(np.abs(resid))  # every token: the channel is massive
    assert np.abs(resid_zeroed[:, row]).max() < 0.01 * np.abs(resid[:, row]).min()
    assert 0.2 < gate.min() and gate.max() < 0.8  # the gate scales the spike (it is not saturated at 1)


def test_scan_finds_the_shared_experts_super_weight(shared_planted, tmp_path):
    model = load_model(shared_planted)
    tokens = encode(model.directory, DEFAULT_PROMPT)
    found, report = scan(model, tokens, Settings(DEFAULT_PROMPT))
    assert [(sw.layer, sw.expert, sw.tensor, sw.row, sw.col) for sw in found] == [(2, None, SHARED_DOWN, 41, 101)]
    (sw,) = found
    # llama.cpp's name from gguf-py's own map for this architecture
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2MOE, 4)
    assert sw.gguf_tensor == names.get_name(SHARED_DOWN, try_suffixes=(".weight",)) == "blk.2.ffn_down_shexp.weight"
    assert sw.tensor_index == [41, 101]
    with safe_open(shared_planted / "model.safetensors", "pt") as f:
        assert sw.value == f.get_tensor(SHARED_DOWN)[41, 101].float().item() == pytest.approx(SHARED_PLANT.value, rel=1e-2)
    assert sw.dtype == "BF16" and sw.rank == 1
    # the gate and the input are transformers' at the spike's token; the contribution includes the gate
    resid, gate, down_in = transformers_shared_expert(shared_planted, tokens)
    assert sw.router_weight == pytest.approx(float(gate[sw.token]), rel=1e-4)
    assert sw.input_activation == pytest.approx(float(down_in[sw.token, 101]), rel=1e-4)
    assert sw.contribution == pytest.approx(sw.router_weight * sw.input_activation * sw.value, rel=1e-6)
    assert sw.super_activation == pytest.approx(float(resid[sw.token, 41]), rel=1e-4)
    assert sw.verification["verified"] and sw.verification["super_activation_removed"] < 0.01 * sw.super_activation
    assert report["profile"][2]["down_proj_input"] | {"value": 0} == {
        "value": 0, "channel": 101, "shared_expert": True, "token": int(np.argmax(np.abs(down_in[:, 101])))}
    catalog = build_catalog(model, DEFAULT_PROMPT, tokens, Settings(DEFAULT_PROMPT), found, report)
    validate(catalog)
    entry = catalog["super_weights"][0]
    assert (entry["expert"], entry["tensor"], entry["gguf_tensor"], entry["row"], entry["col"]) == (
        None, SHARED_DOWN, "blk.2.ffn_down_shexp.weight", 41, 101)


def transformers_perplexity(directory, ids, ctx, zeroed):
    """exp(mean NLL) of `ids` in chunks of `ctx`, every prediction in a chunk scored, by transformers."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        if zeroed:
            model.get_parameter(SHARED_DOWN)[SHARED_PLANT.row, SHARED_PLANT.col] = 0.0
        for start in range(0, len(ids), ctx):
            chunk = torch.tensor([ids[start:start + ctx]])
            nll += model(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    return float(np.exp(nll / count)), count


def test_ablate_and_eval_zero_the_shared_experts_super_weight(shared_planted, tmp_path):
    """The CLI's catalog drives `ablate` (a copy whose only change is that element) and `eval --ablate`
    (the element zeroed on the fly), both against transformers with that element zeroed."""
    catalog = tmp_path / "catalog.json"
    result = swtool_in_process("scan", shared_planted, "--no-progress", "-o", catalog)
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads(catalog.read_text())["super_weights"]
    assert (entry["expert"], entry["tensor"], entry["row"], entry["col"]) == (None, SHARED_DOWN, 41, 101)

    out = tmp_path / "ablated"
    result = swtool_in_process("ablate", shared_planted, "--catalog", catalog, "-o", out)
    assert result.returncode == 0, result.stderr
    with safe_open(shared_planted / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            before, after = a.get_tensor(name), b.get_tensor(name)
            if name == SHARED_DOWN:
                before[41, 101] = 0.0  # the one element ablate changes
            assert torch.equal(before, after), name
    copy = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert copy.get_parameter(SHARED_DOWN)[41, 101].item() == 0.0  # transformers reads the copy's zero there

    ctx, max_tokens = 64, 192
    ids = Tokenizer.from_file(str(shared_planted / "tokenizer.json")).encode(PROSE.read_text()).ids[:max_tokens]
    intact, count = transformers_perplexity(shared_planted, ids, ctx, zeroed=False)
    zeroed, _ = transformers_perplexity(shared_planted, ids, ctx, zeroed=True)
    assert abs(zeroed / intact - 1) > 1e-2  # the element matters at the tolerance below
    result = swtool_in_process("eval", shared_planted, "--text", PROSE, "--ctx", ctx, "--max-tokens", max_tokens,
                               "--catalog", catalog, "--ablate", "--json", "--no-progress")
    assert result.returncode == 0, result.stderr
    (world,) = json.loads(result.stdout)["worlds"]
    assert world["predictions"] == count
    assert world["perplexity"] == pytest.approx(zeroed, rel=1e-3)


@pytest.mark.parametrize("layout", ["per_expert", "stacked"])
def test_one_spike_fed_by_a_routed_and_the_shared_expert(tiny_factory, tmp_path, layout):
    """Row 41 of layer 2 gets a planted weight in routed expert 2 (which the router picks) and one in
    the shared expert: scan finds both, largest contribution first, each named its own way; removing
    both (swtool's set world) leaves what transformers leaves with both elements zeroed."""
    routed_plant = Plant(2, 41, 50, expert=2)
    directory, _ = tiny_factory("qwen2-moe", "bfloat16", plants=(SHARED_PLANT, routed_plant))
    if layout == "stacked":
        directory = stacked_copy(directory, tmp_path / "stacked")
    model = load_model(directory)
    tokens = encode(model.directory, DEFAULT_PROMPT)
    found, _ = scan(model, tokens, Settings(DEFAULT_PROMPT))
    routed_tensor = STACKED_DOWN.format(layer=2) if layout == "stacked" else "model.layers.2.mlp.experts.2.down_proj.weight"
    assert [(sw.expert, sw.tensor, sw.row, sw.col) for sw in found] == [(2, routed_tensor, 41, 50),
                                                                        (None, SHARED_DOWN, 41, 101)]
    assert found[0].contribution > found[1].contribution
    by_pass, _ = scan(model, tokens, Settings(DEFAULT_PROMPT), fork_online=False)  # the online forks decide alike
    assert [(sw.expert, sw.tensor, sw.row, sw.col) for sw in by_pass] == [(sw.expert, sw.tensor, sw.row, sw.col)
                                                                          for sw in found]
    assert [sw.gguf_tensor for sw in found] == ["blk.2.ffn_down_exps.weight", "blk.2.ffn_down_shexp.weight"]
    assert found[0].tensor_index == ([2, 41, 50] if layout == "stacked" else [41, 50])

    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    mlp = reference.model.layers[2].mlp
    with torch.no_grad():
        mlp.experts.down_proj[2, 41, 50] = 0.0
        mlp.shared_expert.down_proj.weight[41, 101] = 0.0
        resid = reference(torch.tensor([list(tokens)]), output_hidden_states=True).hidden_states[3][0].numpy()
    for sw in found:
        removed = sw.verification["super_activation_set_removed"]
        assert removed == pytest.approx(abs(float(resid[sw.token, 41])), rel=1e-3, abs=1e-3)
        assert removed < 0.01 * sw.super_activation and sw.verification["verified"]

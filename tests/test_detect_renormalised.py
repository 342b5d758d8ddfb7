"""Detection in blocks that renormalise the down projection's output (Gemma 2/3, OLMo 2).

post_feedforward_layernorm divides the raw down_proj output by its RMS before the
residual add. Once one channel dominates that output, the normalised channel is
about sqrt(hidden) * gain however large the spike is: a weight that supplies only
part of a dominant spike can be removed without the residual noticing. The scan
must then say so (weak), where a pre-norm model (Llama) really loses the activation.
"""

import pytest

from swtool.detect import Settings, scan
from swtool.model import load_model
from swtool.tokenizer import DEFAULT_PROMPT, encode
from fixtures.tiny import Plant

# One row fed by two columns: the planted outlier weight (60 % of the spike) and an
# ordinary weight, 0.1 (below 6 x the tensor's RMS, so never a candidate), reading a
# huge intermediate activation (40 %).
OUTLIER = Plant(2, 41, 101)
ORDINARY_PATH = Plant(2, 41, 130, value=0.1, drive=10.0)


def scan_planted(tiny_factory, family):
    directory, _ = tiny_factory(family, "float32", plants=(OUTLIER, ORDINARY_PATH))
    model = load_model(directory)
    found, report = scan(model, encode(model.directory, DEFAULT_PROMPT), Settings(DEFAULT_PROMPT))
    assert [(sw.layer, sw.row, sw.col) for sw in found] == [(2, 41, 101)]  # never the ordinary weight
    return found[0], report


def test_pre_norm_model_loses_most_of_the_activation_without_the_weight(tiny_factory):
    sw, _ = scan_planted(tiny_factory, "llama")
    v = sw.verification
    assert v["super_activation_removed"] < 0.5 * v["super_activation_intact"]  # the other 40 % remain
    assert v["verified"]


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "olmo2"])
def test_renormalised_spike_that_survives_the_weight_is_reported_weak(tiny_factory, family):
    sw, report = scan_planted(tiny_factory, family)
    # detection saw the raw spike: before the norm the row dwarfs every other channel
    assert report["profile"][2]["down_proj_output"]["channel"] == 41
    v = sw.verification
    # without the weight the ordinary path alone still dominates the raw output, so after the norm
    # the super activation stays above half, and the prompt's likelihood barely moves
    assert v["super_activation_removed"] > 0.5 * v["super_activation_intact"]
    assert abs(v["nll_removed"] - v["nll_intact"]) < 0.1
    assert not v["verified"]


# The planted weight alone makes layer 2's down_proj output spike (thousands of times the other
# layers'), but the norm keeps its random gains: it caps the spike below a massive residual value.
CAPPED = Plant(2, 41, 101, norm_gain=False)


def oracle_taps(torch_model, tokens, layer):
    """transformers' own values at `layer`: down_proj's output, post_feedforward_layernorm's output
    (forward hooks on the HF modules), the hidden states after every layer, each [T, hidden]; and the
    prompt's mean NLL."""
    import torch

    block, taps = torch_model.model.layers[layer], {}

    def keep(name):
        return lambda module, inputs, output: taps.__setitem__(name, output[0].detach().double().numpy())

    handles = [block.mlp.down_proj.register_forward_hook(keep("down")),
               block.post_feedforward_layernorm.register_forward_hook(keep("after_norm"))]
    try:
        with torch.no_grad():
            out = torch_model(torch.tensor([tokens]), output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    hidden = [h[0].double().numpy() for h in out.hidden_states[1:]]  # [0] is the embedding
    nll = torch.nn.functional.cross_entropy(out.logits[0, :-1].double(), torch.tensor(tokens[1:])).item()
    return taps["down"], taps["after_norm"], hidden, nll


def scan_capped(tiny_factory, family):
    """The catalog of a scan with the default prompts (all five) of `family` with CAPPED planted."""
    from swtool.catalog import default_prompts, scan_catalog, validate

    directory, torch_model = tiny_factory(family, "float32", plants=(CAPPED,))
    model = load_model(directory)
    catalog, _ = scan_catalog(model, default_prompts(model)[0])
    validate(catalog)  # what -o writes
    return catalog, torch_model


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "olmo2"])
def test_spike_the_norm_caps_is_listed_renormalised_with_transformers_sizes(tiny_factory, family):
    import numpy as np

    catalog, torch_model = scan_capped(tiny_factory, family)
    assert catalog["super_weights"] == []  # no persistent massive activation: not a super weight
    (spike,) = catalog["renormalised_spikes"]
    assert (spike["layer"], spike["row"], spike["col"], spike["expert"]) == (2, 41, 101, None)
    assert (spike["tensor"], spike["gguf_tensor"]) == ("model.layers.2.mlp.down_proj.weight", "blk.2.ffn_down.weight")
    assert spike["reason"] == "renormalised" and spike["value"] == CAPPED.value and spike["rank"] == 1
    assert spike["norm"] == "model.layers.2.post_feedforward_layernorm.weight"
    down, after_norm, hidden, _ = oracle_taps(torch_model, catalog["detection"]["tokens"], 2)
    t, row = spike["token"], spike["row"]
    # the spike is the largest down_proj output of the layer, thousands of times every other layer's
    assert np.unravel_index(np.argmax(np.abs(down)), down.shape) == (t, row)
    others = [np.abs(oracle_taps(torch_model, catalog["detection"]["tokens"], layer)[0]).max() for layer in (0, 1, 3)]
    assert abs(down[t, row]) > 1000 * max(others)
    # its size before and after the norm, as transformers computes them
    assert spike["output_activation"] == pytest.approx(down[t, row], rel=1e-4)
    assert spike["after_norm"] == pytest.approx(after_norm[t, row], rel=1e-4)
    assert spike["residual"] == pytest.approx(hidden[2][t, row], rel=1e-4, abs=1e-4)
    # why it is not a super weight, in transformers' numbers: the norm shrinks it fourfold or more, and
    # the residual it leaves is not massive next to the token's other channels (scan's 10x median)
    assert abs(after_norm[t, row]) < abs(down[t, row]) / 4
    assert abs(hidden[2][t, row]) < 10 * np.median(np.abs(hidden[2][t]))
    assert spike["found_in"] == len(catalog["detection"]["prompts"]) == 5


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "olmo2"])
def test_the_norm_divides_a_renormalised_weights_errors_away(tiny_factory, family):
    """Why a renormalised weight is left unprotected (docs/detection.md), in transformers: a 10 % error
    in it moves what the norm passes on by under 0.1 %, and even zeroing it hardly moves the prompt's NLL."""
    import torch

    catalog, torch_model = scan_capped(tiny_factory, family)
    spike, tokens = catalog["renormalised_spikes"][0], catalog["detection"]["tokens"]
    weight = torch_model.model.layers[2].mlp.down_proj.weight
    results = {}
    try:
        for scale in (1.0, 0.9, 0.0):
            with torch.no_grad():
                weight[41, 101] = CAPPED.value * scale
            down, after_norm, _, nll = oracle_taps(torch_model, tokens, 2)
            results[scale] = (down[spike["token"], 41], after_norm[spike["token"], 41], nll)
    finally:
        with torch.no_grad():
            weight[41, 101] = CAPPED.value  # the session's model is shared with other tests
    (down, after, nll), (down_scaled, after_scaled, _), (_, _, nll_zeroed) = results.values()
    assert down_scaled == pytest.approx(0.9 * down, rel=0.01)  # the spike itself does shrink by 10 %
    assert abs(after_scaled - after) < 1e-3 * abs(after)
    assert abs(nll_zeroed - nll) < 0.1


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_renormalised_spike_is_printed_weak_and_not_protected(tiny_factory, family):
    from swtool.audit import targets_from_catalog
    from swtool.catalog import format_scan
    from swtool.gguf_export import protected_weights

    catalog, _ = scan_capped(tiny_factory, family)
    table = format_scan(catalog).splitlines()
    assert "no super weight found: no down_proj output spike creates a persistent massive activation" in table
    assert "down_proj output spikes that post_feedforward_layernorm caps (not super weights):" in table
    (row,) = [line for line in table if line.endswith("weak: renormalised")]
    spike = catalog["renormalised_spikes"][0]
    assert row.split() == ["2", "41", "101", "model.layers.2.mlp.down_proj.weight", "4", "5/5",
                           f"{spike['output_activation']:.4g}", f"{spike['after_norm']:.4g}", "weak:", "renormalised"]
    (wide,) = [line for line in format_scan(catalog, wide=True).splitlines() if line.endswith("weak: renormalised")]
    assert wide.split()[4:10] == ["4", "F32", "1", str(spike["token"]), f"{spike['input_activation']:.4g}", "5/5"]
    assert wide.split()[12] == f"{spike['residual']:.4g}"
    # commands that act on super weights never see it
    assert targets_from_catalog(catalog) == []
    assert protected_weights(catalog, "catalog", 4, {}) == ([], catalog["detection"]["prompt"])


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo2"])
def test_a_spike_that_reaches_the_residual_stays_a_verified_super_weight(tiny_factory, family):
    """Llama adds down_proj's output as it is; Gemma 2 and OLMo 2 with the norm's gain on the row let
    the massive activation through: the planted weight is a verified super weight, nothing renormalised."""
    from swtool.catalog import scan_catalog

    directory, _ = tiny_factory(family, "float32", plants=(Plant(2, 41, 101),))
    catalog, _ = scan_catalog(load_model(directory))
    assert [(sw["layer"], sw["row"], sw["col"]) for sw in catalog["super_weights"]] == [(2, 41, 101)]
    assert catalog["super_weights"][0]["verification"]["verified"]
    assert catalog["renormalised_spikes"] == []


def test_capped_llama_plant_is_still_a_verified_super_weight(tiny_factory):
    """norm_gain means nothing to a block without an output norm: Llama's spike is a super weight."""
    from swtool.catalog import scan_catalog

    directory, _ = tiny_factory("llama", "float32", plants=(CAPPED,))
    catalog, _ = scan_catalog(load_model(directory))
    assert [(sw["layer"], sw["row"], sw["col"]) for sw in catalog["super_weights"]] == [(2, 41, 101)]
    assert catalog["super_weights"][0]["verification"]["verified"]
    assert catalog["renormalised_spikes"] == []


def test_catalog_without_renormalised_spikes_still_reads(tiny_factory, tmp_path):
    """A catalog written before renormalised_spikes existed (same schema version) reads and prints."""
    import json

    from swtool.catalog import format_scan, read_catalog

    catalog, _ = scan_capped(tiny_factory, "olmo2")
    del catalog["renormalised_spikes"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(catalog))
    assert format_scan(read_catalog(path)).splitlines()[1:] == [
        "no super weight found: no down_proj output spike creates a persistent massive activation"]


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_renormalised_spike_is_listed_from_the_converters_gguf(tmp_path, family):
    """llama.cpp's convert_hf_to_gguf.py writes the model (Gemma's norms stored as 1 + w): scanning its
    file lists the same spike, with the same sizes, as scanning the Hugging Face directory (the same
    token ids: the two tokenizers need not agree on a text)."""
    from swtool.catalog import format_scan, scan_catalog
    from fixtures.converted import build_converted

    model_dir, gguf_path = build_converted(tmp_path, family, plants=[CAPPED])
    gguf_model = load_model(gguf_path)
    catalog, _ = scan_catalog(gguf_model)
    assert catalog["super_weights"] == []
    tokens = catalog["detection"]["tokens"]
    found, report = scan(load_model(model_dir), tokens, Settings(DEFAULT_PROMPT))
    assert found == []
    (ours,), (theirs,) = report["renormalised"], catalog["renormalised_spikes"]
    assert (theirs["layer"], theirs["row"], theirs["col"], theirs["token"]) == (2, 41, 101, ours.token)
    for key in ("output_activation", "after_norm", "residual"):
        assert theirs[key] == pytest.approx(getattr(ours, key), rel=1e-4)
    (row,) = [line for line in format_scan(catalog).splitlines() if line.endswith("weak: renormalised")]
    assert row.split()[:4] == ["2", "41", "101", "blk.2.ffn_down.weight"]


def test_super_weight_and_renormalised_spike_in_one_model(tiny_factory):
    """OLMo 2 (no norm before its MLP, so the second plant's input is not shrunk by the first's
    super activation), 8 layers: a plant whose row has the norm's gain is a verified super weight,
    one whose spike the norm caps is listed apart, and the table prints both."""
    from swtool.catalog import format_scan, scan_catalog

    plants = (Plant(1, 30, 50), Plant(4, 41, 101, norm_gain=False))
    directory, _ = tiny_factory("olmo2", "float32", plants=plants, num_hidden_layers=8)
    catalog, _ = scan_catalog(load_model(directory))
    assert [(sw["layer"], sw["row"], sw["col"], sw["verification"]["verified"]) for sw in catalog["super_weights"]] \
        == [(1, 30, 50, True)]
    assert [(s["layer"], s["row"], s["col"]) for s in catalog["renormalised_spikes"]] == [(4, 41, 101)]
    table = format_scan(catalog).splitlines()
    (found,) = [line for line in table if line.split()[:3] == ["1", "30", "50"]]
    (listed,) = [line for line in table if line.split()[:3] == ["4", "41", "101"]]
    assert found.endswith("1/1 activation") and listed.endswith("weak: renormalised")
    assert table.index(found) < table.index("down_proj output spikes that post_feedforward_layernorm caps "
                                            "(not super weights):") < table.index(listed)

"""Detection finds exactly the super weights planted in tiny models, and nothing that only looks like one."""

import numpy as np
import pytest

from swtool.detect import Settings, contributing_columns, find_spikes, scan, Spike
from swtool.model import load_model
from swtool.tokenizer import DEFAULT_PROMPT, encode
from fixtures.tiny import Plant


def run_scan(directory, **settings):
    model = load_model(directory)
    tokens = encode(model.directory, DEFAULT_PROMPT)
    return scan(model, tokens, Settings(DEFAULT_PROMPT, **settings))


def coordinates(found):
    return sorted((sw.layer, sw.row, sw.col) for sw in found)


def test_two_weights_in_one_row_feeding_one_spike_are_both_found(tiny_factory):
    plants = (Plant(1, 20, 33, value=4.0), Plant(1, 20, 90, value=3.0))
    directory, _ = tiny_factory("llama", "bfloat16", plants=plants)
    found, _ = run_scan(directory)
    assert coordinates(found) == [(1, 20, 33), (1, 20, 90)]
    assert [sw.col for sw in found] == [33, 90]  # the larger contribution first
    assert all(sw.verification["verified"] for sw in found)  # together they carry the activation


def test_super_weights_in_two_layers(tiny_factory):
    """A second super weight in a later layer, fed by the first one's super activation (as in Llama-30B)."""
    plants = (Plant(1, 20, 33), Plant(3, 50, 120, channel=20, from_embedding=False))
    directory, _ = tiny_factory("llama", "float32", plants=plants, num_hidden_layers=6)
    found, _ = run_scan(directory)
    assert coordinates(found) == [(1, 20, 33), (3, 50, 120)]


def test_late_spike_that_cancels_the_super_activation_is_not_a_super_weight(tiny_factory):
    plants = (Plant(1, 20, 33), Plant(4, 20, 50, value=-3.0, channel=20, from_embedding=False))
    directory, _ = tiny_factory("llama", "float32", plants=plants, num_hidden_layers=6)
    found, report = run_scan(directory)
    assert report["profile"][4]["down_proj_output"]["value"] < -100  # the late spike is there ...
    assert coordinates(found) == [(1, 20, 33)]  # ... and rejected


def test_spike_that_does_not_persist_is_not_a_super_weight(tiny_factory):
    plants = (Plant(2, 20, 33), Plant(3, 20, 50, value=-3.0, channel=20, from_embedding=False))
    directory, _ = tiny_factory("llama", "float32", plants=plants, num_hidden_layers=6)
    found, report = run_scan(directory)
    assert abs(report["profile"][2]["down_proj_output"]["value"]) > 100
    assert found == []


def test_random_model_has_no_super_weight(tiny_factory):
    directory, _ = tiny_factory("llama", "float32")
    found, report = run_scan(directory)
    assert found == [] and report["passes"] == 1


def test_spikes_are_relative_to_other_layers_not_a_fixed_threshold():
    quiet = np.full((6, 3, 8), 0.5, np.float32)
    quiet[2, 1, 4] = 4.0  # 8x the median layer: not a spike at ratio 10, a spike at ratio 5
    assert find_spikes(quiet, 10.0) == []
    assert [(s.layer, s.token, s.row) for s in find_spikes(quiet, 5.0)] == [(2, 1, 4)]
    loud = quiet * 1000  # the same shape at any scale gives the same answer
    assert [(s.layer, s.token, s.row) for s in find_spikes(loud, 5.0)] == [(2, 1, 4)]


def test_columns_are_chosen_by_contribution_not_by_largest_input():
    down_in = np.zeros((1, 1, 6), np.float32)
    down_in[0, 0] = [100.0, 5.0, 4.0, 0.1, -3.0, 1.0]  # channel 0 has the largest input ...
    weight_row = np.array([0.001, 10.0, 9.0, 1.0, -8.0, 0.01], np.float32)  # ... but a tiny weight
    output = float(down_in[0, 0] @ weight_row)
    spike = Spike(layer=0, token=0, row=0, output=output)
    settings = Settings("p", min_contribution=0.2)
    assert contributing_columns(spike, down_in, weight_row, settings) == [1, 2, 4]


PLANTINGS = {
    "one": (Plant(1, 20, 33),),
    "two in one row": (Plant(1, 20, 33, value=4.0), Plant(1, 20, 90, value=3.0)),
    "two layers": (Plant(1, 20, 33), Plant(3, 50, 120, channel=20, from_embedding=False)),
    "a late canceller": (Plant(1, 20, 33), Plant(4, 20, 50, value=-3.0, channel=20, from_embedding=False)),
    "not persistent": (Plant(2, 20, 33), Plant(3, 20, 50, value=-3.0, channel=20, from_embedding=False)),
}


def decision(sw):
    """What a scan decides about a weight: which it is and whether zeroing it matters."""
    return (sw.layer, sw.row, sw.col, sw.value, sw.rank, sw.token, sw.iteration, sw.verification["verified"],
            tuple(sw.verification["verified_by"]))


def measurements(sw):
    """What a scan measures about it."""
    return [sw.input_activation, sw.output_activation, sw.contribution, sw.super_activation,
            *(value for key, value in sorted(sw.verification.items()) if key not in ("verified", "verified_by"))]


@pytest.mark.parametrize("planting", PLANTINGS, ids=list(PLANTINGS))
def test_one_pass_decides_as_pass_by_pass(tiny_factory, planting):
    """The single pass with worlds forked online gives exactly what the pass-by-pass scan gives
    (every world computed once the previous pass's finds are known), and reads the weights once."""
    directory, _ = tiny_factory("llama", "float32", plants=PLANTINGS[planting], num_hidden_layers=6)
    model = load_model(directory)
    tokens = encode(model.directory, DEFAULT_PROMPT)
    settings = Settings(DEFAULT_PROMPT)
    one, one_report = scan(model, tokens, settings)
    by_pass, by_pass_report = scan(model, tokens, settings, fork_online=False)
    # the same decisions; activations equal up to float32 rounding (other worlds share the batches),
    # relative to the super activation (a removed one is what is left after cancelling it)
    assert [decision(sw) for sw in one] == [decision(sw) for sw in by_pass]
    for a, b in zip(one, by_pass):
        assert measurements(a) == pytest.approx(measurements(b), rel=1e-5, abs=1e-5 * abs(b.super_activation))
    assert one_report["nll_intact"] == pytest.approx(by_pass_report["nll_intact"], rel=1e-6)
    assert one_report["decision_passes"] == by_pass_report["decision_passes"]
    assert one_report["passes"] == 1
    # a fork re-runs only the layer of its spike: at most one extra layer per planted spike
    assert one_report["weight_reads"] <= 1 + len(PLANTINGS[planting]) / 6
    if one:  # pass by pass, the worlds without the finds are computed again from their layer on
        assert by_pass_report["passes"] == 2


def test_a_super_weight_in_layer_0_is_found_in_a_second_read(tiny_factory):
    """Layer 0 has no earlier layers to compare with while the pass runs, so the online search
    never forks there; the decision at the end still finds it, computing its worlds afterwards."""
    directory, _ = tiny_factory("llama", "float32", plants=(Plant(0, 20, 33),))
    found, report = run_scan(directory)
    assert coordinates(found) == [(0, 20, 33)]
    assert found[0].verification["verified"]
    assert report["passes"] == 2

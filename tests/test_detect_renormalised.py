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

"""Self-generated importance (`--importance self:N`, sweep's `importance:self`; swtool/export_importance.py).

Oracles:
  - the tokens: transformers' own next-token distribution. Replaying the sampler's draws (the same seeded
    generator, the same `choice` per sequence and step) on transformers' probabilities must give the same
    tokens: a wrong logit moves a draw across a boundary somewhere in the sequence;
  - the importance: transformers' x² per input column over those tokens (fixtures/torch_importance.py).
"""

import json

import numpy as np
import pytest

from fixtures.cli_run import swtool_in_process
from fixtures.tiny import Plant, add_a_merge, build_tiny
from fixtures.torch_importance import torch_importance
from swtool import imatrix as im
from swtool.errors import SwtoolError
from swtool.export_importance import ImportanceSpec, computed, digest, parse_importance
from swtool.model import load_model
from swtool.sweep import Handling, parse_handlings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with a planted super weight, its tokenizer given the merge llama.cpp's loader needs."""
    directory = tmp_path_factory.mktemp("self-importance")
    build_tiny(directory, "llama", "float32", plants=(Plant(1, 41, 101),))
    add_a_merge(directory)
    return directory


def transformers_samples(directory, n_tokens, ctx, bos, seed):
    """The sequences self_generated_sequences should write, sampled from transformers' distributions."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    lengths = [min(ctx, n_tokens - start) for start in range(0, n_tokens, ctx)]
    tokens = [[bos] for _ in lengths]
    with torch.no_grad():
        for _ in range(1, max(lengths)):
            logits = model(torch.tensor(tokens)).logits[:, -1].double().numpy()
            probabilities = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probabilities /= probabilities.sum(axis=-1, keepdims=True)
            for row, p in zip(tokens, probabilities):
                row.append(int(rng.choice(len(p), p=p)))
    return [row[:length] for row, length in zip(tokens, lengths)]


def test_self_generated_tokens_are_samples_of_transformers_distributions(tiny):
    model = load_model(tiny)
    got = im.self_generated_sequences(model, 30, 16, 256, seed=7)
    assert [len(s) for s in got] == [16, 14]
    assert got == transformers_samples(tiny, 30, 16, 256, seed=7)
    assert got != im.self_generated_sequences(model, 30, 16, 256, seed=8)  # the seed is used


def test_self_importance_is_transformers_over_the_sampled_tokens(tiny, tmp_path):
    """--importance self:N: N tokens sampled from BOS in sequences of 128 (one here), the x² sums of
    transformers over them (1e-5 of the largest: float32 sums in another order), and export records it."""
    used = computed(ImportanceSpec("self", tokens=40), load_model(tiny))
    sequence = transformers_samples(tiny, 40, 128, 256, seed=0)
    assert (used.source, used.tokens) == ("self", 40)
    expected = torch_importance(tiny, "llama", sequence)
    assert set(used.importance.entries) == set(expected)
    for name, (sums, counts) in expected.items():
        np.testing.assert_array_equal(used.importance.entries[name].counts, counts, err_msg=name)
        assert np.abs(used.importance.entries[name].sums - sums).max() <= 1e-5 * sums.max(), name
    result = swtool_in_process("export", tiny, "-o", tmp_path / "self.gguf", "--type", "q4_0", "--importance",
                               "self:40", "--no-scan", "--no-progress", "--json")
    assert result.returncode == 0, result.stderr
    recorded = json.loads(result.stdout)["importance"]
    assert (recorded["source"], recorded["tokens"], recorded["sha256"]) == ("self", 40, digest(used.importance))


def test_self_option_and_sweep_handling_syntax():
    assert parse_importance("self") == ImportanceSpec("self", tokens=512)
    assert parse_importance("self:64") == ImportanceSpec("self", tokens=64)
    for bad in ("self:0", "self:x", "self:", "selfish"):
        with pytest.raises(SwtoolError, match="self\\[:N\\]"):
            parse_importance(bad)
    assert parse_handlings("importance:self,keep+importance:self") == [Handling("none", None, "self"),
                                                                       Handling("keep", "q8_0", "self")]
    with pytest.raises(SwtoolError, match="importance:self"):
        parse_handlings("importance:sample")


def test_sweep_computes_importance_self_as_export_does(tiny):
    """sweep's importance:self is export's --importance self (512 tokens): the same digest, computed once."""
    from swtool.sweep import sweep_importances

    model = load_model(tiny)
    logged = []
    made = sweep_importances(model, parse_handlings("importance:self,keep+importance:self"), None, None, None,
                             logged.append)
    assert list(made) == ["self"] and made["self"].tokens == 512
    assert made["self"].sha256 == computed(parse_importance("self"), model).sha256
    assert logged == [f"importance:self: {made['self'].description}"]

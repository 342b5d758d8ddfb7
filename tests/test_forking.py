"""Worlds forked mid-pass compute what a whole pass with those weights zeroed computes, reading each layer once."""

import numpy as np

from swtool.forking import ForkingPass, prefix
from swtool.forward import Edit, ScaleElements, forward
from swtool.model import load_model
from fixtures.tiny import random_tokens

A = (1, Edit("model.layers.1.mlp.down_proj.weight", 5, 7))  # (layer, edit): zero W[5, 7] of layer 1
B = (3, Edit("model.layers.3.mlp.down_proj.weight", 9, 11))


class Nothing:
    def observe(self, point, layer, key, x):
        pass


def zeroed_logits(model, tokens, edits):
    """Logits of one whole pass that zeroes `edits` as their tensors are read (forward.py, checked against
    transformers in test_forward.py): no forks, no rank-1 corrections."""
    return forward(model, tokens, transforms=[ScaleElements([edit for _, edit in edits])])[0]


def test_forks_made_during_the_pass_match_whole_passes(tiny_factory):
    directory, _ = tiny_factory("llama", "float32", num_hidden_layers=6)
    model = load_model(directory)
    tokens = random_tokens(9, seed=1)
    stream = ForkingPass(model, tokens, Nothing())
    intact, a, ab = frozenset(), frozenset([A]), frozenset([A, B])
    live = [intact]
    for layer in range(6):
        stream.compute(layer, live)  # every live world in one batch
        if layer == A[0]:
            live.append(a)  # as if A were found at layer 1: fork, running layer 1 again for its rows
            stream.compute(layer, live)
        if layer == B[0]:
            live.append(ab)  # {A, B} forks from {A} at layer 3
            stream.compute(layer, live)
    # each layer ran once, plus once per fork
    assert stream.blocks_run == 6 + 2
    # worlds share their prefixes: {A, B} is {A} until layer 3, {A} is intact until layer 1
    assert prefix(ab, 2) == a and prefix(a, 0) == intact
    assert set(stream.outputs[2]) == {(0, intact), (0, a)}  # (prompt, prefix): one prompt here
    logits = stream.logits([intact, a, ab])
    for key, edits in ((intact, []), (a, [A]), (ab, [A, B])):
        expected = zeroed_logits(model, tokens, edits)
        np.testing.assert_allclose(logits[key], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_complete_computes_a_world_from_where_it_departs(tiny_factory):
    directory, _ = tiny_factory("llama", "float32", num_hidden_layers=6)
    model = load_model(directory)
    tokens = random_tokens(9, seed=2)
    stream = ForkingPass(model, tokens, Nothing())
    stream.complete([frozenset()])
    assert stream.blocks_run == 6
    stream.complete([frozenset([B])])  # intact up to layer 3: only layers 3..5 are computed again
    assert stream.blocks_run == 6 + 3 and stream.rounds == 2
    logits = stream.logits([frozenset([B])])[frozenset([B])]
    expected = zeroed_logits(model, tokens, [B])
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * np.abs(expected).max())

"""The real model: SmolLM2-135M-Instruct (Llama architecture), checked against transformers."""

import numpy as np
import pytest
import torch
import transformers

from swtool.detect import Settings, scan
from swtool.forward import forward, greedy
from swtool.model import load_model
from swtool.tokenizer import DEFAULT_PROMPT, encode

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def model(smollm2):
    return load_model(smollm2)


@pytest.fixture(scope="module")
def reference(smollm2):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return transformers.AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def scanned(model):
    """(found, report) of one scan of the paper's prompt, shared by the tests that check it."""
    return scan(model, encode(model.directory, DEFAULT_PROMPT), Settings(DEFAULT_PROMPT))


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):", "Apple Inc. is a worldwide tech"])
def test_greedy_text_matches_transformers(model, reference, tokenizer, prompt):
    """transformers' 12 greedy tokens are swtool's: one forward pass over the prompt and transformers'
    continuation, whose argmax at each position must be the next token (teacher forcing: the same
    tokens greedy decoding gives, by induction over the positions, at one pass instead of twelve);
    and greedy() itself for its first two tokens."""
    ids = tokenizer(prompt)["input_ids"]
    assert encode(model.directory, prompt) == ids  # same tokenizer.json, same BOS rule
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0].tolist()
    assert len(expected) == len(ids) + 12
    predicted = forward(model, expected[:-1])[0].argmax(axis=-1)
    assert predicted[len(ids) - 1:].tolist() == expected[len(ids):]
    assert greedy(model, ids, 2) == expected[:len(ids) + 2]


def test_logits_match_transformers(model, reference, tokenizer):
    ids = tokenizer("Super weights are a handful of scalars that matter more than all others.")["input_ids"]
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    got = forward(model, ids)[0]
    # measured gap: 1.1e-6 * max (the bf16 weights exactly, float32 arithmetic in another order)
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-6 * np.abs(expected).max())


def prompt_nll(reference, ids):
    with torch.no_grad():
        return float(reference(torch.tensor([ids]), labels=torch.tensor([ids])).loss)


def test_scan_finds_weights_whose_removal_collapses_the_prompt(model, reference, tokenizer, scanned):
    """Checked in transformers, not in swtool: zeroing what the scan found must wreck the model,
    zeroing as many of the largest other weights of the same tensors (the paper's control) must not."""
    ids = encode(model.directory, DEFAULT_PROMPT)
    found, report = scanned
    assert 1 <= len(found) <= 8
    assert all(sw.verification["verified"] for sw in found)
    baseline = prompt_nll(reference, ids)
    assert report["nll_intact"] == pytest.approx(baseline, abs=5e-5)  # measured gap: 7.6e-6 nats
    text = "The quick brown fox jumps over the lazy dog. It was a sunny day and the children played outside."
    text_ids = tokenizer(text)["input_ids"]
    text_baseline = prompt_nll(reference, text_ids)
    saved = {}
    with torch.no_grad():
        for sw in found:
            weight = reference.model.layers[sw.layer].mlp.down_proj.weight
            assert weight[sw.row, sw.col].item() == pytest.approx(sw.value)
            saved[(sw.layer, sw.row, sw.col)] = weight[sw.row, sw.col].item()
            weight[sw.row, sw.col] = 0.0
        ablated, text_ablated = prompt_nll(reference, ids), prompt_nll(reference, text_ids)
        for (layer, row, col), value in saved.items():
            reference.model.layers[layer].mlp.down_proj.weight[row, col] = value
        assert prompt_nll(reference, ids) == pytest.approx(baseline, abs=1e-5)
        # control: the next-largest weights of the same tensors, as many as were found
        controls = []
        for layer in sorted({sw.layer for sw in found}):
            weight = reference.model.layers[layer].mlp.down_proj.weight
            magnitude = weight.abs().flatten().clone()
            for sw in found:
                if sw.layer == layer:
                    magnitude[sw.row * weight.shape[1] + sw.col] = 0
            n = sum(sw.layer == layer for sw in found)
            for flat in torch.topk(magnitude, n).indices.tolist():
                controls.append((weight, divmod(flat, weight.shape[1]), weight.view(-1)[flat].item()))
        for weight, (row, col), _ in controls:
            weight[row, col] = 0.0
        control_nll = prompt_nll(reference, text_ids)
        for weight, (row, col), value in controls:
            weight[row, col] = value
    assert ablated > baseline + 5.0  # the paper's collapse: orders of magnitude in perplexity
    assert text_ablated > text_baseline + 3.0  # on text the scan never saw, too
    assert control_nll < text_baseline + 0.5  # the same number of other large weights hardly matter
    assert report["nll_all_removed"] == pytest.approx(ablated, abs=5e-5)  # measured gap: under 1e-6 nats


def test_super_activation_seen_by_transformers(model, reference, scanned):
    """The scan's super activation is the residual stream value transformers reports after that layer."""
    ids = encode(model.directory, DEFAULT_PROMPT)
    found, _ = scanned
    with torch.no_grad():
        hidden = reference(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert sorted((sw.layer, sw.row) for sw in found) == [(2, 507), (2, 507), (11, 507), (11, 507)]  # README's four
    for sw in found:
        expected = hidden[sw.layer + 1][0, sw.token, sw.row].item()
        assert sw.super_activation == pytest.approx(expected, rel=2e-6)  # measured gap: 4.1e-7 relative
        others = hidden[sw.layer + 1][0, sw.token].abs().median().item()
        assert abs(expected) > 50 * others

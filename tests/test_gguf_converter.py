"""Every family held to llama.cpp's own convert_hf_to_gguf.py (fixtures/llama_converter.py).

For each family, a tiny random model with a planted super weight and a vocabulary
the converter knows (fixtures/converted.py):
  - the converter's GGUF, read by swtool, gives transformers' logits (2e-5 of the
    largest, f32) and the planted super weight;
  - swtool's `export --type f32` of the same model holds what the converter's file
    holds: every `{arch}.*` and `tokenizer.*` key (value and type) and every tensor
    (name, shape, type, bytes), apart from the keys listed in INTENDED;
  - llama.cpp loads swtool's export and computes transformers' logits.
A family joins by adding its fixtures/tiny.py name to READ (and EXPORT once export writes it).
"""

import numpy as np
import pytest

from fixtures.cli_run import swtool
from fixtures.gguf_compare import key_differences, read_contents, tensor_differences
from swtool.forward import forward
from swtool.model import load_model
from fixtures.tiny import Plant, random_tokens

pytestmark = [pytest.mark.real, pytest.mark.llama_cpp]

PLANT = Plant(layer=1, row=3, col=5)
READ = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3-moe", "qwen2-moe", "olmoe", "olmo", "olmo2",
        "granite", "starcoder2", "stablelm", "stablelm-parallel", "gpt-neox", "gpt-neox-sequential", "gpt2", "gpt2-untied",
        "gemma", "gemma2", "gemma3", "phi3", "phi3-longrope"]
EXPORT = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3-moe", "qwen2-moe", "olmoe", "olmo", "olmo2",
          "granite", "starcoder2", "stablelm", "stablelm-parallel", "gpt-neox", "gpt2", "gpt2-untied",
          "gemma", "gemma2", "gemma3", "phi3", "phi3-longrope"]
# {family: {key: why swtool writes it differently}}; keys swtool adds (swtool.*) are never compared
INTENDED = {"gpt2": {"gpt2.feed_forward_length": "the converter writes 4 x n_embd whatever n_inner says (160 here), "
                                                "so llama.cpp refuses its file; swtool writes the MLP's width"}}
LOGIT_GAP = 2e-5  # of the largest |logit|, f32 weights on both sides
# llama.cpp's logits from a q8_0 export against those from the f32 one, of the largest: llama.cpp also
# rounds activations to 8 bits. Measured 1.4e-2 to 2e-2 for most families; the tied outputs' small
# logits give more: Gemma 4.0e-2, StarCoder2 6.6e-2, Gemma 3 7.8e-2, Qwen2 7.9e-2, GPT-2 9.3e-2, and
# Gemma 2 (soft-capped at 1.0) 1.44e-1. A wrong layout or block is off by the logits' own size.
Q8_0_GAP = 2e-1


@pytest.fixture(scope="module")
def converted(converted):
    """family -> (HF model directory, the converter's f32 GGUF of it), with PLANT planted (the session's
    converted models, tests/conftest.py)."""
    return lambda family: converted(family, plants=[PLANT])


def transformers_logits(model_dir, tokens):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([list(tokens)])).logits[0].numpy()


def prompt(model_dir):
    import json

    return random_tokens(12, seed=3, vocab=json.loads((model_dir / "config.json").read_text())["vocab_size"])


@pytest.mark.parametrize("family", READ)
def test_converters_gguf_reads_as_transformers_computes(converted, family):
    model_dir, gguf_path = converted(family)
    tokens = prompt(model_dir)
    expected = transformers_logits(model_dir, tokens)
    got = forward(load_model(gguf_path), tokens)[0]
    assert np.abs(got - expected).max() <= LOGIT_GAP * np.abs(expected).max()


@pytest.mark.parametrize("family", READ)
def test_scan_of_converters_gguf_finds_the_planted_weight(converted, family, tmp_path):
    import json

    _, gguf_path = converted(family)
    result = swtool("scan", gguf_path, "-o", tmp_path / "catalog.json", "--no-progress")
    assert result.returncode == 0, result.stderr
    found = {(w["layer"], w["row"], w["col"]) for w in json.loads((tmp_path / "catalog.json").read_text())["super_weights"]}
    assert (PLANT.layer, PLANT.row, PLANT.col) in found


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory):
    """family -> swtool's f32 export of the converter's input model."""
    built = {}

    def get(family):
        if family not in built:
            model_dir, _ = converted(family)
            out = tmp_path_factory.mktemp(f"export-{family}") / "model-f32.gguf"
            result = swtool("export", model_dir, "-o", out, "--type", "f32", "--no-progress")
            assert result.returncode == 0, result.stderr
            built[family] = out
        return built[family]

    return get


@pytest.mark.parametrize("family", EXPORT)
def test_export_holds_what_the_converter_writes(converted, exported, family):
    _, theirs_path = converted(family)
    ours, theirs = read_contents(exported(family)), read_contents(theirs_path)
    arch = theirs.keys["general.architecture"][1]
    assert ours.keys["general.architecture"] == theirs.keys["general.architecture"]
    assert key_differences(ours, theirs, (f"{arch}.", "tokenizer."), ignore=INTENDED.get(family, {})) == []
    assert tensor_differences(ours, theirs) == []


@pytest.mark.parametrize("family", EXPORT)
def test_llama_cpp_computes_transformers_logits_from_the_export(converted, exported, family):
    from fixtures import llama_oracle

    model_dir, _ = converted(family)
    tokens = prompt(model_dir)
    expected = transformers_logits(model_dir, tokens)
    llm = llama_oracle.load(exported(family), n_ctx=64)
    llm.eval(list(tokens))
    got = np.asarray(llm.scores[:len(tokens)], dtype=np.float32)
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()


def llama_cpp_logits(path, tokens):
    from fixtures import llama_oracle

    llm = llama_oracle.load(path, n_ctx=64)
    llm.eval(list(tokens))
    return np.asarray(llm.scores[:len(tokens)], dtype=np.float32)


@pytest.mark.parametrize("family", EXPORT)
def test_a_quantized_export_is_protected_inspected_audited_requantized_and_loads(converted, exported, family, tmp_path):
    """export --type q8_0 scans by default: the planted weight is recorded, inspect lists it, audit finds it
    intact, quantize of the (also scanned) f32 export keeps the record, and llama.cpp's logits from the
    q8_0 file stay within Q8_0's rounding of those from the f32 one."""
    import json

    model_dir, _ = converted(family)
    planted = [PLANT.layer, PLANT.row, PLANT.col]
    q8_0 = tmp_path / "q8_0.gguf"
    result = swtool("export", model_dir, "-o", q8_0, "--type", "q8_0", "--no-progress")
    assert result.returncode == 0, result.stderr
    info = json.loads(swtool("inspect", q8_0, "--json").stdout)
    assert planted in [[sw["layer"], sw["row"], sw["col"]] for sw in info["recorded_super_weights"]]
    audit = swtool("audit", q8_0, "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    findings = json.loads(audit.stdout)["findings"]
    assert planted in [[f["layer"], f["row"], f["col"]] for f in findings if f["status"] == "intact"]
    q4_0 = tmp_path / "q4_0.gguf"
    result = swtool("quantize", exported(family), "-o", q4_0, "--type", "q4_0", "--no-progress")
    assert result.returncode == 0, result.stderr
    recorded = json.loads(swtool("inspect", q4_0, "--json").stdout)["recorded_super_weights"]
    assert planted in [[sw["layer"], sw["row"], sw["col"]] for sw in recorded]
    tokens = prompt(model_dir)
    f32_logits = llama_cpp_logits(exported(family), tokens)
    gap = np.abs(llama_cpp_logits(q8_0, tokens) - f32_logits).max() / np.abs(f32_logits).max()
    assert gap <= Q8_0_GAP

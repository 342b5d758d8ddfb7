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

import functools

import numpy as np
import pytest

from fixtures.cli_run import swtool_in_process
from fixtures.gguf_compare import dequantized, gguf_py_contents, key_differences, read_contents, tensor_differences
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
    """transformers' logits of `tokens`, computed once per model and prompt for this module's two tests
    that compare with them (read only)."""
    return _transformers_logits(model_dir, tuple(int(t) for t in tokens))


@functools.lru_cache(maxsize=None)
def _transformers_logits(model_dir, tokens):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([list(tokens)])).logits[0].numpy()
    logits.flags.writeable = False
    return logits


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
    result = swtool_in_process("scan", gguf_path, "-o", tmp_path / "catalog.json", "--no-progress")
    assert result.returncode == 0, result.stderr
    found = {(w["layer"], w["row"], w["col"]) for w in json.loads((tmp_path / "catalog.json").read_text())["super_weights"]}
    assert (PLANT.layer, PLANT.row, PLANT.col) in found


@pytest.fixture(scope="module")
def exports(converted, tmp_path_factory):
    """family -> {"f32": path, "q8_0": path}: swtool's `export --type f32` and `--type q8_0` (which scans by
    default) of the converter's input model, both written on the family's first use, one after the other:
    the second export reuses the vocabulary gguf-py built for the first (swtool.export_vocab keeps the last)."""
    built = {}

    def get(family):
        if family not in built:
            model_dir, _ = converted(family)
            files = {}
            for qtype in ("f32", "q8_0"):
                files[qtype] = tmp_path_factory.mktemp(f"export-{qtype}-{family}") / f"model-{qtype}.gguf"
                result = swtool_in_process("export", model_dir, "-o", files[qtype], "--type", qtype, "--no-progress")
                assert result.returncode == 0, result.stderr
            built[family] = files
        return built[family]

    return get


@pytest.fixture(scope="module")
def exported(exports):
    """family -> swtool's f32 export of the converter's input model."""
    return lambda family: exports(family)["f32"]


@pytest.fixture(scope="module")
def exported_q8_0(exports):
    """family -> swtool's q8_0 export of the converter's input model."""
    return lambda family: exports(family)["q8_0"]


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
    model_dir, _ = converted(family)
    tokens = prompt(model_dir)
    expected = transformers_logits(model_dir, tokens)
    got = llama_cpp_logits(exported(family), tokens)
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()


def llama_cpp_logits(path, tokens):
    """llama.cpp's logits of `tokens` from the GGUF at `path`, computed once per file and prompt: the f32
    export's serve this test and the quantized export's below (read only)."""
    return _llama_cpp_logits(str(path), tuple(int(t) for t in tokens))


@functools.lru_cache(maxsize=None)
def _llama_cpp_logits(path, tokens):
    from fixtures import llama_oracle

    llm = llama_oracle.load(path, n_ctx=64)
    llm.eval(list(tokens))
    logits = np.asarray(llm.scores[:len(tokens)], dtype=np.float32)
    logits.flags.writeable = False
    return logits


@pytest.mark.parametrize("family", EXPORT)
def test_a_quantized_export_is_protected_inspected_audited_requantized_and_loads(converted, exported, exported_q8_0, family,
                                                                                 tmp_path):
    """export --type q8_0 scans by default: the planted weight is recorded, inspect lists it, audit finds it
    intact, quantize of the (also scanned) f32 export keeps the record, and llama.cpp's logits from the
    q8_0 file stay within Q8_0's rounding of those from the f32 one."""
    import json

    model_dir, _ = converted(family)
    planted = [PLANT.layer, PLANT.row, PLANT.col]
    q8_0 = exported_q8_0(family)
    info = json.loads(swtool_in_process("inspect", q8_0, "--json").stdout)
    assert planted in [[sw["layer"], sw["row"], sw["col"]] for sw in info["recorded_super_weights"]]
    audit = swtool_in_process("audit", q8_0, "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    findings = json.loads(audit.stdout)["findings"]
    assert planted in [[f["layer"], f["row"], f["col"]] for f in findings if f["status"] == "intact"]
    q4_0 = tmp_path / "q4_0.gguf"
    result = swtool_in_process("quantize", exported(family), "-o", q4_0, "--type", "q4_0", "--no-progress")
    assert result.returncode == 0, result.stderr
    recorded = json.loads(swtool_in_process("inspect", q4_0, "--json").stdout)["recorded_super_weights"]
    assert planted in [[sw["layer"], sw["row"], sw["col"]] for sw in recorded]
    tokens = prompt(model_dir)
    f32_logits = llama_cpp_logits(exported(family), tokens)
    gap = np.abs(llama_cpp_logits(q8_0, tokens) - f32_logits).max() / np.abs(f32_logits).max()
    assert gap <= Q8_0_GAP


def every_value_type_gguf(path):
    """A GGUF written by gguf-py with every value type as a scalar and as an array (gguf-py writes no empty array),
    and tensors of float, integer and block-quantized types (their bytes random)."""
    import gguf

    T = gguf.GGUFValueType
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    scalars = {T.UINT8: 200, T.INT8: -100, T.UINT16: 60000, T.INT16: -30000, T.UINT32: 4_000_000_000,
               T.INT32: -2_000_000_000, T.FLOAT32: 0.1, T.BOOL: True, T.UINT64: 2**63 + 5, T.INT64: -2**62,
               T.FLOAT64: 0.1, T.STRING: "ünïcode"}
    for kind, value in scalars.items():
        writer.add_key_value(f"test.{kind.name.lower()}", value, kind)
        array = ["", "a b", "ünï"] if kind == T.STRING else [value, value, value]
        writer.add_key_value(f"test.{kind.name.lower()}_array", array, T.ARRAY, sub_type=kind)
    Q = gguf.GGMLQuantizationType
    for kind, dtype in ((Q.F32, np.float32), (Q.F16, np.float16), (Q.I8, np.int8), (Q.I32, np.int32)):
        writer.add_tensor(f"t.{kind.name.lower()}", rng.normal(size=(3, 512)).astype(dtype), raw_dtype=kind)
    for kind in (Q.BF16, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.IQ4_XS):  # rows of bytes: 512 values each
        block, size = gguf.GGML_QUANT_SIZES[kind]
        data = rng.integers(0, 256, (3, 512 // block * size), dtype=np.uint8)
        writer.add_tensor(f"t.{kind.name.lower()}", data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("which", ["every value type", "converter llama", "converter gemma", "export llama q8_0"])
def test_the_fast_reader_reads_what_gguf_py_reads(converted, exported_q8_0, which, tmp_path):
    """read_contents (fixtures/gguf_compare.py, which the converter-equality tests use) gives every key's
    value and value types and every tensor's shape, type and bytes as gguf-py's GGUFReader does, and
    dequantized (test_gguf_dense.py) each tensor's values as gguf-py dequantizes its reading."""
    if which == "every value type":
        path = every_value_type_gguf(tmp_path / "types.gguf")
    elif which.startswith("converter"):
        _, path = converted(which.split()[1])
    else:
        path = exported_q8_0("llama")
    ours, oracle = read_contents(path), gguf_py_contents(path)
    assert ours.keys == oracle.keys
    assert ours.tensors == oracle.tensors and ours.order == oracle.order
    if which == "export llama q8_0":
        assert any(k.startswith("swtool.") for k in ours.keys)  # swtool's own keys are read too
    if which != "every value type":  # (its tensors' bytes are random: no values to dequantize)
        import gguf

        from fixtures.gguf_cache import gguf_reader

        for tensor in gguf_reader(path).tensors:
            assert np.array_equal(dequantized(path, tensor.name), gguf.quants.dequantize(tensor.data, tensor.tensor_type))


def test_an_export_parses_tokenizer_json_once_and_writes_the_same_file(converted, tmp_path, monkeypatch):
    """export parses tokenizer.json once while its bytes stay the same (export_vocab.read_tokenizer_json),
    and the file written from a kept parse is the one a fresh parse gives."""
    import gguf

    from swtool import export_vocab

    model_dir, _ = converted("llama")
    parses = []
    real_parse_json = export_vocab.parse_json

    def counted_parse_json(raw, path, *args, **kwargs):
        parses.append(path.name)
        return real_parse_json(raw, path, *args, **kwargs)

    monkeypatch.setattr(export_vocab, "parse_json", counted_parse_json)
    export_vocab._last_parsed.clear()
    export_vocab._last_special.clear()
    special_vocabularies = []
    real_special_vocab = gguf.SpecialVocab
    monkeypatch.setattr(gguf, "SpecialVocab", lambda *a, **k: special_vocabularies.append(a) or real_special_vocab(*a, **k))
    outputs = []
    for run in ("fresh", "kept"):
        out = tmp_path / f"{run}.gguf"
        result = swtool_in_process("export", model_dir, "-o", out, "--type", "f32", "--no-scan", "--no-progress")
        assert result.returncode == 0, result.stderr
        assert parses.count("tokenizer.json") == 1  # not before the scan and again when writing, nor per export
        assert len(special_vocabularies) == 1  # gguf-py's merges and special ids: built once too
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_an_export_after_a_changed_tokenizer_config_writes_the_change(converted, tmp_path):
    """A kept SpecialVocab (export_vocab.special_vocabulary) is built again when a file it reads changes: the
    chat template of tokenizer_config.json, as gguf-py's SpecialVocab reads it, reaches the second export."""
    import json
    import shutil

    model_dir, _ = converted("llama")
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    templates = []
    for template in ("{{ 'first' }}", "{{ 'second' }}"):
        config = json.loads((copy / "tokenizer_config.json").read_text())
        (copy / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
        out = tmp_path / f"model-{len(templates)}.gguf"
        result = swtool_in_process("export", copy, "-o", out, "--type", "f32", "--no-scan", "--no-progress")
        assert result.returncode == 0, result.stderr
        templates.append(read_contents(out).keys["tokenizer.chat_template"][1])  # (held to gguf-py's reading below)
    assert templates == ["{{ 'first' }}", "{{ 'second' }}"]


def test_a_changed_tokenizer_json_is_read_again(tmp_path):
    import json

    from swtool import export_vocab

    path = tmp_path / "tokenizer.json"  # (read_tokenizer_json asks only for a JSON object: a small one will do)
    original = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b"]}}
    path.write_text(json.dumps(original))
    first = export_vocab.read_tokenizer_json(tmp_path)
    changed = {"model": {**original["model"], "vocab": {"a": 0, "b": 1, "ab": 2}}}
    path.write_text(json.dumps(changed))
    assert first == original and export_vocab.read_tokenizer_json(tmp_path) == changed
    path.unlink()
    path.write_text(json.dumps(original))  # a new file: the first's text, perhaps its inode number
    assert export_vocab.read_tokenizer_json(tmp_path) == original

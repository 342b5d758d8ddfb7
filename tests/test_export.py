"""swtool export / quantize, judged by llama.cpp itself and by gguf-py's reader.

Oracles:
  - llama.cpp (llama-cpp-python): loads every file, tokenizes, generates greedily, gives
    the logits perplexity is computed from (llama_oracle.py), and quantizes with its own
    llama_model_quantize, whose output swtool's must equal byte for byte;
  - the original SmolLM2 GGUF, written by llama.cpp's converter: the vocabulary and
    hyper-parameters swtool writes must be its own;
  - transformers: greedy tokens, tokenization, and the logits of tiny models;
  - gguf-py's GGUFReader for reading the files back, independently of swtool's reader (through
    fixtures/gguf_compare.py's parser, held to GGUFReader by tests/test_gguf_converter.py).
"""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from fixtures import llama_oracle
from swtool.gguf_export import ExportOptions, export
from swtool.tokenizer import encode
from fixtures.cli_run import one_line_error, swtool_in_process
from fixtures.gguf_compare import read_contents

pytestmark = pytest.mark.real

T = gguf.GGMLQuantizationType
TEXTS = ["Apple Inc. is a worldwide tech company.", "12345 67.89 x=1_000_000 and 3.14159",
         "I'm sure you're right, WE'LL see what they'D say", "tab\there\n\nnew lines\r\n ok",
         "héllo wörld ñ 東京タワー ١٢٣", "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
         "def f(x):\n    return x**2  # square"]
PROMPT = "The capital of France is"


def fields(path):
    """{key: (value, types)} of a GGUF file as gguf-py's reader gives them (fixtures/gguf_compare.py: its
    header parser, held to gguf-py's GGUFReader by tests/test_gguf_converter.py, without GGUFReader's
    seconds of decoding SmolLM2's vocabulary element by element, in every file this module reads)."""
    return {key: (value, [int(gguf.GGUFValueType[name]) for name in types])
            for key, (types, value) in read_contents(path).keys.items()}


def tensors(path):
    """{name: (ggml type, raw bytes, logical shape)} of a GGUF file, located by gguf_compare.read_contents (as
    gguf-py locates them) and read from the file (read-only memory-mapped views)."""
    contents = read_contents(path)
    raw = np.memmap(path, np.uint8, mode="r")
    return {name: (T[kind], raw[contents.where[name][0]:sum(contents.where[name])], tuple(reversed(dims)))
            for name, (dims, kind, _) in contents.tensors.items()}


def dequantized(path, name):
    qtype, data, shape = tensors(path)[name]
    return gguf.quants.dequantize(data.reshape(shape[0], -1), qtype).reshape(shape)


def source_tensor(smollm2, hf_name):
    from safetensors.torch import load_file

    return load_file(str(smollm2 / "model.safetensors"))[hf_name].float().numpy()


@pytest.fixture(scope="module")
def catalog(smollm2_catalog):
    return smollm2_catalog


@pytest.fixture(scope="module")
def exports(smollm2_export):
    """{type: path}: SmolLM2 exported with its catalog and the default handling (keep, Q8_0)."""
    return {kind: smollm2_export(kind) for kind in ("f16", "q8_0", "q4_0", "q4_k")}


@pytest.fixture(scope="module")
def original(smollm2):
    from fixtures import smollm2 as builder

    return builder.fetch_gguf()


@pytest.fixture(scope="module")
def prose_ids(smollm2):
    return encode(smollm2, open(smollm2.parents[1] / "prose.txt", encoding="utf-8").read())


@pytest.fixture(scope="module")
def f16_llama(exports):
    return llama_oracle.load(exports["f16"])


@pytest.fixture(scope="module")
def f16_prose(exports, prose_ids, llama_logits):
    """(windows, logits): the first 2 windows of 512 of prose.txt and llama.cpp's logits of the F16 export on
    them (conftest's llama_logits: decoded once per run, shared with test_export_importance.py's reference)."""
    windows = llama_oracle.windows(prose_ids, 512, 2)
    return windows, llama_logits(exports["f16"], windows)


@pytest.fixture(scope="module")
def f16_first_window(f16_prose):
    windows, logits = f16_prose
    return llama_oracle.perplexity_of_logits(windows[:1], logits[:1])[0]


# --- what the file says ---------------------------------------------------------------

def test_vocabulary_and_hyperparameters_are_those_of_llama_cpps_converter(exports, original):
    """SmolLM2's GGUF from llama.cpp's converter and swtool's export of it agree key by key."""
    ours, theirs = fields(exports["f16"]), fields(original)
    keys = [key for key in theirs if key.startswith(("tokenizer.", "llama.")) or key in ("general.architecture",)]
    keys.remove("tokenizer.ggml.add_space_prefix")  # the converter writes False, llama.cpp's default for gpt2
    assert "tokenizer.ggml.pre" in keys and "tokenizer.chat_template" in keys and "tokenizer.ggml.merges" in keys
    for key in keys:
        assert ours[key] == theirs[key], key
    assert ours["general.file_type"][0] == 1  # MOSTLY_F16


def test_llama_cpp_tokenizes_the_export_like_transformers(exports, smollm2):
    import llama_cpp
    import transformers

    vocab = llama_cpp.Llama(str(exports["q4_0"]), vocab_only=True, verbose=False)
    reference = transformers.AutoTokenizer.from_pretrained(smollm2)
    for text in TEXTS:
        assert vocab.tokenize(text.encode(), add_bos=True, special=True) == reference(text)["input_ids"], text


# --- llama.cpp runs the exports ----------------------------------------------------------

def test_f16_export_perplexity_is_swtool_evals(f16_prose, smollm2, prose_ids):
    from swtool.evaluate import perplexity
    from swtool.model import load_model

    ours, count = llama_oracle.perplexity_of_logits(*f16_prose)  # llama.cpp's logits of the first 2 windows
    reference, reference_count = perplexity(load_model(smollm2), prose_ids[:1024], ctx=512)
    assert count == reference_count == 1022
    assert ours == pytest.approx(reference, rel=1e-4)  # measured gap: 9.2e-6 relative (llama.cpp's f16 KV cache)


def test_f16_export_generates_what_transformers_generates(f16_llama, smollm2):
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    reference = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0].tolist()[len(ids):]
    assert llama_oracle.greedy_ids(f16_llama, ids, 12) == expected


@pytest.mark.parametrize("kind, limit", [("q8_0", 1.01), ("q4_0", 1.15), ("q4_k", 1.15)])
def test_quantized_exports_load_generate_and_score(exports, prose_ids, f16_first_window, kind, limit):
    llm = llama_oracle.load(exports[kind])
    ppl, _ = llama_oracle.perplexity(llm, prose_ids, 512, 1)
    assert 1 / limit < ppl / f16_first_window < limit, (kind, ppl, f16_first_window)
    text = llama_oracle.greedy(llm, PROMPT, 8)
    assert len(text.strip()) > 0


def test_types_follow_llama_quantizes_rules(exports):
    """q4_k on SmolLM2: Q4_K where rows of 1536 allow (ffn_down), llama.cpp's Q5_0 fallback for rows
    of 576, the tied embedding as output (Q6_K -> Q8_0 fallback), the super weights' tensors in Q8_0."""
    types = {name: qtype for name, (qtype, _, _) in tensors(exports["q4_k"]).items()}
    assert types["token_embd.weight"] == T.Q8_0
    for name, qtype in types.items():
        if name.endswith("_norm.weight"):
            assert qtype == T.F32, name
        elif name in ("blk.2.ffn_down.weight", "blk.11.ffn_down.weight"):
            assert qtype == T.Q8_0, name
        elif name.endswith("ffn_down.weight"):
            assert qtype == T.Q4_K, name
        elif name != "token_embd.weight":
            assert qtype == T.Q5_0, name


@pytest.mark.parametrize("kind, ftype_name", [("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"),
                                              ("q4_k_m", "LLAMA_FTYPE_MOSTLY_Q4_K_M")])
def test_quantize_writes_what_llama_quantize_writes(exports, smollm2_llama_quantized, tmp_path, kind, ftype_name):
    """Without super-weight handling, `swtool quantize` of an F16 GGUF = llama-quantize's file: every
    tensor's type and bytes, every metadata key and value (the swtool.* ones included)."""
    from llama_cpp import llama_cpp as L

    theirs = smollm2_llama_quantized(kind)  # llama_model_quantize of exports["f16"] to LLAMA_FTYPE_MOSTLY_<kind>
    assert getattr(L, ftype_name) == getattr(L, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    result = swtool_in_process("quantize", exports["f16"], "-o", tmp_path / "swtool.gguf", "--type", kind,
                               "--sw-handling", "none", "--importance", "none", "--no-progress")
    assert result.returncode == 0, result.stderr
    ours = tmp_path / "swtool.gguf"
    ours_tensors, their_tensors = tensors(ours), tensors(theirs)
    assert set(ours_tensors) == set(their_tensors)  # llama-quantize reorders them; llama.cpp reads either order
    for name, (qtype, data, shape) in their_tensors.items():
        assert ours_tensors[name][0] == qtype, name
        assert np.array_equal(ours_tensors[name][1], data), name
    assert fields(ours) == fields(theirs)


# --- super weights in the file ---------------------------------------------------------------

def test_swtool_metadata_round_trips_and_survives_llama_quantize(exports, catalog, smollm2_llama_quantized):
    recorded = json.loads(open(catalog).read())
    sws = recorded["super_weights"]
    meta = fields(exports["q4_0"])
    U32, F32, STR, ARR = 4, 6, 8, 9
    assert meta["swtool.format_version"] == (1, [U32])
    assert meta["swtool.super_weights.layer"] == ([sw["layer"] for sw in sws], [ARR, U32])
    assert meta["swtool.super_weights.row"] == ([sw["row"] for sw in sws], [ARR, U32])
    assert meta["swtool.super_weights.col"] == ([sw["col"] for sw in sws], [ARR, U32])
    assert meta["swtool.super_weights.value"] == ([sw["value"] for sw in sws], [ARR, F32])  # exact float32
    assert meta["swtool.super_weights.tensor"] == ([sw["gguf_tensor"] for sw in sws], [ARR, STR])
    assert meta["swtool.detection.prompt"] == (recorded["detection"]["prompt"], [STR])
    assert meta["swtool.export.handling"] == ("keep:Q8_0", [STR])
    # llama.cpp loads the file with them and lists the scalar ones
    listed = llama_oracle.load(exports["q4_0"], n_ctx=64).metadata
    assert listed["swtool.format_version"] == "1" and listed["swtool.export.handling"] == "keep:Q8_0"
    # llama.cpp's quantizer copies them unchanged
    requantized = smollm2_llama_quantized("q4_k_m")  # llama_model_quantize of exports["f16"]
    swtool_keys = {key: value for key, value in fields(exports["f16"]).items() if key.startswith("swtool.")}
    assert len(swtool_keys) == 8
    assert {key: value for key, value in fields(requantized).items() if key.startswith("swtool.")} == swtool_keys


def test_super_weight_tensors_are_kept_in_q8_0_by_default(exports, smollm2):
    """keep (the default, --keep-type q8_0): the tensors holding a super weight hold the bytes of
    gguf-py's own Q8_0 quantizer (bit-exact with ggml's) applied to the source; the others Q4_0."""
    types = {name: (qtype, data) for name, (qtype, data, _) in tensors(exports["q4_0"]).items()}
    for layer in (2, 11):
        qtype, data = types[f"blk.{layer}.ffn_down.weight"]
        source = source_tensor(smollm2, f"model.layers.{layer}.mlp.down_proj.weight")
        assert qtype == T.Q8_0
        assert np.array_equal(data, gguf.quants.quantize(source, T.Q8_0).reshape(-1))
    assert types["blk.3.ffn_down.weight"][0] == T.Q4_0


def test_keep_type_and_tensor_type_from_the_command_line(smollm2, catalog, tmp_path):
    out = tmp_path / "mixed.gguf"
    result = swtool_in_process("export", smollm2, "-o", out, "--type", "q4_0", "--catalog", catalog,
                               "--keep-type", "f16", "--tensor-type", r"blk\.11\.ffn_down=q5_1",
                               "--tensor-type", r"attn_v=q8_0", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "super weight in" in result.stdout and "--keep-type f16" in result.stdout
    types = {name: qtype for name, (qtype, _, _) in tensors(out).items()}
    assert types["blk.2.ffn_down.weight"] == T.F16  # --keep-type: the source's values exactly
    source = source_tensor(smollm2, "model.layers.2.mlp.down_proj.weight")
    assert np.array_equal(dequantized(out, "blk.2.ffn_down.weight"), source)
    assert types["blk.11.ffn_down.weight"] == T.Q5_1  # --tensor-type wins over --keep-type
    assert all(types[f"blk.{i}.attn_v.weight"] == T.Q8_0 for i in range(30))  # a search, not a full match
    assert types["blk.3.ffn_down.weight"] == T.Q4_0
    assert fields(out)["swtool.export.handling"][0] == "keep:F16"


def test_isolate_reorders_channels_without_changing_the_model(smollm2, catalog, tmp_path, prose_ids):
    """isolate: each super weight gets a Q4_0 block of its own, with neighbours that fit its grid; gate/up
    rows and down columns move together, so llama.cpp's perplexity barely moves, and the super weights
    stay exact while their rows lose less than in the plain file."""
    # without importance: with one, llama-quantize's rule makes layer 2's ffn_down Q4_1 (tests/test_export_importance.py)
    plain = export(smollm2, tmp_path / "none.gguf", ExportOptions("q4_0", catalog=str(catalog), handling="none",
                                                            progress=False, importance="none")).path
    isolated = export(smollm2, tmp_path / "isolate.gguf", ExportOptions("q4_0", catalog=str(catalog),
                                                                  handling="isolate", progress=False,
                                                                  importance="none")).path
    meta = fields(isolated)
    assert meta["swtool.export.handling"][0] == "isolate"
    plain_tensors, isolated_tensors = tensors(plain), tensors(isolated)
    for layer in (2, 11):
        order = np.array(meta[f"swtool.ffn_order.{layer}"][0])
        assert sorted(order) == list(range(1536))
        assert np.count_nonzero(order != np.arange(1536)) <= 2 * 2 * 31  # two swapped blocks per super weight
        # gate and up: the same quantized rows, reordered (a row's blocks do not depend on other rows)
        for kind in ("ffn_gate", "ffn_up"):
            name = f"blk.{layer}.{kind}.weight"
            rows = plain_tensors[name][1].reshape(1536, -1)
            assert np.array_equal(isolated_tensors[name][1].reshape(1536, -1), rows[order])
        # down: the recorded coordinates point at the exact super weights, each alone in its block
        down = dequantized(isolated, f"blk.{layer}.ffn_down.weight")
        source = source_tensor(smollm2, f"model.layers.{layer}.mlp.down_proj.weight")
        blocks = []
        for sw_layer, row, col, value in zip(*(meta[f"swtool.super_weights.{k}"][0]
                                               for k in ("layer", "row", "col", "value"))):
            if sw_layer == layer:
                assert down[row, col] == value == source[row, order[col]]
                blocks.append(col // 32)
        assert len(blocks) == len(set(blocks)) == 2  # one block each
        # the rows holding super weights lose less than in the plain file
        back = np.empty_like(down)
        back[:, order] = down
        plain_down = dequantized(plain, f"blk.{layer}.ffn_down.weight")
        assert np.square(back[507] - source[507]).sum() < np.square(plain_down[507] - source[507]).sum()
    plain_ppl = llama_oracle.perplexity(llama_oracle.load(plain), prose_ids, 512, 1)[0]
    isolated_ppl = llama_oracle.perplexity(llama_oracle.load(isolated), prose_ids, 512, 1)[0]
    assert abs(isolated_ppl / plain_ppl - 1) < 0.02, (isolated_ppl, plain_ppl)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K])
def test_isolation_gives_a_planted_super_weight_a_clean_block(qtype):
    """On rows of N(0, 0.02) weights with outliers -2.5 and 2.25, plain quantization rounds the outliers'
    block-mates (nearly) to zero. Isolation never makes their row worse, and for the 32-element
    blocks it removes most of that loss, while the outliers come back as close as before."""
    from swtool.quant import dequantize, quantize
    from swtool.quant.isolate import isolation_order

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.02, (64, 2048)).astype(np.float32)
    weight[7, 100], weight[7, 1500] = -2.5, 2.25
    order = isolation_order(weight[[7]], [100, 1500], qtype)
    assert sorted(order) == list(range(2048))

    def row_error(w):
        back = dequantize(quantize(w, qtype), qtype, w.shape)
        return np.square(back - w)[7].sum(), back

    plain, plain_back = row_error(weight)
    isolated, isolated_back = row_error(weight[:, order])
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    # each super weight keeps its column; only its own block and one donor block trade columns
    assert order[100] == 100 and order[1500] == 1500
    moved = np.flatnonzero(order != np.arange(2048))
    touched = set(moved // block)
    assert len(touched) <= 4
    assert len(moved) <= 2 * 2 * (block - 1)
    if moved.size:
        assert {100 // block, 1500 // block} & touched
        assert isolated < plain, (plain, isolated)
    else:
        assert isolated == plain
    if block == 32:  # every 32-element type finds a donor, and the super weights' blocks get cleaner
        assert moved.size == 2 * 2 * 31 and isolated < 0.9 * plain, (plain, isolated)
        for col in (100, 1500):
            mates = [c for c in range(col // 32 * 32, col // 32 * 32 + 32) if c != col]
            plain_loss = np.square(plain_back[7, mates] - weight[7, mates]).sum()
            isolated_loss = np.square(isolated_back[7, mates] - weight[7, order[mates]]).sum()
            assert isolated_loss < 0.95 * plain_loss, (col, plain_loss, isolated_loss)  # measured: 0.32 to 0.92
    for col in (100, 1500):
        true = weight[7, col]
        assert abs(isolated_back[7, col] - true) <= abs(plain_back[7, col] - true) + 1e-3
        if qtype in (T.Q4_0, T.Q5_0):  # d = S / -8 (or / -16) is an f16: the super weight comes back exact
            assert isolated_back[7, col] == true


def test_quantize_copies_metadata_and_carries_the_record(exports, tmp_path):
    """quantize of swtool's own F16 export, no --catalog: every key copied, the super weights taken
    from its swtool.* record and kept (here in F16: the input's bytes, copied), the importance from
    the prompt it records (swtool.detection.prompt)."""
    out = tmp_path / "q4.gguf"
    result = swtool_in_process("quantize", exports["f16"], "-o", out, "--type", "q4_0", "--keep-type", "f16",
                               "--no-progress")
    assert result.returncode == 0, result.stderr
    before, after = fields(exports["f16"]), fields(out)
    assert after.pop("general.file_type")[0] == 2 and before.pop("general.file_type")[0] == 1
    assert after.pop("swtool.export.handling")[0] == "keep:F16" and before.pop("swtool.export.handling")[0] == "none"
    assert after.pop("swtool.importance.source")[0].startswith("gguf metadata: the input's recorded prompt 'Apple Inc.")
    assert len(after.pop("swtool.importance.sha256")[0]) == 64
    assert after == before
    ours, theirs = tensors(out), tensors(exports["f16"])
    for name in ("blk.2.ffn_down.weight", "blk.11.ffn_down.weight"):
        assert ours[name][0] == T.F16 and np.array_equal(ours[name][1], theirs[name][1])
    assert ours["blk.3.ffn_down.weight"][0] == T.Q4_0


# --- tiny models of each family, against transformers ------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}


@pytest.mark.parametrize("family, overrides", [
    ("llama", {}),
    ("llama", {"rope_scaling": LLAMA3_ROPE}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("mistral", {"sliding_window": 64}),  # llama.cpp's llama architecture has no window; 40 tokens stay inside it
    ("qwen2", {}),
], ids=["llama", "llama3-rope", "linear-rope", "mistral", "qwen2"])
def test_tiny_families_give_transformers_logits_in_llama_cpp(tiny_factory, smollm2, tmp_path, family, overrides):
    from fixtures.tiny import build_tiny, random_tokens, torch_logits

    directory = tmp_path / "model"
    model = build_tiny(directory, family, "float32", vocab_size=49152, **overrides)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a real vocabulary: llama.cpp needs merges
        shutil.copy(smollm2 / name, directory / name)
    export(directory, tmp_path / "tiny.gguf", ExportOptions("f32", progress=False, scan=False))
    ids = [int(t) for t in random_tokens(40, seed=1, vocab=49152)]
    expected = torch_logits(model, ids)
    llm = llama_oracle.load(tmp_path / "tiny.gguf", n_ctx=64)
    llm.reset()
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)])
    tolerance = 2e-3 * np.abs(expected).max()  # llama.cpp keeps its KV cache in f16
    assert np.abs(got - expected).max() < tolerance
    if "rope_scaling" in overrides:  # the scaling matters here: without it the logits would be out of tolerance
        plain = build_tiny(tmp_path / "plain", family, "float32", vocab_size=49152,
                           **{k: v for k, v in overrides.items() if k != "rope_scaling"})
        assert np.abs(torch_logits(plain, ids) - expected).max() > 3 * tolerance


def test_same_bytes_as_copies_the_tensors_it_stores_in_the_same_type(smollm2, tmp_path, monkeypatch):
    """`swtool sweep` writes a type's keep and control files with same_bytes_as its `none` file: the tensors
    stored in the same type are copied from it, not quantized again, and the file is byte for byte the one
    written without it; the tensors whose type differs are quantized."""
    from fixtures.tiny import build_tiny
    import swtool.quant

    directory = tmp_path / "model"
    build_tiny(directory, "llama", "float32", vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, directory / name)
    plain = export(directory, tmp_path / "none.gguf", ExportOptions("q4_0", progress=False, scan=False,
                                                                     importance="none")).path
    control = ExportOptions("q4_0", progress=False, scan=False, importance="none",
                            tensor_types=(r"^blk\.1\.ffn_down\.weight$=q8_0",))
    fresh = export(directory, tmp_path / "fresh.gguf", control).path
    quantize, quantized = swtool.quant.quantize, []
    monkeypatch.setattr(swtool.quant, "quantize", lambda values, qtype, *rest: quantized.append(qtype.name)
                        or quantize(values, qtype, *rest))
    copied = export(directory, tmp_path / "copied.gguf",
                    ExportOptions(**{**control.__dict__, "same_bytes_as": str(plain)})).path
    assert copied.read_bytes() == fresh.read_bytes() != plain.read_bytes()
    # blk.1.ffn_down, and the attention's q and k of the 4 layers, whose rows the conversion permutes (copied
    # only in the source's order, so that a handling's reordering can never pick up another file's bytes)
    assert sorted(quantized) == ["Q4_0"] * 8 + ["Q8_0"]


def test_sentencepiece_vocabulary_splits_text_as_its_tokenizer_json(tmp_path):
    """A SentencePiece-style tokenizer.json (byte fallback, "▁" for spaces, merges ranked by score):
    the exported "llama" vocabulary makes llama.cpp give the tokenizer's own ids."""
    import llama_cpp
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from swtool.checkpoint.gguf_vocab import build_tokenizer, tokenizer_config
    from fixtures.tiny import build_tiny

    corpus = (Path(__file__).resolve().parents[1] / "fixtures" / "prose.txt").read_text().splitlines()
    trainer_model = Tokenizer(models.BPE())
    trainer_model.normalizer = normalizers.Replace(" ", "▁")
    trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer_model.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=800, show_progress=False))
    pieces = [piece for piece, _ in sorted(trainer_model.get_vocab().items(), key=lambda item: item[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    tokenizer = build_tokenizer(meta, "spm")  # swtool's reader turns it into a tokenizer.json
    directory = tmp_path / "model"
    build_tiny(directory, "llama", "float32", vocab_size=len(tokens), bos_token_id=1, eos_token_id=2)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta)))
    export(directory, tmp_path / "spm.gguf", ExportOptions("f32", progress=False, scan=False))
    assert fields(tmp_path / "spm.gguf")["tokenizer.ggml.model"][0] == "llama"
    vocab = llama_cpp.Llama(str(tmp_path / "spm.gguf"), vocab_only=True, verbose=False)
    for text in TEXTS + ["GNU General Public License", "<s>inside</s> text", "x", "  two  spaces"]:
        assert vocab.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text).ids, text


# --- bad input ---------------------------------------------------------------------------------

def test_bad_input_gives_one_line_and_no_file(smollm2, catalog, original, tmp_path):
    out = tmp_path / "out.gguf"
    assert "--type 'q4_x'" in one_line_error(swtool_in_process("export", smollm2, "-o", out, "--type", "q4_x"))
    assert "bad regular expression" in one_line_error(
        swtool_in_process("export", smollm2, "-o", out, "--type", "q4_0", "--tensor-type", "blk.(=q8_0"))
    assert "--allow-requantize" in one_line_error(swtool_in_process("export", original, "-o", out, "--type", "q4_0"))
    assert "already quantized (Q4_1)" in one_line_error(swtool_in_process("quantize", original, "-o", out, "--type", "q4_0"))
    wrong = json.loads(open(catalog).read())
    wrong["super_weights"][0]["value"] = 2.5
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    assert "not for this model" in one_line_error(
        swtool_in_process("export", smollm2, "-o", out, "--type", "q4_0", "--catalog", tmp_path / "wrong.json"))
    assert "cannot write there" in one_line_error(swtool_in_process("export", smollm2, "-o", tmp_path / "no" / "x.gguf",
                                                         "--type", "q4_0"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong.json"]  # nothing written, no temporary left


def test_an_error_while_writing_removes_the_partial_file(smollm2, tmp_path, monkeypatch):
    import swtool.quant

    real, calls = swtool.quant.quantize, []

    def failing(values, qtype):
        calls.append(qtype)
        if len(calls) == 20:
            raise RuntimeError("disk on fire")
        return real(values, qtype)

    monkeypatch.setattr(swtool.quant, "quantize", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export(smollm2, tmp_path / "out.gguf", ExportOptions("q8_0", progress=False, scan=False))
    assert list(tmp_path.iterdir()) == []

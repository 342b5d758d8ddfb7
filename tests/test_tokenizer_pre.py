"""`tokenizer.ggml.pre` found from tokenizer.json's structure, for the byte-level BPE shapes of real
models (GPT-2, StarCoder 2, Llama 3, Qwen2) with a vocabulary whose check-text hash is in no table.

Each tokenizer.json has the pre_tokenizer (and normalizer) its model's file on the Hub has, a
byte alphabet and a few merges chosen so that the four splits tokenize differently. A tiny model
with it goes through `swtool export`; the GGUF must name the pre-tokenizer as llama.cpp's
convert_hf_to_gguf does for that model (gguf-py reads the name), and llama.cpp, tokenizing
with that name, must give the ids Hugging Face's tokenizer gives.
"""

import json
import shutil

import gguf
import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer, pre_tokenizers

from swtool.cli import main

BOS, EOS = 256, 257  # the tiny models' special tokens (fixtures/tiny.py)

# the split regexes of Meta-Llama-3-8B's and Qwen2's tokenizer.json (\p{N}{1,3} against \p{N})
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def byte_level(use_regex, trim_offsets=True):
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": trim_offsets, "use_regex": use_regex}


def split(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


# model -> (llama.cpp's tokenizer.ggml.pre for it, normalizer, pre_tokenizer, BPE options), as on the Hub
SHAPES = {
    "openai-community/gpt2": ("gpt-2", None, byte_level(True), {}),
    "bigcode/starcoder2-3b": ("starcoder", None, {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level(True)]}, {}),
    "meta-llama/Meta-Llama-3-8B": ("llama-bpe", None, {"type": "Sequence", "pretokenizers": [
        split(LLAMA3_SPLIT), byte_level(False)]}, {"ignore_merges": True}),
    "Qwen/Qwen2-7B": ("qwen2", {"type": "NFC"}, {"type": "Sequence", "pretokenizers": [
        split(QWEN2_SPLIT), byte_level(False, trim_offsets=False)]}, {}),
}

# merges over GPT-2's byte symbols (Ġ a space, Ċ a newline) where the four splits disagree: digits
# alone or in threes, a space joined to a digit or not, case-insensitive contractions
MERGES = ["1 2", "12 3", "Ġ 1", "Ġ1 2", "Ġ t", "h e", "Ġt he", "' s", "' S", "i n", "Ġ in", "Ġ Ġ", "ĠĠ Ġ",
          "Ċ Ċ", "e r", "Ġ w", "o r", "Ġw or"]
TEXTS = ["the 12 3 123 1234 12345", "in the   word's WORD'S\n\n the", " 1 12 a1 2 \t 9", "Ġ tokens ther\n 123x"]


def tokenizer_json(normalizer, pre_tokenizer, options):
    """A byte-level BPE tokenizer.json: the 256 byte symbols, MERGES, and <s> / </s> as added tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for merge in MERGES:
        vocab[merge.replace(" ", "")] = BOS + 2 + len(vocab) - len(alphabet)
    added = [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, text in ((BOS, "<s>"), (EOS, "</s>"))]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, **options, "vocab": vocab, "merges": MERGES}}


@pytest.fixture(scope="module")
def tiny_llama(tiny_factory):
    directory, _ = tiny_factory("llama")
    return directory


@pytest.mark.parametrize("model_id", list(SHAPES))
def test_structural_pre_tokenizer_is_llama_cpps_name(model_id, tiny_llama, tmp_path):
    import llama_cpp

    name, normalizer, pre_tokenizer, options = SHAPES[model_id]
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "tokenizer.json").write_text(json.dumps(tokenizer_json(normalizer, pre_tokenizer, options)))
    out = tmp_path / "model.gguf"
    result = CliRunner().invoke(main, ["export", str(model), "-o", str(out), "--type", "f32", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == name
    hf = Tokenizer.from_file(str(model / "tokenizer.json"))
    vocab = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    for text in TEXTS:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == expected, text


def test_the_four_shapes_tokenize_differently():
    """So that a wrong name would give llama.cpp another split, and the test above would fail."""
    splits = set()
    for _, normalizer, pre_tokenizer, options in SHAPES.values():
        hf = Tokenizer.from_str(json.dumps(tokenizer_json(normalizer, pre_tokenizer, options)))
        splits.add(tuple(tuple(hf.encode(text, add_special_tokens=False).ids) for text in TEXTS))
    assert len(splits) == len(SHAPES)

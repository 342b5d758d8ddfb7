"""A GGUF file's vocabulary as a Hugging Face `tokenizers` tokenizer that splits text as llama.cpp does.

GGUF keeps the vocabulary as metadata: `tokenizer.ggml.model` ("gpt2" = byte-level
BPE with merges, "llama" = SentencePiece-style BPE with scores), the tokens, their
types, and for BPE a `tokenizer.ggml.pre` name that selects llama.cpp's
pre-tokenizer regexes (llama-vocab.cpp). Each supported name is translated to the
Hugging Face pre-tokenizer that splits text the same way; tests/test_gguf_input.py
checks every one against llama.cpp's own tokenizer. Other names are refused with
a one-line error rather than tokenized differently from llama.cpp.
"""

import hashlib

import numpy as np

from swtool.errors import CheckpointError
from swtool.kept import KeptLast
from swtool.gguf_keys import is_array

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The GPT-2 split: what ByteLevel(use_regex=True) applies, and llama.cpp for the "gpt2" pre-type family.
# Llama 3 and Qwen2 use their own regex, given here as their tokenizer.json files spell it.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (split, llama.cpp's ignore_merges, llama.cpp's default for add_bos)
# "gpt2": the GPT-2 regex; "digits+gpt2": every \p{N} alone first (llama.cpp's StarCoder/SmolLM family)
BPE_PRE_TYPES = {
    "gpt-2": ("gpt2", False, False),
    "phi-2": ("gpt2", False, False),
    "mpt": ("gpt2", False, False),
    "olmo": ("gpt2", False, False),
    "smollm": ("digits+gpt2", False, False),
    "starcoder": ("digits+gpt2", False, False),
    "refact": ("digits+gpt2", False, False),
    "llama-bpe": ("llama3", True, True),
    "llama3": ("llama3", True, True),
    "llama-v3": ("llama3", True, True),
    "dbrx": ("llama3", False, False),
    "smaug-bpe": ("llama3", False, False),
    "qwen2": ("qwen2", False, False),
    "deepseek-r1-qwen": ("qwen2", False, False),
    "stablelm2": ("qwen2", False, False),
}


def supported():
    """The vocabularies swtool tokenizes, for error messages and the README."""
    return "gpt2 (pre-tokenizer " + ", ".join(BPE_PRE_TYPES) + ") and llama (SentencePiece)"


_last_checked = KeptLast()  # the model of the last vocabulary found consistent, by vocabulary_digest


def check(meta, source):
    """The vocabulary's model ("gpt2" or "llama") once everything build_tokenizer needs is there and
    consistent; a one-line error otherwise. inspect calls it too, so it refuses what scan refuses.
    The checks read every token and merge, so the last vocabulary that passed is remembered by its bytes
    (all they read); a refused one is checked, and refused, every time."""
    return _last_checked.get(vocabulary_digest(meta), lambda: _check(meta, source))


def _check(meta, source):
    model = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(source, "no vocabulary in the GGUF metadata (tokenizer.ggml.tokens)")
    if model not in ("gpt2", "llama"):
        raise CheckpointError(source, f"tokenizer model {model!r} is not supported; supported: {supported()}")
    check_vocabulary(meta, source)
    if model == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in BPE_PRE_TYPES:
            raise CheckpointError(source, f"BPE pre-tokenizer {pre!r} is not supported; supported: {supported()}")
        if "tokenizer.ggml.merges" not in meta:  # llama.cpp refuses such a file too
            raise CheckpointError(source, "metadata tokenizer.ggml.merges: missing, and a gpt2 (byte-level BPE) "
                                          "vocabulary needs its merges")
    return model


_last_built = KeptLast()  # by vocabulary_digest; callers only save it


def build_tokenizer(meta, source):
    """A tokenizers.Tokenizer equivalent to llama.cpp's for this metadata; a one-line error if unsupported.

    The last one built is kept, by the bytes of the tokenizer.* metadata (all that check and _build read):
    every command that runs a GGUF checks and builds its vocabulary, ~0.2 s for 49,152 tokens. Callers
    share it: never modify it. A refused vocabulary is never kept, so it is refused again."""
    return _last_built.get(vocabulary_digest(meta), lambda: _checked_build(meta, source))


def _checked_build(meta, source):
    model = check(meta, source)
    try:  # the Rust library reports any inconsistency (a merge of unknown tokens ...) as a plain Exception
        return _build(meta, model)
    except Exception as e:
        if type(e) is not Exception:  # swtool's own errors, and bugs, as they are
            raise
        raise CheckpointError(source, f"the GGUF vocabulary does not make a tokenizer "
                                      f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def vocabulary_digest(meta):
    """sha256 of every tokenizer.* key with its value and type: string arrays as stored (not decoded), number
    arrays as their bytes and dtype, anything else by its repr (which tells 1, 1.0 and True apart)."""
    from swtool.checkpoint.gguf_file import LazyStrings, NumberArray

    digest = hashlib.sha256()
    for key in sorted(k for k in meta if k.startswith("tokenizer.")):
        value = meta[key]
        if isinstance(value, LazyStrings):
            part = b"strings " + value.digest()
        elif isinstance(value, NumberArray):
            array = np.ascontiguousarray(value.array)
            part = b"numbers " + array.dtype.str.encode() + hashlib.sha256(array.data).digest()
        else:
            part = b"value " + repr((type(value).__name__, value)).encode("utf-8", "surrogatepass")
        digest.update(key.encode("utf-8", "surrogatepass") + b"\0" + hashlib.sha256(part).digest())
    return digest.digest()


def check_vocabulary(meta, source):
    """The tokenizer.ggml.* keys have the types and lengths llama.cpp expects, before anything is built."""
    def bad(key, what):
        return CheckpointError(source, f"metadata {key}: {what}")

    tokens = meta["tokenizer.ggml.tokens"]
    if not is_array(tokens) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise bad("tokenizer.ggml.tokens", "not a non-empty array of strings")
    n = len(tokens)
    for key, kinds in (("tokenizer.ggml.token_type", (int,)), ("tokenizer.ggml.scores", (int, float))):
        values = meta.get(key)
        if values is None:
            continue
        if not is_array(values) or len(values) != n:
            raise bad(key, f"not an array of {n} values, one per token")
        if not all(isinstance(v, kinds) and type(v) is not bool for v in values):
            raise bad(key, "holds values of the wrong type")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None and (not is_array(merges) or not all(isinstance(m, str) for m in merges)):
        raise bad("tokenizer.ggml.merges", "not an array of strings")
    # byte-level tokens spell a space "Ġ": each merge is two tokens joined by one space
    broken = next((m for m in merges or () if len(m.split(" ")) != 2 or "" in m.split(" ")), None)
    if broken is not None:
        raise bad("tokenizer.ggml.merges", f"{broken!r} is not two tokens separated by one space")
    pre = meta.get("tokenizer.ggml.pre")
    if pre is not None and not isinstance(pre, str):
        raise bad("tokenizer.ggml.pre", f"{pre!r} is not a string")
    for name in SPECIAL_KEYS.values():
        token_id = meta.get(f"tokenizer.ggml.{name}")
        if token_id is not None and (type(token_id) is not int or not 0 <= token_id < n):
            raise bad(f"tokenizer.ggml.{name}", f"{token_id!r} is not a token id below {n}")
    for flag, name in ((adds_bos(meta), "bos_token_id"), (meta.get("tokenizer.ggml.add_eos_token"), "eos_token_id")):
        if not flag:
            continue
        if f"tokenizer.ggml.{name}" not in meta:
            raise bad(f"tokenizer.ggml.{name}", "missing, but the vocabulary adds that token")
        text = tokens[meta[f"tokenizer.ggml.{name}"]]
        if ":" in text or text.startswith("$"):  # what the template syntax of _post_processor cannot spell
            raise bad(f"tokenizer.ggml.{name}", f"token {text!r} cannot be placed around the text "
                                                f"(a tokenizers template piece has no ':', no leading '$')")


def _build(meta, model):
    tokenizer = _byte_level_bpe(meta) if model == "gpt2" else _sentencepiece_bpe(meta)
    tokenizer.post_processor = _post_processor(meta)
    tokens, kinds = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type")
    if kinds is not None:  # already in the vocabulary, so they keep their ids
        from tokenizers import AddedToken

        # control tokens (<|im_start|>, <s> ...) are special; llama.cpp finds user-defined ones in raw text too
        special = [AddedToken(token, special=True, normalized=False)
                   for token, kind in zip(tokens, kinds) if kind in (CONTROL, UNKNOWN)]
        user = [AddedToken(token, special=False, normalized=False)
                for token, kind in zip(tokens, kinds) if kind == USER_DEFINED]
        tokenizer.add_special_tokens(special)
        tokenizer.add_tokens(user)
    return tokenizer


def _byte_level_bpe(meta):
    """GPT-2 style byte-level BPE, with the pre-tokenizer `tokenizer.ggml.pre` names."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    split, ignore_merges, _ = BPE_PRE_TYPES[meta.get("tokenizer.ggml.pre", "default")]  # check() knows it
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    # byte-level tokens spell a space "Ġ", so the one space in a merge separates its halves
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", ())]
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    if split == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits+gpt2":  # llama.cpp first isolates every \p{N}, then applies the GPT-2 regex
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        regex = LLAMA3_REGEX if split == "llama3" else QWEN2_REGEX
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta):
    """A SentencePiece ("llama") vocabulary: merges by score, spaces as "▁", unknown bytes as <0xXX>.

    llama.cpp repeatedly joins the neighbouring pair whose concatenation is the
    highest-scoring token. That is BPE with one merge (left, right) per split of
    every token into two tokens, ranked by the whole token's score.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens, scores = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.scores")
    if scores is None:
        scores = [-float(i) for i in range(len(tokens))]
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    merges = []
    for token_id, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[token_id], token_id, vocab[left], left, right))
    merges.sort()
    unk = tokens[meta.get("tokenizer.ggml.unknown_token_id", 0)]
    tokenizer = Tokenizer(models.BPE(vocab, [(left, right) for *_, left, right in merges],
                                     unk_token=unk, fuse_unk=True, byte_fallback=True))
    # llama.cpp: a space before the text (and after each special token), then " " -> "▁"
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend("▁")] if prefix else []
    tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(decode + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tokenizer


def adds_bos(meta):
    """Does llama.cpp put BOS before the text? The metadata key if present, else its default for the vocabulary."""
    if "tokenizer.ggml.add_bos_token" in meta:
        return bool(meta["tokenizer.ggml.add_bos_token"])
    if meta.get("tokenizer.ggml.model") == "llama":
        return True
    return BPE_PRE_TYPES.get(meta.get("tokenizer.ggml.pre"), (None, False, False))[2]


def _post_processor(meta):
    """BOS / EOS around the text exactly when llama.cpp adds them."""
    from tokenizers import processors

    tokens = meta["tokenizer.ggml.tokens"]
    add_bos, add_eos = adds_bos(meta), bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if not add_bos and not add_eos:
        if meta.get("tokenizer.ggml.model") == "gpt2":
            return processors.ByteLevel(trim_offsets=False)  # offsets only, as GPT-2 style tokenizers have
        return None
    # templates as lists of pieces, so a token with a space stays one piece ("X:1" = X with type id 1)
    specials, single, pair = [], ["$A"], ["$A", "$B:1"]
    if add_bos:
        bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
        specials.append((bos, meta["tokenizer.ggml.bos_token_id"]))
        single, pair = [bos] + single, [bos, "$A", f"{bos}:1", "$B:1"]
    if add_eos:
        eos = tokens[meta["tokenizer.ggml.eos_token_id"]]
        specials.append((eos, meta["tokenizer.ggml.eos_token_id"]))
        single, pair = single + [eos], pair + [f"{eos}:1"]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


SPECIAL_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                "pad_token": "padding_token_id", "unk_token": "unknown_token_id"}


def special_tokens(meta):
    """{"bos_token": "<|im_start|>", ...}: the special tokens the metadata names, by their text."""
    tokens = meta["tokenizer.ggml.tokens"]
    found = {}
    for name, key in SPECIAL_KEYS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            found[name] = tokens[token_id]
    return found


def tokenizer_config(meta):
    """tokenizer_config.json as transformers reads it, with llama.cpp's BOS/EOS rule."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # without this, transformers 4.x also returns token_type_ids, which generate() rejects
        "model_input_names": ["input_ids", "attention_mask"],
        **special_tokens(meta),
        "add_bos_token": adds_bos(meta),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    arch = meta.get("general.architecture")
    if f"{arch}.context_length" in meta:
        config["model_max_length"] = meta[f"{arch}.context_length"]
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config

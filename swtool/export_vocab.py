"""A Hugging Face tokenizer (tokenizer.json) as GGUF `tokenizer.*` metadata, the way llama.cpp's converter writes it.

The reverse of checkpoint/gguf_vocab.py. Two kinds of vocabulary are written:

  - byte-level BPE (GPT-2 style; SmolLM, Llama 3, Qwen2): `tokenizer.ggml.model = "gpt2"`,
    the tokens by id, their types, the merges, and `tokenizer.ggml.pre`, the name of
    llama.cpp's pre-tokenizer. convert_hf_to_gguf finds that name by tokenizing a
    fixed check text and looking the sha256 of the ids up in a table
    (get_vocab_base_pre); swtool does the same for the names its own GGUF reader
    supports, and otherwise recognises the pre-tokenizer from tokenizer.json's
    structure (a plain ByteLevel split is "gpt-2", Digits + ByteLevel "starcoder" ...);
  - SentencePiece-style BPE with byte fallback (Llama 2, Mistral): `"llama"`, with
    scores that rank the merges (llama.cpp joins the pair whose token scores highest,
    so a token's score is minus the rank of the merge that makes it).

Token types follow convert_hf_to_gguf's get_vocab_base: added tokens marked special
are CONTROL, other added tokens USER_DEFINED, `<0xXX>` byte tokens BYTE, ids the
tokenizer does not use `[PADn]` UNUSED up to the config's vocab_size. Special token
ids, add_bos/add_eos, merges and the chat template come from gguf-py's SpecialVocab,
as in convert_hf_to_gguf.
"""

import re
from hashlib import sha256
from pathlib import Path

from swtool.checkpoint.gguf_vocab import BPE_PRE_TYPES, BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED
from swtool.errors import SwtoolError
from swtool.inputfile import open_regular
from swtool.jsonfile import parse_json, read_json, read_limited
from swtool.kept import KeptLast

# convert_hf_to_gguf.py's check text and the hashes of its ids, for the pre-tokenizers swtool reads back
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
              "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
              "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
              "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
KNOWN_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # bigcode/starcoder2-3b
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "mpt",  # also OLMo-1.7
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


_last_parsed = KeptLast()  # tokenizer.json's object, by the sha256 of its bytes


def read_tokenizer_json(directory):
    """tokenizer.json's object, parsed once while its bytes stay the same: an export checks it before
    the scan and writes it after, a sweep exports it once per file, and parsing a 10^5-token vocabulary
    costs as much as a tiny model's export (reading and hashing its bytes, a few milliseconds)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise SwtoolError(f"{directory}: no tokenizer.json; a GGUF needs the vocabulary "
                          f"(swtool reads tokenizer.json, not tokenizer.model)")
    raw = read_limited(path)

    def parse():
        data = parse_json(raw, path)  # nesting depth, duplicate keys, size: one-line errors
        if not isinstance(data, dict):
            raise SwtoolError(f"{path}: not a JSON object")
        return data

    return _last_parsed.get(sha256(raw).digest(), parse)


def file_digest(path):
    """sha256 of the regular file at `path`, read in pieces; None where there is none (gguf-py reads only those)."""
    if not path.is_file():
        return None
    digest = sha256()
    with open_regular(path) as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.digest()


# the files of a directory that gguf-py's SpecialVocab reads
SPECIAL_VOCAB_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "merges.txt", "chat_template.json",
                       "chat_template.jinja")
_last_special = KeptLast()  # by (the files' digests, n_vocab, load_merges); add_to_gguf only reads it


def special_vocabulary(directory, n_vocab, load_merges=False):
    """gguf-py's SpecialVocab of `directory`, built once while the files it reads keep their bytes: it parses
    tokenizer.json again and rebuilds every merge, as long as a tiny model's whole export, and a sweep writes
    one vocabulary per file. (SpecialVocab.add_to_gguf only reads it.)"""
    import gguf

    directory = Path(directory)
    if any((directory / "additional_chat_templates").glob("*.jinja")):  # more files it reads: not kept
        return gguf.SpecialVocab(directory, load_merges=load_merges, n_vocab=n_vocab)
    key = (tuple(file_digest(directory / name) for name in SPECIAL_VOCAB_FILES), n_vocab, load_merges)
    return _last_special.get(key, lambda: gguf.SpecialVocab(directory, load_merges=load_merges, n_vocab=n_vocab))


def add_vocabulary(writer, directory, vocab_size):
    """Write the tokenizer.* metadata of the tokenizer in `directory` to a GGUFWriter; returns the kind."""
    data = read_tokenizer_json(directory)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise SwtoolError(f"{directory}/tokenizer.json: tokenizer model {model.get('type')!r} is not supported "
                          f"for export (supported: BPE, byte-level or SentencePiece-style)")
    tokens, kinds = token_list(data, vocab_size, directory)
    if model.get("byte_fallback"):  # SentencePiece-style: "▁" for spaces, <0xXX> for unknown bytes
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(merge_scores(tokens, model.get("merges") or []))
        writer.add_token_types(kinds)
        writer.add_add_space_prefix(adds_space_prefix(data))
        special = special_vocabulary(directory, len(tokens))
        kind = "llama"
    else:  # byte-level BPE
        if not model.get("merges"):
            raise SwtoolError(f"{directory}/tokenizer.json: a BPE vocabulary without merges, "
                              f"which llama.cpp refuses to load")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(directory, data))
        writer.add_token_list(tokens)
        writer.add_token_types(kinds)
        special = special_vocabulary(directory, len(tokens), load_merges=True)
        kind = "gpt2"
    special.add_to_gguf(writer, quiet=True)
    return kind


def token_list(data, vocab_size, directory):
    """(tokens by id, token types), padded with [PADn] UNUSED up to vocab_size, as get_vocab_base."""
    by_id = {token_id: token for token, token_id in data["model"].get("vocab", {}).items()}
    added = {entry["id"]: entry for entry in data.get("added_tokens") or []}
    for token_id, entry in added.items():
        by_id[token_id] = entry["content"]
    if by_id and max(by_id) >= vocab_size:
        raise SwtoolError(f"{directory}/tokenizer.json: token id {max(by_id)} does not fit config.json's "
                          f"vocab_size {vocab_size}")
    unk = data["model"].get("unk_token")
    tokens, kinds = [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            kinds.append(UNUSED)
        elif token == unk:
            tokens.append(token)
            kinds.append(UNKNOWN)
        elif token_id in added:
            special = added[token_id].get("special") or looks_special(token)
            tokens.append(token)
            kinds.append(CONTROL if special else USER_DEFINED)
        elif BYTE_TOKEN.fullmatch(token) and data["model"].get("byte_fallback"):
            tokens.append(token)
            kinds.append(BYTE)
        else:
            tokens.append(token)
            kinds.append(NORMAL)
    return tokens, kinds


def looks_special(token):
    """convert_hf_to_gguf's does_token_look_special, for added tokens not flagged special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def pre_tokenizer_name(directory, data):
    """tokenizer.ggml.pre: by the check-text hash (as convert_hf_to_gguf), else by tokenizer.json's structure."""
    from swtool.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(directory))  # the file `data` was parsed from
    ids = tokenizer.encode(CHECK_TEXT).ids  # with the post-processor's special tokens, as transformers' encode
    name = KNOWN_HASHES.get(sha256(str(ids).encode()).hexdigest()) or structural_pre_name(data.get("pre_tokenizer"))
    if name is None:
        raise SwtoolError(f"{directory}/tokenizer.json: the BPE pre-tokenizer is not one swtool can name for "
                          f"llama.cpp (known: {', '.join(sorted(set(KNOWN_HASHES.values())))}, or a plain "
                          f"GPT-2 / Llama 3 / Qwen2 split)")
    assert name in BPE_PRE_TYPES, name  # swtool's GGUF reader must be able to read what it writes
    return name


def structural_pre_name(pre):
    """The llama.cpp pre-tokenizer that splits text as this tokenizer.json pre_tokenizer does, or None."""
    from swtool.checkpoint.gguf_vocab import LLAMA3_REGEX, QWEN2_REGEX

    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "starcoder"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}.get(regex)
    return None


def merge_scores(tokens, merges):
    """SentencePiece-style scores: minus the rank of the first merge that makes each token; 0 otherwise."""
    rank_of = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank_of.setdefault(left + right, rank)
    return [-float(rank_of[token]) if token in rank_of else 0.0 for token in tokens]


def adds_space_prefix(data):
    """Does the tokenizer put "▁" before the text (normalizer Prepend, or Metaspace prepend_scheme)?"""
    def steps(node, key):
        if not node:
            return []
        return node.get(key, []) if node.get("type") == "Sequence" else [node]

    for step in steps(data.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == "▁":
            return True
    for step in steps(data.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


# --- SentencePiece: tokenizer.model, as convert_hf_to_gguf's _create_vocab_sentencepiece ----------------

SPM_TYPES = {2: UNKNOWN, 3: CONTROL, 5: UNUSED, 6: BYTE}  # SentencePiece's piece types; others are NORMAL


def sentencepiece_tokens(directory, vocab_size):
    """(tokens, scores, types) of tokenizer.model padded to vocab_size with [PADn] (score -10000, UNUSED),
    before any added token: the first half of _create_vocab_sentencepiece and of Phi-3's set_vocab."""
    from swtool.sentencepiece_model import read_pieces

    path = directory / "tokenizer.model"
    if not path.is_file():
        raise SwtoolError(f"{directory}: no tokenizer.model; llama.cpp's converter builds this family's "
                          f"vocabulary from it")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [UNUSED] * vocab_size
    for token_id, (piece, score, kind) in enumerate(read_pieces(path)[:vocab_size]):
        tokens[token_id], scores[token_id], types[token_id] = piece, score, SPM_TYPES.get(kind, NORMAL)
    for token, token_id in added_tokens_json(directory).items():
        if token_id < vocab_size:
            tokens[token_id], scores[token_id], types[token_id] = token, -1000.0, USER_DEFINED
    return tokens, scores, types


def added_tokens_json(directory):
    """added_tokens.json ({token: id}), or {}."""
    path = directory / "added_tokens.json"
    data = read_json(path) if path.is_file() else {}
    if not isinstance(data, dict) or not all(type(i) is int and i >= 0 for i in data.values()):
        raise SwtoolError(f"{path}: not an object of token ids")
    return data


def added_tokens_decoder(directory):
    """tokenizer_config.json's added_tokens_decoder as [(id, content, special)], or []."""
    path = directory / "tokenizer_config.json"
    config = read_json(path) if path.is_file() else {}
    decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    found = []
    for key, entry in (decoder or {}).items():
        if not (key.isdecimal() and isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise SwtoolError(f"{path}: added_tokens_decoder entry {key!r} is not an id with its content")
        found.append((int(key), entry["content"], bool(entry.get("special"))))
    return found


def add_sentencepiece_vocabulary(writer, directory, vocab_size):
    """tokenizer.* from tokenizer.model as convert_hf_to_gguf's _set_vocab_sentencepiece writes them:
    the pieces with their scores and types, added tokens (special or special-looking ones CONTROL,
    others USER_DEFINED with "▁" as a space, score -1000), then gguf-py's SpecialVocab."""
    tokens, scores, types = sentencepiece_tokens(directory, vocab_size)
    for token_id, token, special in added_tokens_decoder(directory):
        if token_id >= vocab_size:
            continue
        if special or looks_special(token):
            types[token_id] = CONTROL
        else:
            token, types[token_id] = token.replace("▁", " "), USER_DEFINED
        tokens[token_id], scores[token_id] = token, -1000.0
    write_sentencepiece(writer, directory, tokens, scores, types)


def write_sentencepiece(writer, directory, tokens, scores, types):
    """A "llama" (SentencePiece) vocabulary's keys, then SpecialVocab's special ids, add_bos/eos and chat template."""
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special_vocabulary(directory, len(tokens)).add_to_gguf(writer, quiet=True)

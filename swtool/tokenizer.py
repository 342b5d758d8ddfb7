"""Prompt -> token ids with the checkpoint's own tokenizer.json (the `tokenizers` package).

BOS follows the tokenizer: its post-processor adds it where the model was
trained with it (Llama 2/3); tokenizer_config.json's `add_bos_token` adds it
where the post-processor does not (some older exports).
"""

import hashlib
import json

from swtool.errors import SwtoolError
from swtool.jsonfile import read_json, read_limited
from swtool.kept import KeptLast

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."  # the paper's detection prompt
# `swtool scan`'s default prompts (docs/prompts.md): the paper's first, then short ones of other kinds
# (small talk, code, a story, another language), each scanned on its own in the same read of the weights
DEFAULT_PROMPTS = (
    DEFAULT_PROMPT,
    "The weather today is",
    "def fibonacci(n):",
    "Once upon a time, a small dragon",
    "Le chat dort sur le canapé.",
)
MAX_PROMPTS_BYTES = 1 << 20  # a --prompts-file larger than this is refused


_last_loaded = KeptLast()  # by the sha256 of tokenizer.json's bytes


def load_tokenizer(directory):
    """The tokenizers.Tokenizer of `directory`'s tokenizer.json, shared: callers never modify it.

    The last one loaded is kept, by the file's bytes: a scan tokenizes each prompt, an export checks
    the pre-tokenizer, an eval every prefix of its text, and building a 10^5-token vocabulary
    costs about 0.1 s each time, reading and hashing its bytes a few milliseconds."""
    from tokenizers import Tokenizer

    path = directory / "tokenizer.json"
    if not path.exists():
        raise SwtoolError(f"{directory}: no tokenizer.json (needed to tokenize the prompt)")
    raw = read_limited(path, "tokenizer")  # read here: any path (not only UTF-8 ones), never a FIFO

    def build():
        try:
            tokenizer = Tokenizer.from_buffer(raw)
        except Exception as e:  # the Rust library reports any parse failure as a plain Exception
            raise SwtoolError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
        check_templates(tokenizer, path)
        return tokenizer

    return _last_loaded.get(hashlib.sha256(raw).digest(), build)


def check_templates(tokenizer, path):
    """Refuse a post-processor template that adds a special token the processor does not define.

    tokenizers loads such a file, then panics on the first encode: a Rust panic prints its own
    lines on stderr and reaches Python as a BaseException. Only the single-sequence template is
    checked, the one swtool encodes with; a processor may sit inside a Sequence of processors."""
    processor = tokenizer.post_processor
    pending = [json.loads(processor.__getstate__())] if processor is not None else []
    while pending:
        node = pending.pop()
        if not isinstance(node, dict):
            continue
        if node.get("type") == "Sequence":
            pending.extend(node.get("processors") or ())
        elif node.get("type") == "TemplateProcessing":
            defined = node.get("special_tokens") or {}
            for piece in node.get("single") or ():
                name = piece.get("SpecialToken", {}).get("id") if isinstance(piece, dict) else None
                if name is not None and name not in defined:
                    raise SwtoolError(f"{path}: the post-processor's template adds the special token {name!r}, "
                                      f"which it does not define")


def encode(directory, text, tokenizer=None):
    """Token ids for `text`, with BOS where the model expects it; `tokenizer`: directory's, if already loaded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that are not UTF-8 in an argument reach Python as lone surrogates
        raise SwtoolError(f"the text to tokenize is not valid UTF-8 ({e.reason} at position {e.start})") from None
    tokenizer = tokenizer or load_tokenizer(directory)
    ids = tokenizer.encode(text, add_special_tokens=True).ids
    bos = _bos_to_add(directory, tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    if not ids:
        raise SwtoolError("the prompt tokenizes to no tokens")
    return ids


def _bos_to_add(directory, tokenizer):
    path = directory / "tokenizer_config.json"
    if not path.exists():  # a FIFO or device there is an error (read_json), not a missing file
        return None
    config = read_json(path)
    if not isinstance(config, dict):
        raise SwtoolError(f"{path}: not a JSON object")
    if not config.get("add_bos_token"):
        return None
    bos = config.get("bos_token")
    if isinstance(bos, dict):
        bos = bos.get("content")
    return tokenizer.token_to_id(bos) if isinstance(bos, str) else None


def decode(directory, ids):
    return load_tokenizer(directory).decode(ids, skip_special_tokens=False)


def read_prompts(path, max_bytes=MAX_PROMPTS_BYTES):
    """The prompts of a UTF-8 text file, one per line (a trailing CR is dropped, blank lines are
    skipped); a one-line error for a file with none, one that is not UTF-8, or not a regular file."""
    raw = read_limited(path, "text file of prompts", max_bytes)  # missing, FIFO, directory, too large: one line
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SwtoolError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [line.removesuffix("\r") for line in text.split("\n")]
    prompts = [line for line in prompts if line.strip()]
    if not prompts:
        raise SwtoolError(f"{path}: no prompt in the file (one prompt per line; blank lines are skipped)")
    return prompts

"""Which importance `swtool export` and `swtool quantize` quantize with (docs/gguf.md, "Importance").

ggml's quantizers weigh each column's rounding error by an importance (imatrix.py: the mean x² of
the column's input); llama-quantize takes one from an imatrix file. swtool's sources:

  scan      (the default) the mean x² over the scan's own prompt(s): the scan's single read of the
            weights collects it (forking.ForkingPass's linear observer), so it costs nothing more.
            When no scan runs: with --catalog, the catalog's prompts (their recorded tokens), and for
            a GGUF file that records its super weights, its recorded prompt, through one more pass
            over the layers (a note says so); with --no-scan, none (the stock llama-quantize file);
  text:FILE the text, cut into chunks of 512 tokens as llama-imatrix cuts it (imatrix.text_sequences);
  random:N  N token ids drawn uniformly over the vocabulary (seed 0), in sequences of 512;
  self:N    N tokens the model samples itself from BOS (temperature 1, seed 0), in sequences of 128
            (imatrix.self_generated_sequences: no KV cache, so a sequence of C tokens costs C passes);
  none      no importance: what llama-quantize writes without --imatrix;
  --imatrix FILE  a llama.cpp imatrix file (GGUF or .dat), used as llama-quantize uses it.

With any importance, llama-quantize's rules that read `has_imatrix` apply (quant/policy.py: Q4_0/Q5_0
give ffn_down of the first n/8 layers Q4_1/Q5_1; IQ4_NL/IQ4_XS do not raise them to Q5_K).
A tensor without an entry is quantized without importance, as llama-quantize does.
"""

import hashlib
from dataclasses import dataclass

import numpy as np

from swtool.errors import SwtoolError

KINDS = ("scan", "none", "text", "random", "self")
UNWEIGHTED_TYPES = ("F32", "F16", "BF16", "Q8_0")  # ggml types whose quantizers do not read an importance
IMPORTANCE_CTX = 512  # llama-imatrix's default chunk: the sequences text and random importance use
DEFAULT_RANDOM_TOKENS = 2048
RANDOM_SEED = 0
DEFAULT_SELF_TOKENS = 512
SELF_CTX = 128  # a self-generated sequence's length: each of its tokens is one more pass over the weights


@dataclass(frozen=True)
class ImportanceSpec:
    """What --importance asked for: kind (KINDS or "file"), with a path (text, file) or a token count."""

    kind: str
    path: str = None
    tokens: int = None


def parse_importance(text, imatrix=None):
    """--importance scan|none|text:FILE|random[:N]|self[:N] and --imatrix FILE -> ImportanceSpec (None: scan)."""
    if imatrix is not None:
        if text is not None:
            raise SwtoolError(f"give --imatrix or --importance, not both (--importance {text})")
        return ImportanceSpec("file", str(imatrix))
    if text is None:
        return ImportanceSpec("scan")
    kind, sep, argument = text.partition(":")
    kind = kind.strip().lower()
    if kind in ("scan", "none") and not sep:
        return ImportanceSpec(kind)
    if kind == "text" and argument:
        return ImportanceSpec("text", argument)
    defaults = {"random": DEFAULT_RANDOM_TOKENS, "self": DEFAULT_SELF_TOKENS}
    if kind in defaults:
        if not sep:
            return ImportanceSpec(kind, tokens=defaults[kind])
        if argument.isdecimal() and int(argument) >= 1:
            return ImportanceSpec(kind, tokens=int(argument))
    raise SwtoolError(f"--importance {text!r}: expected scan, none, text:FILE, random[:N] or self[:N] (N tokens, "
                      f"default {DEFAULT_RANDOM_TOKENS} random or {DEFAULT_SELF_TOKENS} self-generated)")


def digest(importance):
    """sha256 of the importance as the quantizers receive it: per entry in name order, the name, a NUL,
    and its float32 values (importance_for) in little-endian bytes."""
    sha = hashlib.sha256()
    for name in sorted(importance.entries):
        sha.update(name.encode("utf-8") + b"\0")
        sha.update(importance.importance_for(name).astype("<f4").tobytes())
    return sha.hexdigest()


@dataclass
class UsedImportance:
    """The importance an export quantizes with and what to record of it."""

    importance: object  # imatrix.Importance
    source: str  # "scan", "catalog", "gguf metadata", "imatrix", "text", "random", "self"
    description: str  # for the notes and swtool.importance.source
    tokens: int = 0  # tokens it was computed over (0 for a file)
    file: str = None  # --imatrix FILE as given
    sha256: str = None

    def __post_init__(self):
        if self.sha256 is None:
            self.sha256 = digest(self.importance)

    def for_tensor(self, tensor):
        """[n_mat, cols] float32 importance of OutTensor `tensor` as stored (its columns reordered as the
        tensor's), or None when there is no entry. A size that is not the tensor's is an error, as in
        llama-quantize (except for token_embd, which it quantizes without importance then)."""
        entry = self.importance.entries.get(tensor.name)
        if entry is None:
            return None
        cols = tensor.shape[-1]
        n_mat = tensor.shape[0] if len(tensor.shape) == 3 else 1
        values = self.importance.importance_for(tensor.name)
        if values.size != cols * n_mat:
            if tensor.name == "token_embd.weight":
                return None
            raise SwtoolError(f"importance of {tensor.name}: {values.size} values, the tensor has {cols} columns"
                              + (f" x {n_mat} experts" if n_mat > 1 else "") + " (an importance matrix of another model?)")
        values = values.reshape(n_mat, cols)
        return values if tensor.col_order is None else np.ascontiguousarray(values[:, tensor.col_order])


def collected(model, sequences, source, description):
    """UsedImportance of `sequences` (token id lists) through `model`'s layers (one read of the weights)."""
    from swtool import imatrix

    importance = imatrix.collect(model, sequences, [f"swtool:{source}"], IMPORTANCE_CTX)
    return UsedImportance(importance, source, description, sum(len(s) for s in sequences))


def computed(spec, model, progress=False):
    """UsedImportance for --importance text:FILE, random:N or self:N, through `model`."""
    from swtool import imatrix
    from swtool.tokenizer import load_tokenizer

    bos = imatrix.bos_id(model.directory, load_tokenizer(model.directory))
    if spec.kind == "text":
        from swtool.evaluate import text_token_ids

        ids = text_token_ids(model.directory, spec.path)
        sequences = imatrix.text_sequences(ids, IMPORTANCE_CTX, bos)
        return collected(model, sequences, "text", f"text {spec.path} ({len(sequences)} x {IMPORTANCE_CTX} tokens)")
    if spec.kind == "self":
        sequences = imatrix.self_generated_sequences(model, spec.tokens, SELF_CTX, bos, RANDOM_SEED, progress)
        return collected(model, sequences, "self", f"{spec.tokens} self-generated tokens (seed {RANDOM_SEED}, "
                                                   f"{len(sequences)} x {SELF_CTX} tokens)")
    sequences = imatrix.random_sequences(spec.tokens, IMPORTANCE_CTX, model.arch.vocab_size, bos, RANDOM_SEED)
    return collected(model, sequences, "random", f"{spec.tokens} random tokens (seed {RANDOM_SEED})")


def from_file(path):
    """UsedImportance of a llama.cpp imatrix file (read_imatrix: one-line errors for a bad file)."""
    from swtool import imatrix

    importance = imatrix.read_imatrix(path)
    datasets = ", ".join(importance.datasets) or "no dataset named"
    return UsedImportance(importance, "imatrix", f"imatrix {path} ({datasets})", file=str(path))


def scan_collector(model):
    """The observer that collects importance during a scan (catalog.scan_catalog's linear_observer)."""
    from swtool.imatrix import Collector

    return Collector(model.arch)


def from_scan(collector, tokens, prompt):
    """UsedImportance of what `collector` saw during a scan of `tokens` (token id lists)."""
    n_tokens = sum(len(t) for t in tokens)
    importance = collector.importance(["swtool:scan"], n_tokens // IMPORTANCE_CTX, IMPORTANCE_CTX)
    what = f"the scan's prompt {prompt!r}" if len(tokens) == 1 else f"the scan's {len(tokens)} prompts"
    return UsedImportance(importance, "scan", f"{what} ({n_tokens} tokens)", n_tokens)


def metadata_fields(used):
    """[(key, value, GGUFValueType, element type)]: swtool.importance.* (gguf_keys.py), and for --imatrix
    the quantize.imatrix.* keys llama-quantize writes for the file."""
    import gguf

    from swtool import gguf_keys

    T = gguf.GGUFValueType
    if used is None:  # no key: the file is what llama-quantize writes without --imatrix
        return []
    fields = [(gguf_keys.IMPORTANCE_SOURCE, f"{used.source}: {used.description}", T.STRING, None),
              (gguf_keys.IMPORTANCE_SHA256, used.sha256, T.STRING, None)]
    if used.file is not None:  # as llama-quantize's kv overrides (tools/quantize/quantize.cpp)
        importance = used.importance
        fields.append((gguf_keys.LLAMA_IMATRIX_FILE, used.file[:127], T.STRING, None))
        if importance.datasets:
            fields.append((gguf_keys.LLAMA_IMATRIX_DATASET, importance.datasets[0][:127], T.STRING, None))
        fields.append((gguf_keys.LLAMA_IMATRIX_ENTRIES, len(importance.entries), T.UINT32, None))
        if importance.chunk_count > 0:
            fields.append((gguf_keys.LLAMA_IMATRIX_CHUNKS, importance.chunk_count, T.UINT32, None))
    return fields

"""Importance matrices as llama.cpp keeps them: computed through the streaming pass, read and written.

What llama.cpp's `llama-imatrix` collects (tools/imatrix/imatrix.cpp, IMatrixCollector::collect_imatrix):
for every matrix product whose weight is a `blk.*` tensor, the sum over the product's input rows
(tokens) of x² per input column, and how many rows were summed. A mixture's stacked expert tensor
(`blk.N.ffn_down_exps.weight`, multiplied by MUL_MAT_ID) keeps one sum and one count per expert, over
the tokens routed to it only. `output.weight` is left out (llama-imatrix --process-output would add it).

Two files hold them:
  - GGUF (the default since 2025): `general.type` = "imatrix", `imatrix.datasets` (array of strings),
    `imatrix.chunk_count` and `imatrix.chunk_size` (u32), and per tensor NAME, in name order,
    `NAME.in_sum2` (F32, ne [n_cols, n_mat]: the sums) and `NAME.counts` (F32, ne [1, n_mat]),
    each with ggml_n_dims dimensions (trailing 1s dropped: a dense tensor's are 1-D);
  - the legacy `.dat`: int32 entry count; per entry (in name order) int32 name length, the name,
    int32 ncall, int32 nval, nval float32 values = sum / count * ncall (ncall = the largest count
    divided by the chunk size, rounded up; a matrix with count 0 stores 1); then int32 chunk count,
    int32 length and the dataset name.
llama-quantize passes ggml_quantize_chunk, per tensor and expert, in_sum2 / counts (GGUF; 1 where
the count is 0) or value / ncall (.dat): `Importance.importance_for`.

Computing one: `collect(model, sequences)` runs the sequences through forward.run_layers (no head:
no logits are needed) with an observer on every linear's input (forward.py's LINEAR_IN), a batch of
sequences per pass, so each weight is read once per batch. Sums accumulate in float64 per pass (the
file stores float32, as llama.cpp's float accumulators). The sources (`text_sequences` ...) follow
llama-imatrix: the text tokenized once, cut into chunks of ctx tokens (whole chunks only), the first
token of each chunk replaced by BOS when the model adds one.
"""

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from swtool.errors import SwtoolError

GENERAL_TYPE = "general.type"
DATASETS = "imatrix.datasets"
CHUNK_COUNT = "imatrix.chunk_count"
CHUNK_SIZE = "imatrix.chunk_size"
SUMS, COUNTS = ".in_sum2", ".counts"
DEFAULT_CHUNK_SIZE = 512  # llama-imatrix's -c default: what a .dat file's values are scaled by when made GGUF
MAX_NAME = 1 << 16  # a tensor name longer than this in a .dat file is corruption


@dataclass
class Entry:
    """One tensor's statistics.

    GGUF form: `sums` [n_mat, n_cols] the sums of x² per column, `counts` [n_mat] the rows summed.
    Legacy form (read from a .dat file): `sums` [1, nval] the stored values (sum / count * ncall),
    `counts` [1] = ncall; n_mat is not in the file.
    """

    sums: np.ndarray  # float64
    counts: np.ndarray  # int64

    @property
    def n_mat(self):
        return self.sums.shape[0]

    @property
    def n_cols(self):
        return self.sums.shape[1]


@dataclass
class Importance:
    """An importance matrix: {llama.cpp tensor name: Entry}, the datasets, the chunk count and size.
    `legacy`: read from a .dat file (entries in legacy form, chunk_size 0: the file does not say)."""

    entries: dict = field(default_factory=dict)
    datasets: list = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def importance_for(self, name, n_cols=None):
        """The per-column importance llama-quantize passes to ggml_quantize_chunk for tensor `name`
        (float32, expert e's columns at [e * n_cols, (e + 1) * n_cols)), or None when the file has no
        entry. With `n_cols`, shaped [n_mat, n_cols]."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        sums = entry.sums.astype(np.float32)
        if self.legacy:
            ncall = np.float32(entry.counts[0])
            values = sums / ncall if ncall > 0 else sums
        else:
            counts = entry.counts.astype(np.float32)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), np.float32(1))
        values = values.astype(np.float32).reshape(-1)
        if n_cols is not None:
            if values.size % n_cols:
                raise SwtoolError(f"importance of {name}: {values.size} values are not a whole number of "
                                  f"rows of {n_cols} columns")
            values = values.reshape(-1, n_cols)
        return values

    def gguf_form(self, chunk_size=None):
        """The entries as a GGUF file holds them. A .dat file's are converted as llama-imatrix
        --in-file does: values x chunk size, counts = ncall x chunk size (`chunk_size`, else this
        matrix's, else 512)."""
        if not self.legacy:
            return self.entries, self.chunk_size
        size = chunk_size or self.chunk_size or DEFAULT_CHUNK_SIZE
        entries = {name: Entry((e.sums.astype(np.float32) * np.float32(size)).astype(np.float64),
                               e.counts * size) for name, e in self.entries.items()}
        return entries, size


def merge(importances, chunk_size):
    """Several importance matrices added up, as llama-imatrix --in-file accumulates them: sums and counts
    per tensor (a .dat file's converted with `chunk_size`, see gguf_form), the datasets in order, the
    chunk count = the largest count over chunk_size. A tensor of another shape is a one-line error."""
    entries, datasets = {}, []
    for importance in importances:
        form, _ = importance.gguf_form(chunk_size)
        for name, entry in form.items():
            if name not in entries:
                entries[name] = Entry(entry.sums.copy(), entry.counts.copy())
                continue
            into = entries[name]
            if into.sums.size != entry.sums.size:
                raise SwtoolError(f"{name}: {entry.sums.size} sums in one importance matrix, "
                                  f"{into.sums.size} in another")
            if into.n_mat == 1 and entry.n_mat > 1:  # a flat (.dat-made) entry meets a per-expert one
                into.sums, into.counts = into.sums.reshape(entry.sums.shape), np.repeat(into.counts, entry.n_mat)
            into.sums += entry.sums.reshape(into.sums.shape)
            into.counts += entry.counts if entry.n_mat == into.n_mat else entry.counts[0]
        datasets += importance.datasets
    largest = max((int(e.counts.max()) for e in entries.values() if e.counts.size), default=0)
    return Importance(dict(sorted(entries.items())), datasets, largest // chunk_size, chunk_size)


# --- collecting ----------------------------------------------------------------------------------

EXPERT_2D = re.compile(r"model\.layers\.\d+\.\w+\.experts\.(\d+)\.\w+\.weight")  # a per-expert checkpoint's
FUSED_EXPERTS = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.)gate_up_proj")  # transformers 5's stacked gate+up


def gguf_targets(arch, name, expert):
    """[(llama.cpp tensor name, matrix index, n_mat)] whose input is the input of linear `name`
    (slice `expert` of a stacked tensor): the tensor llama.cpp multiplies there, and an expert's index
    in its stacked ffn_*_exps (n_mat = experts). Empty for tensors llama-imatrix skips (not `blk.*`)."""
    n_experts = arch.moe.n_experts if arch.moe is not None else 1
    fused = FUSED_EXPERTS.fullmatch(name)
    if fused:  # llama.cpp's converter splits it into ffn_gate_exps and ffn_up_exps: one input, both
        return [(arch.gguf_name(fused[1] + part), expert, n_experts) for part in ("gate_proj", "up_proj")]
    per_expert = EXPERT_2D.fullmatch(name) if arch.moe is not None else None
    if per_expert:
        return [(arch.gguf_name(name), int(per_expert[1]), n_experts)]
    if expert is not None:
        return [(arch.gguf_name(name), int(expert), n_experts)]
    gguf_name = arch.gguf_name(name)
    return [(gguf_name, 0, 1)] if gguf_name.startswith("blk.") else []


class Collector:
    """Observer (forward.py LINEAR_IN): per llama.cpp tensor, float64 sums of x² per column and row counts."""

    def __init__(self, arch):
        self.arch = arch
        self.sums, self.counts, self._targets = {}, {}, {}
        # q/k/v (and gate/up) multiply the same array one after the other: its column sums are made once.
        # Nothing writes into a block's activations between those products (an activation transform
        # that does returns a new array from linear_input, which is then what is observed).
        self._last = (None, None)

    def observe(self, point, layer, x):
        """The block points (DOWN_IN ...): nothing to do, every linear's input comes through observe_linear."""

    def observe_linear(self, name, expert, x, world=None, positions=None):
        """x: every row counts (a pass of real tokens only; `world`, `positions` are not needed)."""
        key = (name, expert)
        if key not in self._targets:
            self._targets[key] = gguf_targets(self.arch, name, expert)
        targets = self._targets[key]
        if not targets:
            return
        flat = x.reshape(-1, x.shape[-1])
        if self._last[0] is x:
            squares = self._last[1]
        else:
            squares = np.einsum("ij,ij->j", flat, flat, dtype=np.float64)
            self._last = (x, squares)
        for gguf_name, index, n_mat in targets:
            if gguf_name not in self.sums:
                self.sums[gguf_name] = np.zeros((n_mat, flat.shape[1]))
                self.counts[gguf_name] = np.zeros(n_mat, dtype=np.int64)
            self.sums[gguf_name][index] += squares
            self.counts[gguf_name][index] += flat.shape[0]

    def importance(self, datasets, chunk_count, chunk_size):
        entries = {name: Entry(self.sums[name], self.counts[name]) for name in sorted(self.sums)}
        return Importance(entries, list(datasets), chunk_count, chunk_size)


DEFAULT_BATCH_TOKENS = 8192  # tokens of one pass, as eval's


def collect(model, sequences, datasets, chunk_size, progress=False, batch_tokens=DEFAULT_BATCH_TOKENS):
    """The importance matrix of `sequences` (token id lists) through `model`: sequences of one length go
    through the layers together, `batch_tokens` at a time (one read of the weights per batch).
    chunk_count is the tokens seen over chunk_size, as llama-imatrix counts it."""
    from swtool.forward import run_layers
    from swtool.table import plural

    collector = Collector(model.arch)
    batches = list(batches_of(sequences, batch_tokens))
    for i, batch in enumerate(batches):
        label = (f"imatrix pass {i + 1}/{len(batches)} ({plural(len(batch), 'sequence')} x {batch.shape[1]} tokens)"
                 if progress else None)
        run_layers(model, batch, observers=[collector], progress=label)
        collector._last = (None, None)
    n_tokens = sum(len(s) for s in sequences)
    if not collector.sums:
        raise SwtoolError(f"{model.path}: no linear of a block saw an input")
    return collector.importance(datasets, n_tokens // chunk_size, chunk_size)


def batches_of(sequences, batch_tokens):
    """[B, T] int64 arrays: the sequences grouped by length, at most batch_tokens (at least one sequence) each."""
    by_length = {}
    for sequence in sequences:
        by_length.setdefault(len(sequence), []).append(sequence)
    for length, group in by_length.items():
        per_batch = max(1, batch_tokens // length)
        for start in range(0, len(group), per_batch):
            yield np.asarray(group[start:start + per_batch], dtype=np.int64)


# --- sources -----------------------------------------------------------------------------------

def bos_id(directory, tokenizer):
    """The token the model's tokenizer puts first (BOS), or None when it adds none."""
    from swtool.tokenizer import encode

    plain = tokenizer.encode("a", add_special_tokens=False).ids
    ids = encode(directory, "a", tokenizer)
    return ids[0] if len(ids) > len(plain) and ids[len(ids) - len(plain):] == plain else None


def text_sequences(ids, ctx, bos, max_chunks=None):
    """llama-imatrix's chunks: whole chunks of ctx tokens of the tokenized text (the rest is left out),
    the first of each replaced by BOS when the model adds one."""
    n_chunks = len(ids) // ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks == 0:
        raise SwtoolError(f"the text has {len(ids)} tokens, fewer than one chunk of --ctx {ctx}")
    chunks = [list(ids[i * ctx:(i + 1) * ctx]) for i in range(n_chunks)]
    if bos is not None:
        for chunk in chunks:
            chunk[0] = bos
    return chunks


def split_tokens(n_tokens, ctx, make):
    """n_tokens tokens as sequences of at most ctx tokens: `make(length, index)` gives each."""
    return [make(min(ctx, n_tokens - start), i) for i, start in enumerate(range(0, n_tokens, ctx))]


def random_sequences(n_tokens, ctx, vocab_size, bos, seed):
    """n_tokens token ids drawn uniformly over the vocabulary (seeded), in sequences of ctx starting with BOS."""
    rng = np.random.default_rng(seed)

    def make(length, index):
        tokens = [int(t) for t in rng.integers(0, vocab_size, size=length)]
        if bos is not None:
            tokens[0] = bos
        return tokens

    return split_tokens(n_tokens, ctx, make)


def self_generated_sequences(model, n_tokens, ctx, bos, seed, progress=False):
    """n_tokens tokens the model writes itself: sequences of at most ctx tokens started from BOS (or a
    random token when it has none), every next token sampled at temperature 1 (seeded), all sequences
    in one batch. No KV cache: step t runs the t tokens so far again (ctx passes over the weights)."""
    from swtool.forward import run_layers
    from swtool.ops import softmax

    rng = np.random.default_rng(seed)
    lengths = [len(s) for s in split_tokens(n_tokens, ctx, lambda length, i: [0] * length)]
    first = bos if bos is not None else int(rng.integers(0, model.arch.vocab_size))
    tokens = np.full((len(lengths), 1), first, dtype=np.int64)
    steps = range(1, max(lengths))
    if progress:
        from swtool.progress import progress_bar

        steps = progress_bar(steps, desc="self-generating", unit="token", leave=False)
    for _ in steps:
        ctx_, x = run_layers(model, tokens)
        logits = model.arch.head(ctx_, x[:, -1:])[:, 0].astype(np.float64)
        probabilities = softmax(logits)
        probabilities /= probabilities.sum(axis=-1, keepdims=True)
        picked = [rng.choice(len(p), p=p) for p in probabilities]
        tokens = np.concatenate([tokens, np.asarray(picked, dtype=np.int64)[:, None]], axis=1)
    return [list(map(int, row[:length])) for row, length in zip(tokens, lengths)]


# --- files -------------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"


def read_imatrix(path):
    """An Importance from llama.cpp's GGUF imatrix file or its legacy .dat (told apart by the first
    bytes); a one-line SwtoolError for anything else, a truncated or inconsistent file, negative or
    fractional counts, or sums that are negative or not finite."""
    from swtool.inputfile import open_regular

    path = Path(path)
    try:
        with open_regular(path) as f:
            head = f.read(4)
    except IsADirectoryError:
        raise SwtoolError(f"{path}: is a directory, expected an imatrix file") from None
    except FileNotFoundError:
        raise SwtoolError(f"{path}: no such file") from None
    if head == GGUF_MAGIC:
        return _read_gguf(path)
    return _read_dat(path)


def _check_values(path, name, sums, counts):
    if not np.all(np.isfinite(sums)):
        raise SwtoolError(f"{path}: {name}: the sums hold values that are not finite")
    if np.any(sums < 0):
        raise SwtoolError(f"{path}: {name}: a sum of squares is negative ({float(sums.min()):g})")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0) or np.any(counts != np.round(counts)):
        bad = counts[~(np.isfinite(counts) & (counts >= 0) & (counts == np.round(counts)))][0]
        raise SwtoolError(f"{path}: {name}: count {float(bad):g} is not a whole number of rows (0 or more)")


def _read_gguf(path):
    from swtool.checkpoint.gguf_file import read_gguf

    header = read_gguf(path)
    meta = header.metadata
    missing = [key for key in (DATASETS, CHUNK_COUNT, CHUNK_SIZE) if key not in meta]
    if missing:  # llama-quantize refuses such a file too ("missing imatrix metadata")
        raise SwtoolError(f"{path}: not an imatrix file: no {', '.join(missing)} metadata")
    datasets, chunk_count, chunk_size = meta[DATASETS], meta[CHUNK_COUNT], meta[CHUNK_SIZE]
    if not isinstance(datasets, (list, tuple)) or not all(isinstance(d, str) for d in datasets):
        raise SwtoolError(f"{path}: {DATASETS} is not an array of strings")
    for key, value in ((CHUNK_COUNT, chunk_count), (CHUNK_SIZE, chunk_size)):
        if type(value) is not int or value < 0:
            raise SwtoolError(f"{path}: {key} = {value!r} is not a non-negative integer")
    pairs = {}
    for name, info in header.tensors.items():
        for suffix, slot in ((SUMS, 0), (COUNTS, 1)):
            if name.endswith(suffix) and len(name) > len(suffix):
                pairs.setdefault(name[: -len(suffix)], [None, None])[slot] = info
    if not pairs:
        raise SwtoolError(f"{path}: no importance entries (no NAME.in_sum2 and NAME.counts tensors)")
    entries = {}
    for name in sorted(pairs):
        sums_info, counts_info = pairs[name]
        if sums_info is None or counts_info is None:
            raise SwtoolError(f"{path}: {name}: has {'no' if sums_info is None else 'its'} in_sum2 and "
                              f"{'no' if counts_info is None else 'its'} counts; both are needed")
        for info in (sums_info, counts_info):
            if info.dtype != "F32":
                raise SwtoolError(f"{path}: {info.name} is {info.dtype}, not F32")
        n_mat = int(np.prod(counts_info.shape))
        size = int(np.prod(sums_info.shape))
        if n_mat == 0 or size == 0 or size % n_mat:
            raise SwtoolError(f"{path}: {name}: {size} sums do not divide into {n_mat} matrices")
        sums = sums_info.read().reshape(n_mat, size // n_mat).astype(np.float64)
        counts = counts_info.read().reshape(n_mat).astype(np.float64)
        _check_values(path, name, sums, counts)
        entries[name] = Entry(sums, counts.astype(np.int64))
    return Importance(entries, list(datasets), chunk_count, chunk_size)


def _read_dat(path):
    raw = Path(path).read_bytes()
    pos = 0

    def take(fmt, what):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise SwtoolError(f"{path}: truncated: {what} at byte {pos} runs past the end ({len(raw)} bytes)")
        values = struct.unpack_from(fmt, raw, pos)
        pos += size
        return values[0] if len(values) == 1 else values

    def text(length, what):
        nonlocal pos
        if length < 0 or length > MAX_NAME or pos + length > len(raw):
            raise SwtoolError(f"{path}: corrupt {what}: length {length} at byte {pos - 4}")
        try:
            value = raw[pos:pos + length].decode("utf-8")
        except UnicodeDecodeError:
            raise SwtoolError(f"{path}: corrupt {what}: not UTF-8") from None
        pos += length
        return value

    if len(raw) < 4:
        raise SwtoolError(f"{path}: not an imatrix file: {len(raw)} bytes")
    n_entries = take("<i", "the entry count")
    # every entry takes at least 16 bytes: a bound on the count before anything is allocated
    if n_entries < 1 or n_entries > (len(raw) - 4) // 16:
        raise SwtoolError(f"{path}: not an imatrix file (GGUF or legacy .dat): {n_entries} entries "
                          f"in {len(raw)} bytes")
    entries = {}
    for i in range(n_entries):
        name = text(take("<i", f"entry {i}'s name length"), f"entry {i}'s name")
        ncall, nval = take("<i", f"{name}'s call count"), take("<i", f"{name}'s value count")
        if nval < 1 or pos + 4 * nval > len(raw):
            raise SwtoolError(f"{path}: truncated or corrupt: {name} has {nval} values at byte {pos}")
        if name in entries:
            raise SwtoolError(f"{path}: {name} appears twice")
        values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float64)
        pos += 4 * nval
        counts = np.array([ncall], dtype=np.float64)
        _check_values(path, name, values, counts)
        entries[name] = Entry(values[None, :], counts.astype(np.int64))
    chunk_count, datasets = 0, []
    if pos < len(raw):  # the optional trailer: chunk count, then the dataset name
        chunk_count = take("<i", "the chunk count")
        if chunk_count < 0:
            raise SwtoolError(f"{path}: chunk count {chunk_count} is negative")
        if pos < len(raw):
            dataset = text(take("<i", "the dataset name's length"), "dataset name")
            datasets = [dataset] if dataset else []
    if pos != len(raw):
        raise SwtoolError(f"{path}: {len(raw) - pos} bytes after the end of the imatrix data")
    return Importance(entries, datasets, chunk_count, 0, legacy=True)


def _gguf_string(value):
    data = value.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def gguf_bytes(importance, chunk_size=None):
    """The GGUF file llama-imatrix writes for `importance` (IMatrixCollector::save_imatrix through
    gguf_write_to_file): version 3, the four keys, tensors in name order, data aligned to 32 bytes."""
    entries, size = importance.gguf_form(chunk_size)
    alignment = 32
    kv = [
        _gguf_string(GENERAL_TYPE) + struct.pack("<I", 8) + _gguf_string("imatrix"),
        _gguf_string(DATASETS) + struct.pack("<IIQ", 9, 8, len(importance.datasets))
        + b"".join(_gguf_string(d) for d in importance.datasets),
        _gguf_string(CHUNK_COUNT) + struct.pack("<II", 4, importance.chunk_count),
        _gguf_string(CHUNK_SIZE) + struct.pack("<II", 4, size),
    ]
    tensors = []
    for name in sorted(entries):
        entry = entries[name]
        tensors.append((name + SUMS, (entry.n_cols, entry.n_mat), entry.sums.astype("<f4")))
        tensors.append((name + COUNTS, (1, entry.n_mat), entry.counts.astype("<f4")))
    infos, data, offset = [], [], 0
    for name, ne, values in tensors:
        dims = list(ne)
        while len(dims) > 1 and dims[-1] == 1:  # ggml_n_dims: trailing dimensions of 1 are not written
            dims.pop()
        infos.append(_gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, 0, offset))
        blob = values.tobytes()
        blob += b"\0" * (-len(blob) % alignment)
        data.append(blob)
        offset += len(blob)
    header = struct.pack("<4sIQQ", GGUF_MAGIC, 3, len(tensors), len(kv)) + b"".join(kv) + b"".join(infos)
    header += b"\0" * (-len(header) % alignment)
    return header + b"".join(data)


def dat_bytes(importance, chunk_size=None):
    """The legacy .dat llama-imatrix writes (IMatrixCollector::save_imatrix_legacy): entries whose
    matrices all have count 0 are left out; values = sum / count * ncall in float32, 1 for a matrix
    of count 0. A .dat-read Importance is written back as it was read."""
    parts = []
    if importance.legacy:
        stored = {name: (int(e.counts[0]), e.sums.astype("<f4").reshape(-1))
                  for name, e in importance.entries.items()}
    else:
        size = chunk_size or importance.chunk_size or DEFAULT_CHUNK_SIZE
        stored = {}
        for name, e in importance.entries.items():
            if not np.any(e.counts):
                continue
            ncall = int((int(e.counts.max()) + size - 1) // size)
            counts = e.counts.astype(np.float32)[:, None]
            sums = e.sums.astype(np.float32)
            zero = counts == 0
            value = np.where(zero, np.float32(1), sums)
            count = np.where(zero, np.float32(1), counts)
            stored[name] = (ncall, ((value / count) * np.float32(ncall)).astype("<f4").reshape(-1))
    parts.append(struct.pack("<i", len(stored)))
    for name in sorted(stored):
        ncall, values = stored[name]
        encoded = name.encode("utf-8")
        parts.append(struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, values.size))
        parts.append(values.tobytes())
    dataset = (importance.datasets[-1] if importance.datasets else "").encode("utf-8")
    parts.append(struct.pack("<ii", importance.chunk_count, len(dataset)) + dataset)
    return b"".join(parts)


def write_bytes(path, data):
    from swtool.atomic import atomic_path

    with atomic_path(path, nbytes=len(data)) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def write_imatrix_gguf(path, importance, chunk_size=None):
    """Write `importance` as llama.cpp's GGUF imatrix file, atomically (swtool/atomic.py)."""
    return write_bytes(path, gguf_bytes(importance, chunk_size))


def write_imatrix_dat(path, importance, chunk_size=None):
    """Write `importance` as llama.cpp's legacy .dat imatrix file, atomically."""
    return write_bytes(path, dat_bytes(importance, chunk_size))


def format_for(path, fmt=None):
    """"gguf" or "dat": `fmt` when given, else from the suffix (.dat: dat, anything else gguf, as
    llama-imatrix writes GGUF unless told --output-format dat)."""
    if fmt:
        return fmt
    return "dat" if str(path).lower().endswith(".dat") else "gguf"


# --- the summary -------------------------------------------------------------------------------

def summarize(importance, top=5):
    """Per tensor: its matrices, columns, counts, energy (the sum over columns of the mean x², i.e. the
    mean squared norm of its input per row, per matrix) and its `top` columns by mean x² with their share
    of the energy (a super weight's column carries much of its down projection's input energy)."""
    tensors = []
    for name in sorted(importance.entries, key=tensor_order):
        entry = importance.entries[name]
        values = importance.importance_for(name, entry.n_cols).astype(np.float64)
        if not importance.legacy:
            values[entry.counts == 0] = 0.0  # an expert no token reached: no energy, not llama-quantize's 1s
        energy = values.sum(axis=1)
        flat = values.reshape(-1)
        order = np.argsort(-flat, kind="stable")[:top]
        columns = []
        for index in order:
            matrix, column = divmod(int(index), entry.n_cols)
            share = float(flat[index] / energy[matrix]) if energy[matrix] > 0 else 0.0
            columns.append({"column": column, "expert": matrix if entry.n_mat > 1 else None,
                            "mean_square": float(flat[index]), "share": share})
        tensors.append({"name": name, "matrices": entry.n_mat, "columns": entry.n_cols,
                        "counts": [int(c) for c in entry.counts], "energy": [float(e) for e in energy],
                        "top_columns": columns})
    return tensors


def tensor_order(name):
    """blk.2 before blk.10: by block number, then name."""
    match = re.match(r"blk\.(\d+)\.", name)
    return (int(match[1]) if match else -1, name)


SCHEMA_ID = "swtool.imatrix/1"


def describe(model, importance, output, fmt, kind, dataset, sequences, seconds, top=5):
    """`swtool imatrix --json` (schema swtool.imatrix/1)."""
    n_tokens = sum(len(s) for s in sequences)
    return {
        "schema": SCHEMA_ID,
        "model": str(model.path),
        "output": str(output),
        "format": fmt,
        "source": {"kind": kind, "dataset": dataset},
        "sequences": len(sequences),
        "tokens": n_tokens,
        "chunk_size": importance.chunk_size,
        "chunk_count": importance.chunk_count,
        "seconds": seconds,
        "tokens_per_second": n_tokens / seconds if seconds > 0 else None,
        "tensors": summarize(importance, top),
    }


def format_summary(summary, rows=10):
    """The one-line account of what was written, then the tensors whose input energy is most
    concentrated in one column (where a super weight's large activation shows)."""
    from swtool.table import format_table, plural

    lines = [f"wrote {summary['output']} ({summary['format']}): {plural(len(summary['tensors']), 'tensor')}, "
             f"{plural(summary['sequences'], 'sequence')} of {summary['source']['kind']} "
             f"({plural(summary['tokens'], 'token')}, {plural(summary['chunk_count'], 'chunk')} of "
             f"{summary['chunk_size']}), {summary['seconds']:.1f} s"
             + (f", {summary['tokens_per_second']:.0f} tokens/s" if summary["tokens_per_second"] else "")]
    peaks = sorted(((t["top_columns"][0], t["name"]) for t in summary["tensors"] if t["top_columns"]),
                   key=lambda item: -item[0]["share"])[:rows]
    table = [[name, "" if c["expert"] is None else str(c["expert"]), str(c["column"]), f"{c['mean_square']:.4g}",
              f"{100 * c['share']:.1f}%"] for c, name in peaks]
    lines.append("inputs most concentrated in one column (mean x² over the tokens; share of the tensor's input energy):")
    lines.append(format_table(["tensor", "expert", "column", "mean x²", "share"], table))
    return "\n".join(lines)

"""The GGUF container, read by hand: header, metadata, tensor table, and tensor bytes by row or block.

A GGUF file (ggml docs/gguf.md) is
    magic "GGUF", version (2 or 3), tensor count, metadata count,
    metadata: key (string), value type (u32), value,
    tensor table: name, n_dims, dims (innermost first, ggml's ne[0] ...), ggml type, data offset,
    padding to the alignment (metadata `general.alignment`, default 32), then the tensor data.

Why not gguf-py's GGUFReader: it builds one NumPy view per string of the vocabulary
(2.4 s for SmolLM2's 49k tokens and 49k merges), which would make an audit of a
few scalars take seconds. This parser walks the same bytes with `struct`, checks
every length and offset against the file size, decodes the vocabulary only when
a tokenizer is built (`LazyStrings`), and keeps nothing mapped: about 0.02 s for
SmolLM2's header. tests/test_gguf_input.py holds it to GGUFReader's answers.
gguf-py still provides the tables (types, block sizes) and the dequantizers.

Tensor bytes are memory-mapped only while they are used, as for safetensors.
Rows run along ggml's ne[1] axis: row r of a 2-D tensor is HF row r, and a
quantized row is a run of blocks, each covering `block_size` consecutive
columns, so one weight can be recovered by decoding its block alone.
"""

import contextlib
import functools
import hashlib
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from math import prod
from pathlib import Path

import numpy as np

from swtool.checkpoint.safetensors import map_bytes, close_map, decode_float32
from swtool.errors import CheckpointError
from swtool.inputfile import open_regular

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_COUNT = 1 << 24  # more tensors or metadata entries than this is a corrupt header, not a model

# GGUF metadata value types -> struct format (scalars); 8 = string, 9 = array
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                  10: "<Q", 11: "<q", 12: "<d"}
ARRAY_DTYPES = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9
LENGTH = struct.Struct("<Q")  # a string's byte length
LAZY_STRINGS = 1024  # string arrays at least this long (vocabularies) are decoded on first use

# ggml types whose stored elements are plain numbers: (NumPy dtype of the stored bits, swtool's decode name)
PLAIN_TYPES = {"F32": ("<f4", "F32"), "F16": ("<f2", "F16"), "BF16": ("<u2", "BF16")}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: where its bytes are and how to decode them.

    `shape` is in Hugging Face order (outermost first, the reverse of ggml's ne);
    `row_order`, if set, is the stored row of each HF row (llama.cpp permutes the
    rows of Q and K); `name` is the name the checkpoint presents (HF), `gguf_name`
    llama.cpp's.
    """

    name: str
    gguf_name: str
    dtype: str  # the ggml type name: "F32", "F16", "BF16", "Q8_0", "Q4_K" ...
    shape: tuple
    path: Path
    offset: int  # absolute byte offset of the first block
    nbytes: int
    block_size: int  # elements per block (1 for plain types)
    type_size: int  # bytes per block
    row_order: object = None  # np.ndarray [rows] or None
    value_offset: float = 0.0  # what the converter added to every value (read() subtracts it; with_stored does not)

    @property
    def quantized(self):
        return self.dtype not in PLAIN_TYPES

    @property
    def readable(self):
        """Can swtool decode it? Plain floats always; block types when gguf-py dequantizes them (not I32, Q8_K ...)."""
        return not self.quantized or dequantizable(self.dtype)

    @property
    def row_bytes(self):
        return self.shape[-1] // self.block_size * self.type_size

    def _stored_rows(self, rows):
        """The stored row indices for HF `rows` (None = all), as a slice or an index array."""
        if self.row_order is None:
            return rows if rows is None or isinstance(rows, slice) else np.asarray(rows)
        hf_rows = np.arange(self.shape[0]) if rows is None else np.arange(self.shape[0])[rows]
        return self.row_order[hf_rows]

    def sub(self, index):
        """Entry `index` of the first axis as a tensor of its own: expert e of stacked experts
        [experts, out, in] (blk.N.ffn_down_exps) -> its [out, in] matrix, whose blocks are one run."""
        if len(self.shape) < 2 or not 0 <= index < self.shape[0] or self.row_order is not None:
            raise CheckpointError(self.path, f"tensor {self.name!r} of shape {list(self.shape)} "
                                             f"has no entry {index} along its first axis")
        size = self.nbytes // self.shape[0]
        return replace(self, shape=self.shape[1:], offset=self.offset + index * size, nbytes=size)

    def with_stored(self, use, rows=None):
        """use(stored) on the memory-mapped bits of `rows` (None = all rows); the map is closed after.

        Plain types give their elements ([rows, cols] of float32, float16 or bf16 bits),
        block types their bytes ([rows, row_bytes] of uint8). As for safetensors, `use`
        must not keep a reference to its argument.
        """
        mapping, skip = map_bytes(self.path, self.offset, self.nbytes)
        if self.quantized:  # each row of blocks as its bytes: [..., row_bytes]
            stored = np.frombuffer(mapping, np.uint8, self.nbytes, skip).reshape(self.shape[:-1] + (self.row_bytes,))
        else:
            stored = np.frombuffer(mapping, PLAIN_TYPES[self.dtype][0], prod(self.shape), skip).reshape(self.shape)
        picked = self._stored_rows(rows)
        if picked is not None:
            stored = stored[picked]
        try:
            return use(stored)
        finally:
            del stored
            close_map(mapping)

    def read(self, rows=None):
        """Decode the tensor (or HF `rows` of its first axis) to a new float32 array in HF layout."""
        return self.with_stored(self._decode, rows)

    def _decode(self, stored):
        if not self.quantized:
            values = decode_float32(stored, PLAIN_TYPES[self.dtype][1])
        else:
            values = dequantize_blocks(stored, self.dtype, self.shape[-1])
        return values - np.float32(self.value_offset) if self.value_offset else values

    def block_of(self, row, col):
        """(absolute offset, byte length, index inside the block) of the block holding HF [row, col]."""
        if len(self.shape) != 2 or not (0 <= row < self.shape[0] and 0 <= col < self.shape[1]):
            raise CheckpointError(self.path, f"tensor {self.name!r} of shape {list(self.shape)} "
                                             f"has no element [{row}, {col}]")
        stored_row = int(self.row_order[row]) if self.row_order is not None else row
        block = col // self.block_size
        offset = self.offset + stored_row * self.row_bytes + block * self.type_size
        return offset, self.type_size, col % self.block_size

    def read_block(self, row, col):
        """The decoded block holding HF [row, col], float32 [block_size], and the element's index in it.

        Only this block's bytes are read: an audit recovers a quantized weight
        without touching the rest of its tensor.
        """
        offset, nbytes, index = self.block_of(row, col)
        mapping, skip = map_bytes(self.path, offset, nbytes)
        try:
            raw = np.frombuffer(mapping, np.uint8, nbytes, skip).copy()
        finally:
            mapping.close()
        if self.quantized:
            import gguf

            values = gguf.quants.dequantize(raw[None, :], gguf.GGMLQuantizationType[self.dtype])[0]
        else:
            values = decode_float32(raw.view(PLAIN_TYPES[self.dtype][0]), PLAIN_TYPES[self.dtype][1])
        return np.asarray(values, dtype=np.float32) - np.float32(self.value_offset), index


@dataclass
class GGUFFile:
    """The parsed header of one GGUF file."""

    path: Path
    version: int
    metadata: dict  # key -> value; numeric arrays NumberArray, string arrays lists or LazyStrings, strings str
    value_types: dict  # key -> GGUF value type of the value (array: (9, element type))
    tensors: dict  # llama.cpp name -> GGUFTensor (name == gguf_name, no row order)
    data_offset: int
    alignment: int
    size: int


class _Cursor:
    """Reads little-endian values from the header bytes, never past their end."""

    def __init__(self, path, buffer):
        self.path, self.buffer, self.pos = path, buffer, 0

    def take(self, fmt):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buffer):
            raise CheckpointError(self.path, f"truncated: the header ends inside a value at byte {self.pos}")
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def string(self):
        length = self.take("<Q")
        if self.pos + length > len(self.buffer):
            raise CheckpointError(self.path, f"truncated: a {length}-byte string at byte {self.pos} "
                                             f"runs past the end of the file")
        raw = self.buffer[self.pos:self.pos + length]
        self.pos += length
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(self.path, f"corrupt header: a string at byte {self.pos - length} "
                                             f"is not UTF-8") from None

    def value(self, kind):
        """One metadata value of GGUF type `kind`: (value, type description)."""
        if kind in SCALAR_FORMATS:
            return self.take(SCALAR_FORMATS[kind]), kind
        if kind == STRING:
            return self.string(), kind
        if kind != ARRAY:
            raise CheckpointError(self.path, f"corrupt header: unknown metadata value type {kind} "
                                             f"at byte {self.pos - 4}")
        element, count = self.take("<I"), self.take("<Q")
        if element == ARRAY:  # llama.cpp refuses these too; refusing also bounds the recursion
            raise CheckpointError(self.path, f"corrupt header: an array of arrays at byte {self.pos - 12} "
                                             f"(GGUF readers do not support nested arrays)")
        if element in ARRAY_DTYPES:  # numbers: one NumPy read for the whole array
            dtype = np.dtype(ARRAY_DTYPES[element])
            if self.pos + count * dtype.itemsize > len(self.buffer):
                raise CheckpointError(self.path, f"truncated: an array of {count} values at byte {self.pos} "
                                                 f"runs past the end of the file")
            values = NumberArray(np.frombuffer(self.buffer, dtype, count, self.pos).copy())
            self.pos += count * dtype.itemsize
            return values, (ARRAY, element)
        if count > len(self.buffer) - self.pos:  # every element takes at least one byte
            raise CheckpointError(self.path, f"corrupt header: an array claims {count} elements at byte {self.pos}")
        if element == STRING:
            start = self.pos
            self.pos = _walk_strings(self.path, self.buffer, start, count)
            if count >= LAZY_STRINGS:  # a vocabulary: decoded only if a tokenizer is built
                return LazyStrings(self.path, bytes(self.buffer[start:self.pos]), count), (ARRAY, element)
            return _decode_strings(self.path, self.buffer[start:self.pos], count), (ARRAY, element)
        return [self.value(element)[0] for _ in range(count)], (ARRAY, element)


def _walk_strings(path, buffer, pos, count):
    """The end of `count` length-prefixed strings starting at `pos`, each checked to lie inside the buffer."""
    end, length_at = len(buffer), LENGTH.unpack_from
    for _ in range(count):
        if pos + 8 > end:
            raise CheckpointError(path, f"truncated: the header ends inside a string at byte {pos}")
        (length,) = length_at(buffer, pos)
        pos += 8 + length
        if pos > end:
            raise CheckpointError(path, f"truncated: a {length}-byte string at byte {pos - length} "
                                        f"runs past the end of the file")
    return pos


def _decode_strings(path, raw, count):
    """[str] of `count` length-prefixed UTF-8 strings in `raw` (already walked, so in bounds)."""
    out, pos, length_at = [], 0, LENGTH.unpack_from
    for _ in range(count):
        (length,) = length_at(raw, pos)
        pos += 8
        try:
            out.append(str(raw[pos:pos + length], "utf-8"))
        except UnicodeDecodeError:
            raise CheckpointError(path, "corrupt header: a string of the vocabulary is not UTF-8") from None
        pos += length
    return out


class NumberArray(Sequence):
    """A numeric metadata array, held as NumPy holds it (its own bytes, not ~10x as Python numbers):
    a hostile file's 1 GB array costs 1 GB, not 10. Elements read out are Python numbers."""

    CHUNK = 1 << 16

    def __init__(self, array):
        self.array = array

    def __len__(self):
        return len(self.array)

    def __getitem__(self, index):
        return self.array[index].tolist()  # a Python number, or a list for a slice

    def __iter__(self):
        for start in range(0, len(self.array), self.CHUNK):
            yield from self.array[start:start + self.CHUNK].tolist()

    def __eq__(self, other):
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    def __repr__(self):
        return f"NumberArray({len(self.array)} x {self.array.dtype})"


class LazyStrings(Sequence):
    """A long string array of the metadata (tokens, merges), decoded on first use.

    Walking 100k strings to find where the array ends is cheap; decoding them is
    most of a header's parse, and an audit or inspect never needs the vocabulary.
    """

    def __init__(self, path, raw, count):
        self._path, self._raw, self._count, self._items = path, raw, count, None

    def digest(self):
        """sha256 of the array as stored (its length-prefixed strings): cheap before decoding, not after."""
        if self._raw is not None:
            return hashlib.sha256(self._raw).digest()
        return hashlib.sha256(b"".join(len(b).to_bytes(8, "little") + b for b in (s.encode() for s in self._items))).digest()

    def _decoded(self):
        if self._items is None:
            self._items, self._raw = _decode_strings(self._path, self._raw, self._count), None
        return self._items

    def __len__(self):
        return self._count

    def __getitem__(self, index):
        return self._decoded()[index]

    def __iter__(self):
        return iter(self._decoded())

    def __eq__(self, other):
        return list(self) == list(other) if isinstance(other, Sequence) and not isinstance(other, str) else NotImplemented

    def __repr__(self):
        return f"LazyStrings({self._count} strings)"


def read_gguf(path):
    """Parse and validate the header of a GGUF file; no tensor data is read."""
    path = Path(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise CheckpointError(path, f"not a GGUF file: {size} bytes, too short for a header")
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except IsADirectoryError:
        raise CheckpointError(path, "is a directory, expected a .gguf file") from None
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    try:
        return _parse(path, memoryview(mapping), size)
    except BaseException:
        # unmapped now, unless the error's traceback still holds a view of the header: then when it
        # goes. Not close_map's gc.collect(), whose cost grows with the process's heap, for every bad file
        with contextlib.suppress(BufferError):
            mapping.close()
        raise
    # on success the header's lazy arrays may hold views of the map: it is unmapped when they go


def _parse(path, buffer, size):
    cursor = _Cursor(path, buffer)
    try:
        magic = bytes(buffer[:4])
        if magic != MAGIC:
            raise CheckpointError(path, f"not a GGUF file: starts with {magic!r}, not b'GGUF'")
        cursor.pos = 4
        version = cursor.take("<I")
        if version not in VERSIONS:
            raise CheckpointError(path, f"GGUF version {version} is not supported (supported: 2, 3)")
        n_tensors, n_metadata = cursor.take("<Q"), cursor.take("<Q")
        if n_tensors > MAX_COUNT or n_metadata > MAX_COUNT:
            raise CheckpointError(path, f"corrupt header: {n_tensors} tensors and {n_metadata} metadata entries")
        metadata, value_types = {}, {}
        for _ in range(n_metadata):
            key = cursor.string()
            value, kind = cursor.value(cursor.take("<I"))
            if key in metadata:
                raise CheckpointError(path, f"corrupt header: metadata key {key!r} appears twice")
            metadata[key], value_types[key] = value, kind
        table = [_tensor_entry(path, cursor) for _ in range(n_tensors)]
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise CheckpointError(path, f"corrupt header: general.alignment {alignment!r} is not a power of two")
        data_offset = cursor.pos + (-cursor.pos % alignment)
        tensors = _tensors(path, table, data_offset, alignment, size)
    finally:
        del cursor  # release the view of the map before it is closed
    return GGUFFile(path, version, metadata, value_types, tensors, data_offset, alignment, size)


def _tensor_entry(path, cursor):
    name = cursor.string()
    n_dims = cursor.take("<I")
    if not 1 <= n_dims <= MAX_DIMS:
        raise CheckpointError(path, f"corrupt header: tensor {name!r} has {n_dims} dimensions")
    ne = [cursor.take("<Q") for _ in range(n_dims)]
    return name, ne, cursor.take("<I"), cursor.take("<Q")


def _tensors(path, table, data_offset, alignment, size):
    """GGUFTensor per table entry; every tensor inside the file, aligned, and none overlapping."""
    import gguf

    tensors = {}
    for name, ne, type_id, relative in table:
        def bad(what):
            return CheckpointError(path, f"corrupt header: tensor {name!r}: {what}")

        if name in tensors:
            raise bad("appears twice")
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise bad(f"unknown ggml type {type_id}") from None
        if qtype not in gguf.GGML_QUANT_SIZES:
            raise bad(f"ggml type {qtype.name} has no known block layout")
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if ne[0] % block_size:
            raise bad(f"row length {ne[0]} is not a multiple of {qtype.name}'s block of {block_size}")
        if relative % alignment:
            raise bad(f"data offset {relative} is not aligned to {alignment}")
        nbytes = prod(ne) // block_size * type_size
        offset = data_offset + relative
        if offset + nbytes > size:
            raise CheckpointError(path, f"truncated: tensor {name!r} ends at byte {offset + nbytes}, "
                                        f"but the file has only {size} bytes")
        shape = tuple(int(n) for n in reversed(ne))
        tensors[name] = GGUFTensor(name, name, qtype.name, shape, path, offset, nbytes, block_size, type_size)
    previous = None
    for info in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        if previous is not None and info.nbytes and info.offset < previous.offset + previous.nbytes:
            raise CheckpointError(path, f"corrupt header: tensors {previous.name!r} and {info.name!r} overlap")
        if info.nbytes:
            previous = info
    return tensors


def dequantize_blocks(stored, type_name, cols):
    """Quantized rows [..., row_bytes] of ggml type `type_name` -> float32 [..., cols].

    swtool.quant's Numba dequantizers (parallel over rows, ggml's floats exactly) for the types
    it writes; gguf-py's NumPy ones for any other type it decodes. On one core the Numba ones
    decode SmolLM2's Q4_1 down projection 10x faster and its Q8_0 embedding 4x (0.6 vs 5.6 ms,
    26 vs 108 ms): what a long input (eval) pays for each tensor before BLAS.
    """
    from swtool.quant import TYPES, dequantize

    if type_name in {qtype.name for qtype in TYPES}:
        return dequantize(stored, type_name, stored.shape[:-1] + (cols,))
    return dequantize_with_gguf_py(stored, type_name, cols)


def dequantize_with_gguf_py(stored, type_name, cols):
    """gguf-py's dequantizer: an independent implementation (tests, bench/gguf_scan.py's old path)."""
    import gguf

    values = gguf.quants.dequantize(np.ascontiguousarray(stored), gguf.GGMLQuantizationType[type_name])
    return np.ascontiguousarray(values.reshape(stored.shape[:-1] + (cols,)), dtype=np.float32)


@functools.lru_cache(maxsize=None)
def dequantizable(type_name):
    """Does gguf-py's dequantize handle this ggml type? Tried once on one zero block."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    try:
        gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def is_gguf(path):
    """Does the file at `path` start with the GGUF magic?"""
    try:
        with open_regular(path) as f:
            return f.read(4) == MAGIC
    except (OSError, CheckpointError):
        return False

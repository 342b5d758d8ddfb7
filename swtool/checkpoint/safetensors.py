"""The safetensors format, read and written by hand.

A file is an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}),
then the tensor bytes; offsets count from the end of the header.

safetensors' NumPy API cannot return bf16, so the header is parsed here and the
bytes are decoded to float32 by swtool. Every header is validated before any
byte of data is touched: offsets inside the file, byte length = shape x dtype,
no two tensors sharing bytes.

Tensor data is memory-mapped only while it is decoded and unmapped right after,
so the resident pages of a scan stay near one tensor, not the whole file.
"""

import contextlib
import gc
import json
import mmap
import os
import struct
from dataclasses import dataclass, replace
from math import prod
from pathlib import Path

import numpy as np

from swtool.atomic import atomic_path
from swtool.errors import CheckpointError
from swtool.inputfile import open_regular
from swtool.jsonfile import parse_json

# safetensors dtype -> (bytes per element, NumPy dtype of the stored bits)
DTYPES = {
    "BF16": (2, np.dtype("<u2")),
    "F16": (2, np.dtype("<f2")),
    "F32": (4, np.dtype("<f4")),
    "F64": (8, np.dtype("<f8")),
    "I8": (1, np.dtype("i1")),
    "U8": (1, np.dtype("u1")),
    "I16": (2, np.dtype("<i2")),
    "U16": (2, np.dtype("<u2")),
    "I32": (4, np.dtype("<i4")),
    "U32": (4, np.dtype("<u4")),
    "I64": (8, np.dtype("<i8")),
    "U64": (8, np.dtype("<u8")),
    "BOOL": (1, np.dtype("u1")),
    "F8_E4M3": (1, np.dtype("u1")),
    "F8_E5M2": (1, np.dtype("u1")),
}
FLOAT_DTYPES = ("BF16", "F16", "F32")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are and how to decode them."""

    name: str
    dtype: str
    shape: tuple
    path: Path
    offset: int  # absolute byte offset of the first element in the file
    nbytes: int

    @property
    def itemsize(self):
        return DTYPES[self.dtype][0]

    @property
    def readable(self):
        """Can swtool decode it to float32? (BF16, F16, F32)"""
        return self.dtype in FLOAT_DTYPES

    def element_offset(self, index):
        """Absolute file offset of one element, `index` a tuple in the tensor's shape."""
        flat = int(np.ravel_multi_index(index, self.shape))
        return self.offset + flat * self.itemsize

    def sub(self, index):
        """Entry `index` of the first axis as a tensor of its own, e.g. expert e of stacked experts
        [experts, out, in] -> its 2-D [out, in] matrix. Row-major, so its bytes are one contiguous run."""
        if len(self.shape) < 2 or not 0 <= index < self.shape[0]:
            raise CheckpointError(self.path, f"tensor {self.name!r} of shape {list(self.shape)} "
                                             f"has no entry {index} along its first axis")
        size = self.nbytes // self.shape[0]
        return replace(self, shape=self.shape[1:], offset=self.offset + index * size, nbytes=size)

    def read(self, rows=None):
        """Decode the tensor (or only `rows` of its first axis) to a new float32 array."""
        if self.dtype not in FLOAT_DTYPES:
            raise CheckpointError(self.path, f"tensor {self.name!r} has dtype {self.dtype}; "
                                             f"swtool reads {', '.join(FLOAT_DTYPES)}")
        return self.with_stored(lambda stored: decode_float32(stored, self.dtype), rows)

    def with_stored(self, use, rows=None):
        """use(stored) on the memory-mapped bits (or `rows` of them); the mapping is closed after.

        `use` must not keep a reference to its argument: the map is released on return,
        which is what keeps a scan's resident memory near one tensor.
        """
        mapping, skip = map_bytes(self.path, self.offset, self.nbytes)
        stored = np.frombuffer(mapping, dtype=DTYPES[self.dtype][1], count=prod(self.shape),
                               offset=skip).reshape(self.shape)
        if rows is not None:
            stored = stored[rows if isinstance(rows, slice) else np.asarray(rows)]
        try:
            return use(stored)
        finally:
            del stored  # the mmap cannot close while a NumPy view of it exists
            close_map(mapping)


class _NoBytes(bytes):
    """What map_bytes gives for an empty range: mmap cannot map 0 bytes (length 0 means "all")."""

    def close(self):
        pass


def close_map(mapping):
    """Unmap now, so resident memory stays near one tensor.

    A view of the map that only a reference cycle still holds makes mmap.close() fail:
    an error's traceback, or numba compiling a kernel for a new signature (its caught
    typing errors keep the arguments' frames, found when the first scan with an empty
    kernel cache failed here). Collecting the cycles releases the view. A view still
    referenced after that keeps the map until the view goes; then Python unmaps it.
    """
    try:
        mapping.close()
    except BufferError:
        gc.collect()
        with contextlib.suppress(BufferError):
            mapping.close()


def map_bytes(path, offset, nbytes):
    """A read-only mmap covering [offset, offset + nbytes) and where that range starts in it."""
    if nbytes == 0:
        return _NoBytes(), 0
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), offset + nbytes - start, access=mmap.ACCESS_READ, offset=start)
    return mapping, offset - start


def decode_float32(stored, dtype):
    """Stored bits -> new float32 array of the same shape. bf16 is the top half of a float32."""
    out = np.empty(stored.shape, dtype=np.float32)
    if dtype == "BF16":
        np.left_shift(stored, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = stored
    return out


def encode_float32(values, dtype):
    """float32 array -> stored bits for `dtype`; bf16 rounds to nearest even like torch."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "BF16":
        bits = values.view(np.uint32)
        # round to nearest even on the 16 bits dropped; uint32 wraps only for NaNs, fixed below
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype("<u2")
        nan = np.isnan(values)
        if nan.any():
            rounded[nan] = (bits[nan] >> 16).astype("<u2") | 0x40  # keep NaN a NaN
        return rounded
    with np.errstate(over="ignore"):  # beyond f16's range becomes inf, as in torch
        return values.astype(DTYPES[dtype][1])


ENCODE_CHUNK_ELEMENTS = 4 * 1024 * 1024  # encode and write big tensors in pieces: bounded temporaries


class SafetensorsFile:
    """The validated header of one .safetensors file: {name: TensorInfo} and metadata."""

    def __init__(self, path):
        self.path = Path(path)
        self.tensors, self.metadata = _read_header(self.path)

    def __contains__(self, name):
        return name in self.tensors

    def __getitem__(self, name):
        return self.tensors[name]


def _read_header(path):
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(path, f"not a safetensors file: {size} bytes, too short for a header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(path, f"corrupt header: declared length {header_len} bytes "
                                            f"exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + header_len > size:
                raise CheckpointError(path, f"truncated: header needs {8 + header_len} bytes, file has {size}")
            raw = f.read(header_len)
    except IsADirectoryError:
        raise CheckpointError(path, "is a directory, expected a .safetensors file") from None
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    header = parse_json(raw, path, "corrupt header")
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt header: JSON is not an object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "corrupt header: __metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_size = size - data_start
    tensors = {name: _tensor_info(path, name, entry, data_start) for name, entry in header.items()}
    _check_extents(path, tensors, data_start, data_size)
    return tensors, metadata


def _tensor_info(path, name, entry, data_start):
    def bad(what):
        return CheckpointError(path, f"corrupt header: tensor {name!r}: {what}")

    if not isinstance(entry, dict):
        raise bad("entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    nbytes = offsets[1] - offsets[0]
    expected = prod(shape) * DTYPES[dtype][0]
    if nbytes != expected:
        raise bad(f"shape {shape} x {dtype} is {expected} bytes but data_offsets span {nbytes}")
    return TensorInfo(name, dtype, tuple(shape), Path(path), data_start + offsets[0], nbytes)


def _check_extents(path, tensors, data_start, data_size):
    """Every tensor inside the file, and no two tensors sharing a byte."""
    previous = None
    for info in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        end = info.offset - data_start + info.nbytes
        if end > data_size:
            raise CheckpointError(path, f"truncated: tensor {info.name!r} ends at data byte {end}, "
                                        f"but the file holds only {data_size} data bytes")
        if previous is not None and info.nbytes and info.offset < previous.offset + previous.nbytes:
            raise CheckpointError(path, f"corrupt header: tensors {previous.name!r} and {info.name!r} overlap")
        if info.nbytes:
            previous = info


@dataclass(frozen=True)
class DeferredTensor:
    """A tensor's shape now and its float32 values later: `make()` is called at write time."""

    shape: tuple
    make: object

    def __call__(self):
        return self.make()


def write_safetensors(path, tensors, metadata=None):
    """Write {name: (dtype, values)} as a safetensors file, atomically.

    `values` is a float32 array, encoded to `dtype`, or a DeferredTensor that is
    made only when its turn comes, so a large file is produced one tensor at a time.
    """
    shapes = {name: tuple(value.shape) for name, (dtype, value) in tensors.items()}
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, (dtype, _) in tensors.items():
        nbytes = prod(shapes[name]) * DTYPES[dtype][0]
        header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as the library writes it
    with atomic_path(path, nbytes=8 + len(blob) + offset) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, (dtype, value) in tensors.items():
            array = value() if callable(value) else value
            if tuple(array.shape) != shapes[name]:
                raise ValueError(f"{name}: produced shape {array.shape}, declared {shapes[name]}")
            flat = array.reshape(-1)
            for start in range(0, flat.size, ENCODE_CHUNK_ELEMENTS):
                f.write(encode_float32(flat[start:start + ENCODE_CHUNK_ELEMENTS], dtype).tobytes())

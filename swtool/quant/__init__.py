"""GGUF block quantizers, bit-exact with ggml's quantizers, with or without an importance matrix.

    from gguf import GGMLQuantizationType as T
    from swtool.quant import quantize, dequantize

    data = quantize(weight, T.Q4_K)          # float32 [rows, cols] -> uint8 [rows, row_bytes(T.Q4_K, cols)]
    back = dequantize(data, T.Q4_K, weight.shape)   # -> float32 [rows, cols]

    data = quantize(weight, T.Q4_K, importance=imatrix_column_weights)   # float32 [cols]

`quantize` gives the same bytes as ggml's `ggml_quantize_chunk(type, src, dst, 0,
rows, cols, imatrix)` for every type here: with no importance, ggml's
`quantize_row_*_ref` (IQ4_NL/IQ4_XS: their chunk path, which searches more scales);
with an importance vector (one non-negative weight per column, what llama-quantize
takes from an imatrix file), ggml's importance-weighted `quantize_row_*_impl`
(Q8_0 and the float types have no use for it and ignore it);
`dequantize` the same floats as ggml's `to_float` (tests/test_quant.py checks
both against libggml, tests/test_quant_importance.py the weighted bytes). The bytes are what a GGUF file stores for a tensor of
that type: hand them to gguf's writer with `raw_dtype=qtype`.

Blocks run along the last axis (ggml's ne[0], a Hugging Face weight's columns),
so cols must be a multiple of the type's block size (32, or 256 for K-quants and IQ4_XS).
Rows are quantized in parallel (Numba prange); kernels compile on first use
(about 5 s per type) and are cached on disk. Numba keys that cache on each
kernel's own source file only: after editing bits.py or search.py, delete
swtool/quant/__pycache__/*.nb* or the kernels that call them stay stale.

Modules: bits.py (float/half/int helpers), floats.py (F32/F16/BF16),
simple.py (32-blocks), search.py (the scale searches), kquants.py (K-quants),
iquants.py (IQ4_NL, IQ4_XS), blocks.py (the block decoders). Each type's sizes, enum, file type and functions:
swtool/block_types.py.
"""

import importlib

import numpy as np
from gguf import GGMLQuantizationType

from swtool import block_types
from swtool.errors import SwtoolError

TYPES = tuple(GGMLQuantizationType(block_type.ggml_type) for block_type in block_types.TYPES)
"""Every type swtool can write and read, in gguf's enum (swtool/block_types.py has their facts)."""


def _function(qualified_name):
    """The function a block type names as "module.function" inside swtool.quant (Numba imported with it)."""
    module, name = qualified_name.split(".")
    return getattr(importlib.import_module(f"swtool.quant.{module}"), name)


def _kernels(qtype):
    """(quantize_rows, dequantize_rows) for qtype, from its row in swtool/block_types.py."""
    block_type = block_types.BY_NAME[qtype.name]
    quantize_rows = _function(block_type.quantizer)
    if block_type.block_values == 1:
        return quantize_rows, _function(block_type.decoder)
    # a block type: its segment decoder runs through swtool.quant.blocks' row driver (the decoders
    # swtool.kernels.gguf_blocks multiplies from too), which branches on the type's kind
    from swtool.quant import blocks

    kind, values = block_types.KIND[qtype.name], block_type.block_values
    return quantize_rows, lambda data, out: blocks.dequantize_rows(data, kind, values, out)


def quant_type(qtype):
    """A GGMLQuantizationType from the enum, its int value or its name ("q4_k", "Q8_0", "f16")."""
    try:
        if isinstance(qtype, str):
            found = GGMLQuantizationType[qtype.upper()]
        else:
            found = GGMLQuantizationType(qtype)
    except (KeyError, ValueError):
        found = None
    if found not in TYPES:
        names = ", ".join(t.name for t in TYPES)
        raise SwtoolError(f"unsupported quantization type {qtype!r}; supported: {names}")
    return found


def block_size(qtype):
    """Elements per block: 1 for F32/F16/BF16, 32 for Q*_0/Q*_1/IQ4_NL, 256 for K-quants/IQ4_XS."""
    return block_types.BY_NAME[quant_type(qtype).name].block_values


def row_bytes(qtype, cols):
    """Bytes of one quantized row of `cols` elements (cols a multiple of the block size)."""
    qtype = quant_type(qtype)
    check_row_length(qtype, cols)
    elements, nbytes = block_types.block_shape(qtype.name)
    return cols // elements * nbytes


def fits(qtype, cols):
    """True if rows of `cols` elements can be stored in qtype (the exporter's fallback test)."""
    return cols % block_size(qtype) == 0


def check_row_length(qtype, cols):
    qtype = quant_type(qtype)
    if not fits(qtype, cols):
        raise SwtoolError(f"{qtype.name} needs rows whose length is a multiple of {block_size(qtype)}; "
                          f"got rows of {cols}")


def quantize(values, qtype, importance=None):
    """float array [..., cols] -> uint8 [..., row_bytes]: ggml's bytes for `qtype`.

    Any float dtype is accepted and converted to float32 first (ggml quantizes
    float32). NaN or Inf anywhere is an error, as is cols not divisible by the block size.
    `importance`: None, or one weight per column (float, finite, >= 0), ggml's quant_weights.
    """
    qtype = quant_type(qtype)
    values = np.asarray(values)
    if values.ndim == 0 or not np.issubdtype(values.dtype, np.floating):
        raise SwtoolError(f"quantize needs a float array with at least one axis; got {values.dtype} {values.shape}")
    cols = values.shape[-1]
    check_row_length(qtype, cols)
    weights = _importance(importance, cols)
    rows = np.ascontiguousarray(values.reshape(-1, cols), dtype=np.float32)
    out = np.empty((rows.shape[0], row_bytes(qtype, cols)), dtype=np.uint8)
    bad = np.zeros(rows.shape[0], dtype=np.bool_)
    if rows.size:
        _kernels(qtype)[0](rows, weights, out, bad)
    if bad.any():
        first = int(np.argmax(bad))
        raise SwtoolError(f"cannot quantize to {qtype.name}: row {first} holds NaN or Inf "
                          f"({int(bad.sum())} such rows)")
    return out.reshape(values.shape[:-1] + (out.shape[1],))


def _importance(importance, cols):
    """The quantizers' importance argument: float32 [cols], or an empty array for none."""
    if importance is None:
        return np.empty(0, dtype=np.float32)
    weights = np.asarray(importance)
    if weights.shape != (cols,) or not np.issubdtype(weights.dtype, np.floating):
        raise SwtoolError(f"importance must be a float vector of one weight per column ({cols}); "
                          f"got {weights.dtype} {weights.shape}")
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise SwtoolError("importance weights must be finite and non-negative")
    return weights


def dequantize(data, qtype, shape):
    """uint8 bytes of `qtype` -> float32 array of `shape` (the logical shape, last axis = cols)."""
    qtype = quant_type(qtype)
    shape = tuple(int(n) for n in shape)
    if not shape:
        raise SwtoolError("dequantize needs a shape with at least one axis")
    cols = shape[-1]
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    expected = n_rows * row_bytes(qtype, cols)
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)  # any dtype: its bytes (gguf reads F16 as float16)
    if data.size != expected:
        raise SwtoolError(f"{qtype.name} data of shape {shape} should be {expected} bytes; got {data.size}")
    out = np.empty((n_rows, cols), dtype=np.float32)
    if out.size:
        from swtool.kernels.jit import read_only  # numba's set-up: loaded with the kernels, not with this module

        _kernels(qtype)[1](read_only(data.reshape(n_rows, -1)), out)
    return out.reshape(shape)

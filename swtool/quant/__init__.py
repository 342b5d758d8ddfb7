"""GGUF block quantizers, bit-exact with ggml's reference quantizers.

    from gguf import GGMLQuantizationType as T
    from swtool.quant import quantize, dequantize

    data = quantize(weight, T.Q4_K)          # float32 [rows, cols] -> uint8 [rows, row_bytes(T.Q4_K, cols)]
    back = dequantize(data, T.Q4_K, weight.shape)   # -> float32 [rows, cols]

`quantize` gives the same bytes as ggml's `ggml_quantize_chunk` with no
importance matrix, i.e. ggml's `quantize_row_*_ref`, for every type here;
`dequantize` the same floats as ggml's `to_float` (tests/test_quant.py checks
both against libggml). The bytes are what a GGUF file stores for a tensor of
that type: hand them to gguf's writer with `raw_dtype=qtype`.

Blocks run along the last axis (ggml's ne[0], a Hugging Face weight's columns),
so cols must be a multiple of the type's block size (32, or 256 for K-quants).
Rows are quantized in parallel (Numba prange); kernels compile on first use
(about 5 s per type) and are cached on disk. Numba keys that cache on each
kernel's own source file only: after editing bits.py or search.py, delete
swtool/quant/__pycache__/*.nb* or the kernels that call them stay stale.

Modules: bits.py (float/half/int helpers), floats.py (F32/F16/BF16),
simple.py (32-blocks), search.py (the K-quant scale searches), kquants.py (K-quants).
"""

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from swtool.errors import SwtoolError


def _kernels(qtype):
    """(quantize_rows, dequantize_rows) for qtype; Numba is imported on first use, not with the package."""
    from swtool.quant import blocks, floats, kquants, simple

    T = GGMLQuantizationType
    quantizers = {
        T.F32: (floats.quantize_f32, floats.dequantize_f32),
        T.F16: (floats.quantize_f16, floats.dequantize_f16),
        T.BF16: (floats.quantize_bf16, floats.dequantize_bf16),
        T.Q8_0: simple.quantize_q8_0, T.Q4_0: simple.quantize_q4_0, T.Q4_1: simple.quantize_q4_1,
        T.Q5_0: simple.quantize_q5_0, T.Q5_1: simple.quantize_q5_1,
        T.Q2_K: kquants.quantize_q2_k, T.Q3_K: kquants.quantize_q3_k, T.Q4_K: kquants.quantize_q4_k,
        T.Q5_K: kquants.quantize_q5_k, T.Q6_K: kquants.quantize_q6_k,
    }
    found = quantizers[qtype]
    if isinstance(found, tuple):
        return found
    # a block type: decoded by swtool.quant.blocks, the decoders gguf_kernels.py multiplies from too
    kind = blocks.KIND[qtype.name]
    values = blocks.BLOCK_SHAPES[kind][0]
    return found, lambda data, out: blocks.dequantize_rows(data, kind, values, out)


T = GGMLQuantizationType
TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
         T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
"""Every type swtool can write and read, in gguf's enum."""
del T


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
    """Elements per block: 1 for F32/F16/BF16, 32 for Q*_0/Q*_1, 256 for K-quants."""
    return GGML_QUANT_SIZES[quant_type(qtype)][0]


def row_bytes(qtype, cols):
    """Bytes of one quantized row of `cols` elements (cols a multiple of the block size)."""
    qtype = quant_type(qtype)
    check_row_length(qtype, cols)
    elements, nbytes = GGML_QUANT_SIZES[qtype]
    return cols // elements * nbytes


def fits(qtype, cols):
    """True if rows of `cols` elements can be stored in qtype (the exporter's fallback test)."""
    return cols % block_size(qtype) == 0


def check_row_length(qtype, cols):
    qtype = quant_type(qtype)
    if not fits(qtype, cols):
        raise SwtoolError(f"{qtype.name} needs rows whose length is a multiple of {block_size(qtype)}; "
                          f"got rows of {cols}")


def quantize(values, qtype):
    """float array [..., cols] -> uint8 [..., row_bytes]: ggml's bytes for `qtype`.

    Any float dtype is accepted and converted to float32 first (ggml quantizes
    float32). NaN or Inf anywhere is an error, as is cols not divisible by the block size.
    """
    qtype = quant_type(qtype)
    values = np.asarray(values)
    if values.ndim == 0 or not np.issubdtype(values.dtype, np.floating):
        raise SwtoolError(f"quantize needs a float array with at least one axis; got {values.dtype} {values.shape}")
    cols = values.shape[-1]
    check_row_length(qtype, cols)
    rows = np.ascontiguousarray(values.reshape(-1, cols), dtype=np.float32)
    out = np.empty((rows.shape[0], row_bytes(qtype, cols)), dtype=np.uint8)
    bad = np.zeros(rows.shape[0], dtype=np.bool_)
    if rows.size:
        _kernels(qtype)[0](rows, out, bad)
    if bad.any():
        first = int(np.argmax(bad))
        raise SwtoolError(f"cannot quantize to {qtype.name}: row {first} holds NaN or Inf "
                          f"({int(bad.sum())} such rows)")
    return out.reshape(values.shape[:-1] + (out.shape[1],))


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
        _kernels(qtype)[1](data.reshape(n_rows, -1), out)
    return out.reshape(shape)

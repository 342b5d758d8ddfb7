"""The unquantized GGUF types: F32, F16, BF16 (one element per block).

F16 and BF16 round as ggml_quantize_chunk does (ggml_fp32_to_fp16_row and
ggml_fp32_to_bf16_row_ref: nearest even), little-endian, two bytes an element.
Same driver conventions as simple.py: out[rows, row_bytes] uint8, bad[row] for NaN/Inf rows
(and an `importance` argument, which a float type has no use for).
"""

import numba
import numpy as np

from swtool.quant.bits import JIT, bf16_to_fp32, fp16_to_fp32, fp32_to_bf16, fp32_to_fp16, has_nonfinite


@numba.njit(parallel=True, **JIT)
def quantize_f32(values, importance, out, bad):  # importance: unused
    for r in numba.prange(values.shape[0]):
        x, y = values[r].view(np.uint32), out[r].view(np.uint32)
        bad[r] = has_nonfinite(values[r])
        if not bad[r]:
            for i in range(x.shape[0]):
                y[i] = x[i]


@numba.njit(parallel=True, **JIT)
def quantize_f16(values, importance, out, bad):  # importance: unused
    for r in numba.prange(values.shape[0]):
        x, y = values[r], out[r].view(np.uint16)
        bad[r] = has_nonfinite(x)
        if not bad[r]:
            for i in range(x.shape[0]):
                y[i] = fp32_to_fp16(x[i])


@numba.njit(parallel=True, **JIT)
def quantize_bf16(values, importance, out, bad):  # importance: unused
    for r in numba.prange(values.shape[0]):
        x, y = values[r], out[r].view(np.uint16)
        bad[r] = has_nonfinite(x)
        if not bad[r]:
            for i in range(x.shape[0]):
                y[i] = fp32_to_bf16(x[i])


@numba.njit(parallel=True, **JIT)
def dequantize_f32(data, out):
    for r in numba.prange(data.shape[0]):
        out[r] = data[r].view(np.float32)


@numba.njit(parallel=True, **JIT)
def dequantize_f16(data, out):
    for r in numba.prange(data.shape[0]):
        bits = data[r].view(np.uint16)
        for i in range(bits.shape[0]):
            out[r, i] = fp16_to_fp32(bits[i])


@numba.njit(parallel=True, **JIT)
def dequantize_bf16(data, out):
    for r in numba.prange(data.shape[0]):
        bits = data[r].view(np.uint16)
        for i in range(bits.shape[0]):
            out[r, i] = bf16_to_fp32(bits[i])

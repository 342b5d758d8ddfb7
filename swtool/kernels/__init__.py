"""Numba kernels: y = x @ W.T straight from a weight's stored bits, for the few tokens of a scan,
and whole-tensor statistics from the same bits. This module chooses the kernel; the modules do the work:

    common.py       the leaf: fastmath flags, register block, alignment, `decode_weight`, the 4 x 4 blocks
    jit.py          numba set-up, imported (by common.py) before numba compiles anything
    dense.py        bf16, f16 and f32 weights, stored [out, in] or transposed; statistics
    bf16_pairs.py   bf16 on CPUs with AVX-512: weights decoded in pairs, a loop written in LLVM IR
    gguf_blocks.py  GGUF block types (Q8_0 ... Q6_K), decoded by swtool.quant.blocks into an L1 tile

Imports run one way, from here down to common.py and jit.py, which import nothing of swtool.
gguf_blocks.py alone reaches out, to swtool.quant.blocks (which needs only jit.py of this
package), and is imported on the first block tensor: a bf16 scan does not pay for importing
swtool.quant and gguf. The types' facts come from swtool/block_types.py.

Long inputs (many tokens x worlds) go through decode + BLAS instead, where the matrix
product dominates and BLAS is faster (see `fused_pays_off`).
"""

import functools

import numpy as np

from swtool.block_types import BLOCK_TYPES
from swtool.kernels import bf16_pairs, dense
from swtool.kernels.common import padded_rows
from swtool.kernels.jit import read_only

# Above this many input rows decode + BLAS wins over the fused bf16 kernels (they cost the same
# at about 80 rows on a 2048 x 8192 matrix, one core; docs/performance.md).
FUSED_MAX_ROWS = 80
# The block types' crossover is lower: a block costs more to decode than bf16, and decode + BLAS
# uses swtool.quant's Numba dequantizer (bench/gguf_scan.py --only-crossover; docs/performance.md, "GGUF scan speed").
BLOCK_MAX_ROWS = 48


def fused_pays_off(n_rows, dtype=None):
    """Is multiplying from the stored bits faster than decode + BLAS for n_rows input rows?"""
    return n_rows <= (BLOCK_MAX_ROWS if dtype in BLOCK_TYPES else FUSED_MAX_ROWS)


def is_transposed_view(stored):
    """Is `stored` [M, K] the transpose of a row-major [K, M] array (its rows strided, its columns adjacent)?"""
    return stored.ndim == 2 and stored.shape[0] > 1 and stored.shape[1] > 1 and stored.strides[0] < stored.strides[1]


def matmul_stored(x, stored, dtype):
    """x [N, K] float32 (C-contiguous) times stored.T, `stored` the raw [M, K] array of `dtype`.

    `stored` may be a transposed view of a row-major [K, M] array (a weight kept [in, out],
    see checkpoint/transposed.py): then dense.py's column-block kernel reads it row by row.
    A GGUF block type (BLOCK_TYPES) has `stored` [M, row_bytes] uint8: gguf_blocks.py multiplies it.
    """
    if dtype in BLOCK_TYPES:
        from swtool.kernels import gguf_blocks  # imports swtool.quant and gguf: only for block tensors

        return gguf_blocks.matmul_blocks(x, stored, dtype)
    if is_transposed_view(stored):
        out = np.empty((x.shape[0], stored.shape[0]), dtype=np.float32)
        # S = stored.T [K, M], rows contiguous
        dense.matmul_columns(np.ascontiguousarray(x, dtype=np.float32), stored_bits(stored.T, dtype), out)
        return out
    if dtype == "BF16" and stored.strides[1] == 2 and pairs_available():
        return bf16_pairs.matmul(x, stored_bits(stored, dtype))
    padded = padded_rows(x)
    out = np.empty((padded.shape[0], stored.shape[0]), dtype=np.float32)
    dense.matmul_rows(padded, stored_bits(stored, dtype), out)
    return out[:x.shape[0]]


@functools.cache
def pairs_available():
    """Does bf16_pairs' AVX-512 kernel run here (asked once per process)?"""
    return bf16_pairs.available()


def stored_bits(stored, dtype):
    """The stored array viewed, read-only, as the dtype `decode_weight` decodes by: uint16 for bf16, int16 for
    half, float32."""
    return read_only(stored.view({"BF16": np.uint16, "F16": np.int16, "F32": np.float32}[dtype]))


def sum_of_squares(stored, dtype):
    """Sum of the squared weights of a 2-D stored array, in float64, read once from its bits."""
    return float(dense.sum_of_squares(stored_bits(stored, dtype)))


def count_larger(stored, dtype, magnitude):
    """How many weights of a 2-D stored array have |w| > magnitude (compared in float32)."""
    return int(dense.count_larger(stored_bits(stored, dtype), np.float32(magnitude)))

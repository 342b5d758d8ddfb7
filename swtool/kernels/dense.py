"""Numba kernels: y = x @ W.T reading W in its stored dtype (bf16, f16, f32), for the few tokens of a scan.

Decoding a bf16 matrix to float32 and then calling BLAS touches every weight
three times (read bf16, write f32, read f32). With a handful of token rows the
product is bound by reading W and by the multiply-adds, so these kernels decode
each weight in a register right where it is used (`common.decode_weight`): each
weight is read once, from the memory map, and never materialised as float32.

Weights stored [out, in] go through `matmul_rows` and common.py's 4 x 4 register
block; weights stored transposed through `matmul_columns`. The same decode gives
the whole-tensor statistics detect.py needs (`sum_of_squares`, `count_larger`).
Speeds: docs/performance.md.
"""

import numba
import numpy as np

from swtool.kernels.common import BLOCK, FAST, block_4x4, decode_weight


@numba.njit(parallel=True, fastmath=FAST, cache=True)
def matmul_rows(x, w, out):
    """out[n, o] = sum_k x[n, k] * W[o, k]; x [N, K] float32 with N a multiple of 4,
    w [M, K] the stored bits (see `decode_weight`), out [N, M] float32."""
    n_out = w.shape[0]
    for quad in numba.prange((n_out + 3) // 4):
        # four weight rows; the last quad repeats its last row (written twice, same value)
        o = np.empty(4, dtype=np.int64)
        for r in range(4):
            o[r] = min(4 * quad + r, n_out - 1)
        for g in range(0, x.shape[0], BLOCK):
            block_4x4(x, g, w, o, out)


# --- weights stored transposed, S = W.T [in, out] (GPT-2's Conv1D) ----------------------
# Rows of S are input channels, so y = x @ S is a sum of scaled rows: each worker owns
# a block of output columns, decodes one row segment of S at a time and adds
# x[n, k] * S[k, block] into accumulators. Each weight is still read once.

COLUMN_BLOCK = 256  # output columns per worker: 64 input rows x 256 float32 accumulators stay in cache


@numba.njit(fastmath=FAST, cache=True, inline="always")
def _axpy_rows(x, k, values, acc):
    """acc[n] += x[n, k] * values for every input row n."""
    for n in range(x.shape[0]):
        xk = x[n, k]
        row = acc[n]
        for o in range(values.shape[0]):
            row[o] += xk * values[o]


@numba.njit(fastmath=FAST, cache=True, inline="always")
def _store_block(acc, out, start):
    for n in range(acc.shape[0]):
        for o in range(acc.shape[1]):
            out[n, start + o] = acc[n, o]


@numba.njit(parallel=True, fastmath=FAST, cache=True)
def matmul_columns(x, s, out):
    """out[n, o] = sum_k x[n, k] * S[k, o]; x [N, K] float32, s [K, M] the stored bits of S = W.T
    (see `decode_weight`), out [N, M] float32."""
    n_in, n_out = s.shape
    for block in numba.prange((n_out + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
        start = block * COLUMN_BLOCK
        width = min(n_out, start + COLUMN_BLOCK) - start
        values = np.empty(width, dtype=np.float32)
        acc = np.zeros((x.shape[0], width), dtype=np.float32)
        for k in range(n_in):
            bits = s[k, start:start + width]
            for o in range(width):
                values[o] = decode_weight(bits[o])
            _axpy_rows(x, k, values, acc)
        _store_block(acc, out, start)


# --- whole-tensor statistics from the stored bits (detect.py's outlier test and ranks) ----

@numba.njit(parallel=True, fastmath=FAST, cache=True)
def sum_of_squares(w):
    """Sum of the squared weights of w [M, K] (stored bits), in float64."""
    total = 0.0
    for o in numba.prange(w.shape[0]):
        row = w[o]
        acc = 0.0  # float64: a sum over hundreds of millions of squares
        for k in range(w.shape[1]):
            value = np.float64(decode_weight(row[k]))
            acc += value * value
        total += acc
    return total


@numba.njit(parallel=True, cache=True)
def count_larger(w, magnitude):
    """How many weights of w [M, K] (stored bits) have |w| > magnitude (float32)."""
    count = 0
    for o in numba.prange(w.shape[0]):
        row = w[o]
        mine = 0
        for k in range(w.shape[1]):
            mine += abs(decode_weight(row[k])) > magnitude
        count += mine
    return count

"""Numba kernels: y = x @ W.T reading W in its stored dtype, for the few tokens of a scan.

Decoding a bf16 matrix to float32 and then calling BLAS touches every weight
three times (read bf16, write f32, read f32). With a handful of token rows the
product is bound by reading W, so these kernels decode one row of W at a time
into a small buffer and use it at once: each weight is read once, from the
memory map, and never materialised as float32.

Long inputs (many tokens x worlds) go through decode + BLAS instead, where the
matrix product dominates and BLAS is faster (see `fused_pays_off`).
"""

import numba
import numpy as np

FUSED_MAX_ROWS = 64
# fastmath: only reassociation and fused multiply-add, so the dot products vectorise;
# no NaN/Inf assumptions. Results move at float32 rounding level (tests hold them to transformers).
FAST = {"reassoc", "contract"}  # above this many input rows, decode + BLAS wins (measured in bench/)


def fused_pays_off(n_rows):
    return n_rows <= FUSED_MAX_ROWS


def _f16_table():
    """All 65536 half-precision bit patterns as float32: decoding f16 is one lookup."""
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


F16_TABLE = _f16_table()


# Loops index 1-D rows (x[n], w[o]) rather than 2-D elements: numba then drops the
# per-element index arithmetic and vectorises the dot product (10x faster, measured).

@numba.njit(fastmath=FAST, cache=True, inline="always")
def _dot_rows(x, values, out, o):
    """out[n, o] = x[n] . values for every input row n (float32 accumulation)."""
    for n in range(x.shape[0]):
        xn = x[n]
        acc = np.float32(0.0)
        for k in range(values.shape[0]):
            acc += xn[k] * values[k]
        out[n, o] = acc


@numba.njit(parallel=True, fastmath=FAST, cache=True)
def matmul_bf16(x, w_bits, out):
    """out[n, o] = sum_k x[n, k] * bf16(w_bits[o, k]); x [N, K] f32, w_bits [M, K] uint16."""
    n_out, n_in = w_bits.shape
    for o in numba.prange(n_out):
        bits = w_bits[o]
        values = np.empty(n_in, dtype=np.float32)
        as_int = values.view(np.uint32)
        for k in range(n_in):
            as_int[k] = np.uint32(bits[k]) << np.uint32(16)  # bf16 is the top half of a float32
        _dot_rows(x, values, out, o)


@numba.njit(parallel=True, fastmath=FAST, cache=True)
def matmul_f16(x, w_bits, table, out):
    """As matmul_bf16 for IEEE half precision, decoded through a 64k-entry table."""
    n_out, n_in = w_bits.shape
    for o in numba.prange(n_out):
        bits = w_bits[o]
        values = np.empty(n_in, dtype=np.float32)
        for k in range(n_in):
            values[k] = table[bits[k]]
        _dot_rows(x, values, out, o)


@numba.njit(parallel=True, fastmath=FAST, cache=True)
def matmul_f32(x, w, out):
    for o in numba.prange(w.shape[0]):
        _dot_rows(x, w[o], out, o)


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
def matmul_t_bf16(x, s_bits, out):
    """out[n, o] = sum_k x[n, k] * bf16(s_bits[k, o]); x [N, K] f32, s_bits [K, M] uint16."""
    n_in, n_out = s_bits.shape
    for block in numba.prange((n_out + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
        start = block * COLUMN_BLOCK
        width = min(n_out, start + COLUMN_BLOCK) - start
        values = np.empty(width, dtype=np.float32)
        as_int = values.view(np.uint32)
        acc = np.zeros((x.shape[0], width), dtype=np.float32)
        for k in range(n_in):
            bits = s_bits[k]
            for o in range(width):
                as_int[o] = np.uint32(bits[start + o]) << np.uint32(16)
            _axpy_rows(x, k, values, acc)
        _store_block(acc, out, start)


@numba.njit(parallel=True, fastmath=FAST, cache=True)
def matmul_t_f16(x, s_bits, table, out):
    n_in, n_out = s_bits.shape
    for block in numba.prange((n_out + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
        start = block * COLUMN_BLOCK
        width = min(n_out, start + COLUMN_BLOCK) - start
        values = np.empty(width, dtype=np.float32)
        acc = np.zeros((x.shape[0], width), dtype=np.float32)
        for k in range(n_in):
            bits = s_bits[k]
            for o in range(width):
                values[o] = table[bits[start + o]]
            _axpy_rows(x, k, values, acc)
        _store_block(acc, out, start)


@numba.njit(parallel=True, fastmath=FAST, cache=True)
def matmul_t_f32(x, s, out):
    n_in, n_out = s.shape
    for block in numba.prange((n_out + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
        start = block * COLUMN_BLOCK
        width = min(n_out, start + COLUMN_BLOCK) - start
        acc = np.zeros((x.shape[0], width), dtype=np.float32)
        for k in range(n_in):
            _axpy_rows(x, k, s[k, start:start + width], acc)
        _store_block(acc, out, start)


def is_transposed_view(stored):
    """Is `stored` [M, K] the transpose of a row-major [K, M] array (its rows strided, its columns adjacent)?"""
    return stored.ndim == 2 and stored.shape[0] > 1 and stored.shape[1] > 1 and stored.strides[0] < stored.strides[1]


def matmul_stored(x, stored, dtype):
    """x [N, K] float32 (C-contiguous) times stored.T, `stored` the raw [M, K] array of `dtype`.

    `stored` may be a transposed view of a row-major [K, M] array (a weight kept [in, out],
    see checkpoint/transposed.py): then the column-block kernels above read it row by row.
    """
    out = np.empty((x.shape[0], stored.shape[0]), dtype=np.float32)
    if is_transposed_view(stored):
        s = stored.T  # [K, M], rows contiguous
        if dtype == "BF16":
            matmul_t_bf16(x, s, out)
        elif dtype == "F16":
            matmul_t_f16(x, s.view(np.uint16), F16_TABLE, out)
        else:
            matmul_t_f32(x, s, out)
        return out
    if dtype == "BF16":
        matmul_bf16(x, stored, out)
    elif dtype == "F16":
        matmul_f16(x, stored.view(np.uint16), F16_TABLE, out)
    else:
        matmul_f32(x, stored, out)
    return out

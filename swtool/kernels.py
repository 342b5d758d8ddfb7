"""Numba kernels: y = x @ W.T reading W in its stored dtype, for the few tokens of a scan.

Decoding a bf16 matrix to float32 and then calling BLAS touches every weight
three times (read bf16, write f32, read f32). With a handful of token rows the
product is bound by reading W and by the multiply-adds, so these kernels decode
each weight in a register right where it is used: each weight is read once,
from the memory map, and never materialised as float32.

The inner loop works on a 4 x 4 block: four weight rows against four input rows.
Each decoded weight then serves four input rows and each loaded input value four
weights, so the loop is bound by the multiply-adds rather than by loads; LLVM
vectorises it over k (16 lanes with swtool.jit's 512-bit setting). Measured on
one core of the 2-core benchmark machine, a 2048 x 8192 bf16 matrix, 20 input rows:
1.4 GB/s with one weight row and one input row at a time (the previous kernel),
4.4 GB/s with this block (bench notes in README, "Memory and speed").

Long inputs (many tokens x worlds) go through decode + BLAS instead, where the
matrix product dominates and BLAS is faster (see `fused_pays_off`).
"""

import functools

import numpy as np

import swtool.jit  # noqa: F401  (512-bit vectors; before numba compiles anything)
import numba
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# GGUF block types, multiplied from their blocks by gguf_kernels.py with quant/blocks.py's
# decoders (the index is a type's `kind` there). Named here, not imported from swtool.quant:
# importing that package cost a bf16 scan about 40 ms of start-up for nothing.
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# Above this many input rows, decode + BLAS wins: on one core of the benchmark machine, a
# 2048 x 8192 bf16 matrix costs 48 ms fused and 49 ms decoded + BLAS at 80 rows, 55 vs 50 at 88.
FUSED_MAX_ROWS = 80
# Their crossover is lower: a block costs more to decode than bf16, and decode + BLAS then uses
# swtool.quant's Numba dequantizer. One core, 2048 x 8192 (bench/gguf_scan.py): fused and decode +
# BLAS cost the same at about 48 rows for Q4_1 and 64 for Q8_0, Q4_K and Q6_K.
BLOCK_MAX_ROWS = 48
# fastmath: only reassociation and fused multiply-add, so the dot products vectorise;
# no NaN/Inf assumptions. Results move at float32 rounding level (tests hold them to transformers).
FAST = {"reassoc", "contract"}
BLOCK = 4  # input rows per register block; x is padded to a multiple of it
ALIGN = 64  # bytes: x rows start on cache lines, so 512-bit loads never straddle two


def fused_pays_off(n_rows, dtype=None):
    """Is multiplying from the stored bits faster than decode + BLAS for n_rows input rows?"""
    return n_rows <= (BLOCK_MAX_ROWS if dtype in BLOCK_TYPES else FUSED_MAX_ROWS)


@intrinsic
def _weight(typingctx, bits):
    """One stored weight as float32. The array's dtype says how its bits decode, as numba
    has no float16 on the CPU: uint16 = bf16 (the top half of a float32), int16 = IEEE
    half (the bits of np.float16, converted by the CPU), float32 = itself."""
    i32, f32 = ir.IntType(32), ir.FloatType()
    if bits == types.uint16:
        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16)), f32)
    elif bits == types.int16:
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), f32)
    elif bits == types.float32:
        def codegen(context, builder, signature, args):
            return args[0]
    else:
        return None
    return types.float32(bits), codegen


@numba.njit(fastmath=FAST, cache=True, inline="always")
def _block(x, g, w, o, out):
    """out[g:g+4, o[r]] = x[g:g+4] . W[o[r]] for the four weight rows o[0..3] (float32 accumulation)."""
    xa, xb, xc, xd = x[g], x[g + 1], x[g + 2], x[g + 3]
    w0, w1, w2, w3 = w[o[0]], w[o[1]], w[o[2]], w[o[3]]
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = np.float32(0.0)
    for k in range(x.shape[1]):
        va, vb, vc, vd = xa[k], xb[k], xc[k], xd[k]
        v = _weight(w0[k])
        a0 += va * v; a1 += vb * v; a2 += vc * v; a3 += vd * v  # noqa: E702
        v = _weight(w1[k])
        b0 += va * v; b1 += vb * v; b2 += vc * v; b3 += vd * v  # noqa: E702
        v = _weight(w2[k])
        c0 += va * v; c1 += vb * v; c2 += vc * v; c3 += vd * v  # noqa: E702
        v = _weight(w3[k])
        d0 += va * v; d1 += vb * v; d2 += vc * v; d3 += vd * v  # noqa: E702
    for r, (s0, s1, s2, s3) in enumerate(((a0, a1, a2, a3), (b0, b1, b2, b3),
                                          (c0, c1, c2, c3), (d0, d1, d2, d3))):
        out[g, o[r]] = s0
        out[g + 1, o[r]] = s1
        out[g + 2, o[r]] = s2
        out[g + 3, o[r]] = s3


@numba.njit(parallel=True, fastmath=FAST, cache=True)
def matmul_rows(x, w, out):
    """out[n, o] = sum_k x[n, k] * W[o, k]; x [N, K] float32 with N a multiple of 4,
    w [M, K] the stored bits (see `_weight`), out [N, M] float32."""
    n_out = w.shape[0]
    for quad in numba.prange((n_out + 3) // 4):
        # four weight rows; the last quad repeats its last row (written twice, same value)
        o = np.empty(4, dtype=np.int64)
        for r in range(4):
            o[r] = min(4 * quad + r, n_out - 1)
        for g in range(0, x.shape[0], BLOCK):
            _block(x, g, w, o, out)


def aligned_zeros(n_rows, n_columns):
    """A new float32 zero array [n_rows, n_columns] starting on a cache line."""
    size = n_rows * n_columns
    raw = np.zeros(size + ALIGN // 4, dtype=np.float32)
    skip = (-raw.ctypes.data % ALIGN) // 4
    return raw[skip:skip + size].reshape(n_rows, n_columns)


def padded_rows(x):
    """x [N, K] as a new float32 array of ceil(N / 4) * 4 rows (the extra ones zero), starting on a cache line."""
    padded = aligned_zeros(-(-x.shape[0] // BLOCK) * BLOCK, x.shape[1])
    padded[:x.shape[0]] = x
    return padded


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
    (see `_weight`), out [N, M] float32."""
    n_in, n_out = s.shape
    for block in numba.prange((n_out + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
        start = block * COLUMN_BLOCK
        width = min(n_out, start + COLUMN_BLOCK) - start
        values = np.empty(width, dtype=np.float32)
        acc = np.zeros((x.shape[0], width), dtype=np.float32)
        for k in range(n_in):
            bits = s[k, start:start + width]
            for o in range(width):
                values[o] = _weight(bits[o])
            _axpy_rows(x, k, values, acc)
        _store_block(acc, out, start)


def is_transposed_view(stored):
    """Is `stored` [M, K] the transpose of a row-major [K, M] array (its rows strided, its columns adjacent)?"""
    return stored.ndim == 2 and stored.shape[0] > 1 and stored.shape[1] > 1 and stored.strides[0] < stored.strides[1]


def matmul_stored(x, stored, dtype):
    """x [N, K] float32 (C-contiguous) times stored.T, `stored` the raw [M, K] array of `dtype`.

    `stored` may be a transposed view of a row-major [K, M] array (a weight kept [in, out],
    see checkpoint/transposed.py): then the column-block kernels above read it row by row.
    A GGUF block type (BLOCK_TYPES) has `stored` [M, row_bytes] uint8: gguf_kernels.py multiplies it.
    """
    if dtype in BLOCK_TYPES:
        from swtool import gguf_kernels  # imports this module: loaded on first use

        return gguf_kernels.matmul_blocks(x, stored, dtype)
    if is_transposed_view(stored):
        out = np.empty((x.shape[0], stored.shape[0]), dtype=np.float32)
        # S = stored.T [K, M], rows contiguous
        matmul_columns(np.ascontiguousarray(x, dtype=np.float32), stored_bits(stored.T, dtype), out)
        return out
    if dtype == "BF16" and stored.strides[1] == 2 and _pairs_available():
        from swtool import bf16_pairs  # imports this module: loaded on first use

        return bf16_pairs.matmul(x, stored_bits(stored, dtype))
    padded = padded_rows(x)
    out = np.empty((padded.shape[0], stored.shape[0]), dtype=np.float32)
    matmul_rows(padded, stored_bits(stored, dtype), out)
    return out[:x.shape[0]]


@functools.cache
def _pairs_available():
    """Does bf16_pairs' AVX-512 kernel run here (asked once per process)?"""
    from swtool import bf16_pairs

    return bf16_pairs.available()


def stored_bits(stored, dtype):
    """The stored array viewed as the dtype `_weight` decodes by: uint16 for bf16, int16 for half, float32."""
    return stored.view({"BF16": np.uint16, "F16": np.int16, "F32": np.float32}[dtype])


# --- whole-tensor statistics from the stored bits (detect.py's outlier test and ranks) ----

@numba.njit(parallel=True, fastmath=FAST, cache=True)
def _sum_of_squares(w):
    total = 0.0
    for o in numba.prange(w.shape[0]):
        row = w[o]
        acc = 0.0  # float64: a sum over hundreds of millions of squares
        for k in range(w.shape[1]):
            value = np.float64(_weight(row[k]))
            acc += value * value
        total += acc
    return total


@numba.njit(parallel=True, cache=True)
def _count_larger(w, magnitude):
    count = 0
    for o in numba.prange(w.shape[0]):
        row = w[o]
        mine = 0
        for k in range(w.shape[1]):
            mine += abs(_weight(row[k])) > magnitude
        count += mine
    return count


def sum_of_squares(stored, dtype):
    """Sum of the squared weights of a 2-D stored array, in float64, read once from its bits."""
    return float(_sum_of_squares(stored_bits(stored, dtype)))


def count_larger(stored, dtype, magnitude):
    """How many weights of a 2-D stored array have |w| > magnitude (compared in float32)."""
    return int(_count_larger(stored_bits(stored, dtype), np.float32(magnitude)))

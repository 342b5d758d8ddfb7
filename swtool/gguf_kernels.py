"""Numba kernels: y = x @ W.T reading W in its GGUF block format, for the few tokens of a scan.

A GGUF weight is a run of blocks per row (swtool/quant/simple.py and kquants.py
give the layouts): Q8_0 ... Q5_1 hold 32 values behind one or two half scales,
the K-quants (Q2_K ... Q6_K) 256 values in sub-blocks with small integer scales.
The plain reader decodes the whole matrix to float32 and then calls BLAS, which
touches every weight three times (read the block, write f32, read f32) and, with
gguf-py's NumPy dequantizer, makes a dozen temporary arrays per tensor.

Here each worker owns four weight rows at a time. It decodes one segment of 256
columns of those rows into a small float32 tile (4 x 256 floats, 4 KB, which
stays in L1), and multiplies the tile into every input row with kernels.py's 4 x 4
register block, accumulating in float32. So each stored block is read once from
the memory map, decoded once, and the decoded floats serve all input rows before
they are dropped; the matrix never exists as float32.

The decoders give the same floats as ggml's `dequantize_row_*` (the same float32
operations in the same order as swtool.quant's dequantizers, and they are compiled
without fastmath, so no fused multiply-add changes a rounding); only the dot
products use kernels.FAST (reassociation and contraction), so results differ from
dequantize + a float64 matmul by float32 accumulation error alone
(tests/test_gguf_kernels.py).

Long inputs (eval's many tokens) go through swtool.quant.dequantize, Numba's
parallel decoder, and BLAS instead (checkpoint/gguf_file.py); kernels.fused_pays_off
chooses, by kernels.BLOCK_MAX_ROWS (measured by bench/gguf_scan.py).
"""

import numba
import numpy as np

from swtool import kernels
from swtool.kernels import BLOCK_TYPES

# a block type's index in kernels.BLOCK_TYPES is its `kind` in these kernels
KIND = {name: index for index, name in enumerate(BLOCK_TYPES)}
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = range(len(BLOCK_TYPES))
# (values, bytes) per block, as gguf.GGML_QUANT_SIZES has them (tests check the two agree)
BLOCK_SHAPES = ((32, 34), (32, 18), (32, 20), (32, 22), (32, 24),
                (256, 84), (256, 110), (256, 144), (256, 176), (256, 210))
SEGMENT = 256  # columns decoded at a time per weight row: a multiple of every block size


@numba.njit(cache=True, inline="always")
def _half(blk, at):
    """The little-endian IEEE half at blk[at:at + 2] as float32, converted by the CPU (exact, as ggml's)."""
    return kernels._weight(np.int16(np.int32(blk[at]) | (np.int32(blk[at + 1]) << 8)))


@numba.njit(cache=True)
def _scale_min_k4(blk, at, j):
    """ggml's get_scale_min_k4: the 6-bit (scale, min) of sub-block j of Q4_K / Q5_K (as swtool.quant.kquants)."""
    if j < 4:
        return np.int64(blk[at + j] & 63), np.int64(blk[at + j + 4] & 63)
    scale = (blk[at + j + 4] & 0xF) | ((blk[at + j - 4] >> 6) << 4)
    the_min = (blk[at + j + 4] >> 4) | ((blk[at + j] >> 6) << 4)
    return np.int64(scale), np.int64(the_min)


# --- one block -> float32, as ggml's dequantize_row_* (no fastmath: the roundings are ggml's) ----------

@numba.njit(cache=True)
def _q8_0(blk, y, n):
    """One Q8_0 block (34 bytes) into y[:32]: int8 code times the half scale d.

    n = 32 arrives as a run-time value (see decode_segment): with a constant trip count LLVM unrolls
    the loop and then cannot rule out that y overlaps blk, so it stays scalar; a loop of unknown
    length gets a run-time overlap check and vectorises (0.19 vs 1.13 ns a value, measured).
    """
    d = _half(blk, 0)
    for j in range(n):
        y[j] = np.float32(np.int8(blk[2 + j])) * d


@numba.njit(cache=True)
def _q4_0(blk, y):
    """Q4_0 (18 bytes): (code - 8) * d; element j in the low nibble of byte j, element j + 16 in the high one."""
    d = _half(blk, 0)
    for j in range(16):
        q = np.int32(blk[2 + j])
        y[j] = np.float32((q & 0xF) - 8) * d
        y[j + 16] = np.float32((q >> 4) - 8) * d


@numba.njit(cache=True)
def _q4_1(blk, y):
    """Q4_1 (20 bytes): code * d + m."""
    d, m = _half(blk, 0), _half(blk, 2)
    for j in range(16):
        q = blk[4 + j]
        y[j] = np.float32(q & 0xF) * d + m
        y[j + 16] = np.float32(q >> 4) * d + m


@numba.njit(cache=True)
def _high_bits(blk, at):
    """The 32-bit little-endian qh of a 5-bit block: bit j is bit 4 of element j."""
    return (np.int64(blk[at]) | (np.int64(blk[at + 1]) << 8) | (np.int64(blk[at + 2]) << 16)
            | (np.int64(blk[at + 3]) << 24))


@numba.njit(cache=True)
def _q5_0(blk, y):
    """Q5_0 (22 bytes): (5-bit code - 16) * d; qh after d, then the nibbles."""
    d, qh = _half(blk, 0), _high_bits(blk, 2)
    for j in range(16):
        q = np.int64(blk[6 + j])
        low = (q & 0xF) | (((qh >> j) << 4) & 0x10)
        high = (q >> 4) | ((qh >> (j + 12)) & 0x10)
        y[j] = np.float32(low - 16) * d
        y[j + 16] = np.float32(high - 16) * d


@numba.njit(cache=True)
def _q5_1(blk, y):
    """Q5_1 (24 bytes): 5-bit code * d + m."""
    d, m, qh = _half(blk, 0), _half(blk, 2), _high_bits(blk, 4)
    for j in range(16):
        q = np.int64(blk[8 + j])
        low = (q & 0xF) | (((qh >> j) << 4) & 0x10)
        high = (q >> 4) | ((qh >> (j + 12)) & 0x10)
        y[j] = np.float32(low) * d + m
        y[j + 16] = np.float32(high) * d + m


@numba.njit(cache=True)
def _q2_k(blk, y):
    """Q2_K (84 bytes): scales[16] (4-bit scale, 4-bit min), qs[64] 2-bit codes, d, dmin; 16 sub-blocks of 16."""
    d, dmin = _half(blk, 80), _half(blk, 82)
    for half in range(2):
        for shift in range(0, 8, 2):
            for k in range(2):  # two sub-blocks of 16 per shift: bytes 0-15 and 16-31 of this half's qs
                sub = half * 8 + shift + k
                sc = blk[sub]
                dl, ml = d * np.float32(sc & 0xF), dmin * np.float32(sc >> 4)
                codes, out = blk[16 + half * 32 + 16 * k:], y[16 * sub:16 * sub + 16]
                for l in range(16):
                    out[l] = dl * np.float32((codes[l] >> shift) & 3) - ml


@numba.njit(cache=True)
def _q3_k_scale(blk, j):
    """The signed 6-bit scale of sub-block j: low nibble in bytes 96..103, top 2 bits in 104..107."""
    low = np.int64(blk[96 + j] & 0xF) if j < 8 else np.int64(blk[96 + j - 8] >> 4)
    return (low | ((np.int64(blk[104 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32


@numba.njit(cache=True)
def _q3_k(blk, y):
    """Q3_K (110 bytes): hmask[32] (bit 3 of the code, inverted), qs[64] 2-bit codes, scales[12], d."""
    d = _half(blk, 108)
    for half in range(2):
        for step in range(4):  # which 2-bit field of qs, and which hmask bit
            mask = 1 << (half * 4 + step)
            for k in range(2):
                sub = half * 8 + step * 2 + k
                dl = d * np.float32(_q3_k_scale(blk, sub))
                codes, hmask, out = blk[32 + half * 32 + 16 * k:], blk[16 * k:], y[16 * sub:16 * sub + 16]
                for l in range(16):
                    q = np.int32((codes[l] >> (2 * step)) & 3)
                    out[l] = dl * np.float32(q - (0 if hmask[l] & mask else 4))


@numba.njit(cache=True)
def _q4_k(blk, y):
    """Q4_K (144 bytes): d, dmin, scales[12] (6-bit scale and min per 32), qs[128]: d*sc*q - dmin*m."""
    d, dmin = _half(blk, 0), _half(blk, 2)
    for group in range(4):
        scale, the_min = _scale_min_k4(blk, 4, 2 * group)
        d1, m1 = d * np.float32(scale), dmin * np.float32(the_min)
        scale, the_min = _scale_min_k4(blk, 4, 2 * group + 1)
        d2, m2 = d * np.float32(scale), dmin * np.float32(the_min)
        codes, out = blk[16 + 32 * group:], y[64 * group:64 * group + 64]
        for l in range(32):
            q = codes[l]
            out[l] = d1 * np.float32(q & 0xF) - m1
            out[32 + l] = d2 * np.float32(q >> 4) - m2


@numba.njit(cache=True)
def _q5_k(blk, y):
    """Q5_K (176 bytes): Q4_K's scales plus qh[32] holding bit 4 of each code."""
    d, dmin = _half(blk, 0), _half(blk, 2)
    for group in range(4):
        scale, the_min = _scale_min_k4(blk, 4, 2 * group)
        d1, m1 = d * np.float32(scale), dmin * np.float32(the_min)
        scale, the_min = _scale_min_k4(blk, 4, 2 * group + 1)
        d2, m2 = d * np.float32(scale), dmin * np.float32(the_min)
        codes, qh, out = blk[48 + 32 * group:], blk[16:48], y[64 * group:64 * group + 64]
        for l in range(32):
            q, high_bits = np.int32(codes[l]), np.int32(qh[l]) >> (2 * group)
            out[l] = d1 * np.float32((q & 0xF) | ((high_bits & 1) << 4)) - m1
            out[32 + l] = d2 * np.float32((q >> 4) | ((high_bits & 2) << 3)) - m2


@numba.njit(cache=True)
def _q6_k(blk, y):
    """Q6_K (210 bytes): ql[128] low nibbles, qh[64] top 2 bits, scales[16] int8, d: d*sc*(q - 32)."""
    d = _half(blk, 208)
    for half in range(2):
        ql, qh, out = blk[64 * half:], blk[128 + 32 * half:], y[128 * half:128 * half + 128]
        for l in range(32):
            sc = 192 + 8 * half + l // 16
            s1, s2 = d * np.float32(np.int8(blk[sc])), d * np.float32(np.int8(blk[sc + 2]))
            s3, s4 = d * np.float32(np.int8(blk[sc + 4])), d * np.float32(np.int8(blk[sc + 6]))
            low, high, bits = np.int32(ql[l]), np.int32(ql[l + 32]), np.int32(qh[l])
            out[l] = s1 * np.float32(((low & 0xF) | ((bits & 3) << 4)) - 32)
            out[l + 32] = s2 * np.float32(((high & 0xF) | (((bits >> 2) & 3) << 4)) - 32)
            out[l + 64] = s3 * np.float32(((low >> 4) | (((bits >> 4) & 3) << 4)) - 32)
            out[l + 96] = s4 * np.float32(((high >> 4) | (((bits >> 6) & 3) << 4)) - 32)


# one type's blocks over a segment: block size and bytes as constants, so the loop vectorises

@numba.njit(cache=True)
def _segment_q8_0(row, start, width, y, n):
    for i in range(width // 32):
        at = (start // 32 + i) * 34
        _q8_0(row[at:at + 34], y[32 * i:32 * i + 32], n)


@numba.njit(cache=True)
def _segment_q4_0(row, start, width, y):
    for i in range(width // 32):
        at = (start // 32 + i) * 18
        _q4_0(row[at:at + 18], y[32 * i:32 * i + 32])


@numba.njit(cache=True)
def _segment_q4_1(row, start, width, y):
    for i in range(width // 32):
        at = (start // 32 + i) * 20
        _q4_1(row[at:at + 20], y[32 * i:32 * i + 32])


@numba.njit(cache=True)
def _segment_q5_0(row, start, width, y):
    for i in range(width // 32):
        at = (start // 32 + i) * 22
        _q5_0(row[at:at + 22], y[32 * i:32 * i + 32])


@numba.njit(cache=True)
def _segment_q5_1(row, start, width, y):
    for i in range(width // 32):
        at = (start // 32 + i) * 24
        _q5_1(row[at:at + 24], y[32 * i:32 * i + 32])


@numba.njit(cache=True)
def _segment_q2_k(row, start, width, y):
    for i in range(width // 256):
        at = (start // 256 + i) * 84
        _q2_k(row[at:at + 84], y[256 * i:256 * i + 256])


@numba.njit(cache=True)
def _segment_q3_k(row, start, width, y):
    for i in range(width // 256):
        at = (start // 256 + i) * 110
        _q3_k(row[at:at + 110], y[256 * i:256 * i + 256])


@numba.njit(cache=True)
def _segment_q4_k(row, start, width, y):
    for i in range(width // 256):
        at = (start // 256 + i) * 144
        _q4_k(row[at:at + 144], y[256 * i:256 * i + 256])


@numba.njit(cache=True)
def _segment_q5_k(row, start, width, y):
    for i in range(width // 256):
        at = (start // 256 + i) * 176
        _q5_k(row[at:at + 176], y[256 * i:256 * i + 256])


@numba.njit(cache=True)
def _segment_q6_k(row, start, width, y):
    for i in range(width // 256):
        at = (start // 256 + i) * 210
        _q6_k(row[at:at + 210], y[256 * i:256 * i + 256])


@numba.njit(cache=True)
def decode_segment(kind, row, start, width, y, block_values):
    """Columns [start, start + width) of one stored row (its bytes) into y[:width]; both multiples of the block.

    One branch on the type per segment, then that type's loop over blocks (`_segment_*`).
    `block_values` is the type's block size passed at run time, for Q8_0's loop (see `_q8_0`).
    """
    if kind == Q8_0:
        _segment_q8_0(row, start, width, y, block_values)
    elif kind == Q4_0:
        _segment_q4_0(row, start, width, y)
    elif kind == Q4_1:
        _segment_q4_1(row, start, width, y)
    elif kind == Q5_0:
        _segment_q5_0(row, start, width, y)
    elif kind == Q5_1:
        _segment_q5_1(row, start, width, y)
    elif kind == Q2_K:
        _segment_q2_k(row, start, width, y)
    elif kind == Q3_K:
        _segment_q3_k(row, start, width, y)
    elif kind == Q4_K:
        _segment_q4_k(row, start, width, y)
    elif kind == Q5_K:
        _segment_q5_k(row, start, width, y)
    else:
        _segment_q6_k(row, start, width, y)


# --- the product ------------------------------------------------------------------------------------

@numba.njit(fastmath=kernels.FAST, cache=True, inline="always")
def _tile_block(x, g, start, width, tile, acc):
    """acc[g:g+4, r] += x[g:g+4, start:start+width] . tile[r, :width] for the 4 decoded rows r (float32)."""
    # slices, not x[g, start + k]: with the offset in the index the loop did not vectorise (14 vs 34-44 GMAC/s)
    xa, xb, xc, xd = x[g, start:start + width], x[g + 1, start:start + width], \
        x[g + 2, start:start + width], x[g + 3, start:start + width]
    w0, w1, w2, w3 = tile[0], tile[1], tile[2], tile[3]
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = np.float32(0.0)
    for k in range(width):
        va, vb, vc, vd = xa[k], xb[k], xc[k], xd[k]
        v = w0[k]
        a0 += va * v; a1 += vb * v; a2 += vc * v; a3 += vd * v  # noqa: E702
        v = w1[k]
        b0 += va * v; b1 += vb * v; b2 += vc * v; b3 += vd * v  # noqa: E702
        v = w2[k]
        c0 += va * v; c1 += vb * v; c2 += vc * v; c3 += vd * v  # noqa: E702
        v = w3[k]
        d0 += va * v; d1 += vb * v; d2 += vc * v; d3 += vd * v  # noqa: E702
    acc[g, 0] += a0; acc[g + 1, 0] += a1; acc[g + 2, 0] += a2; acc[g + 3, 0] += a3  # noqa: E702
    acc[g, 1] += b0; acc[g + 1, 1] += b1; acc[g + 2, 1] += b2; acc[g + 3, 1] += b3  # noqa: E702
    acc[g, 2] += c0; acc[g + 1, 2] += c1; acc[g + 2, 2] += c2; acc[g + 3, 2] += c3  # noqa: E702
    acc[g, 3] += d0; acc[g + 1, 3] += d1; acc[g + 2, 3] += d2; acc[g + 3, 3] += d3  # noqa: E702


@numba.njit(parallel=True, fastmath=kernels.FAST, cache=True)
def matmul_blocks_rows(x, w, kind, block_values, n_cols, out):
    """out[n, o] = sum_k x[n, k] * W[o, k]; x [N, n_cols] float32 with N a multiple of 4,
    w [M, row_bytes] uint8 the stored blocks of `kind`, out [N, M] float32."""
    n_out = w.shape[0]
    for quad in numba.prange((n_out + 3) // 4):
        # four weight rows; the last quad repeats its last row (written twice, same value)
        o = np.empty(4, dtype=np.int64)
        for r in range(4):
            o[r] = min(4 * quad + r, n_out - 1)
        tile = np.empty((4, SEGMENT), dtype=np.float32)
        acc = np.zeros((x.shape[0], 4), dtype=np.float32)
        for start in range(0, n_cols, SEGMENT):
            # 1. decode these 256 columns of the four rows (each stored byte read once)
            width = min(SEGMENT, n_cols - start)
            for r in range(4):
                decode_segment(kind, w[o[r]], start, width, tile[r], block_values)
            # 2. multiply them into every input row, four at a time
            for g in range(0, x.shape[0], kernels.BLOCK):
                _tile_block(x, g, start, width, tile, acc)
        for n in range(x.shape[0]):
            for r in range(4):
                out[n, o[r]] = acc[n, r]


def matmul_blocks(x, stored, dtype):
    """x [N, K] float32 times W.T, W [M, K] stored as `stored` [M, row_bytes] uint8 blocks of ggml type `dtype`."""
    kind = KIND[dtype]
    values, nbytes = BLOCK_SHAPES[kind]
    n_cols = x.shape[1]
    if stored.ndim != 2 or stored.shape[1] * values != n_cols * nbytes:
        raise ValueError(f"{dtype} rows of {stored.shape[-1]} bytes do not hold {n_cols} columns")
    padded = kernels.padded_rows(x)
    out = np.empty((padded.shape[0], stored.shape[0]), dtype=np.float32)
    matmul_blocks_rows(padded, np.ascontiguousarray(stored), kind, values, n_cols, out)
    return out[:x.shape[0]]


# --- decoding whole rows (tests; the long-sequence path uses swtool.quant.dequantize) ----------------

@numba.njit(parallel=True, cache=True)
def _decode_rows(w, kind, block_values, out):
    for r in numba.prange(w.shape[0]):
        decode_segment(kind, w[r], 0, out.shape[1], out[r], block_values)


def decode_rows(stored, dtype, n_cols):
    """Every row of `stored` [M, row_bytes] decoded by this module's block decoders: float32 [M, n_cols]."""
    out = np.empty((stored.shape[0], n_cols), dtype=np.float32)
    _decode_rows(np.ascontiguousarray(stored), KIND[dtype], BLOCK_SHAPES[KIND[dtype]][0], out)
    return out

"""GGUF blocks -> float32, as ggml's dequantize_row_*: one decoder per block type.

The same decoders serve whole rows (`dequantize_rows`, behind swtool.quant.dequantize)
and segments of rows inside the fused product of swtool/kernels/gguf_blocks.py
(`decode_segment`), so there is one implementation of each layout to keep right.
They are compiled without fastmath: the float32 operations and their order are
ggml's, and tests/test_quant.py holds them to libggml's floats, tests/test_gguf_kernels.py
to gguf-py's.
"""

import numba
import numpy as np

from swtool.block_types import KIND, block_shape
from swtool.quant.bits import JIT, get_fp16
from swtool.quant.iquants import KVALUES
from swtool.quant.kquants import q3_k_scale, scale_min_k4

# Each type's kind (the branch decode_segment takes) and block shape as module-level ints, which
# Numba freezes into compile-time constants: each `segment_*` loop below vectorises with them.
Q8_0, (Q8_0_VALUES, Q8_0_BYTES) = KIND["Q8_0"], block_shape("Q8_0")
Q4_0, (Q4_0_VALUES, Q4_0_BYTES) = KIND["Q4_0"], block_shape("Q4_0")
Q4_1, (Q4_1_VALUES, Q4_1_BYTES) = KIND["Q4_1"], block_shape("Q4_1")
Q5_0, (Q5_0_VALUES, Q5_0_BYTES) = KIND["Q5_0"], block_shape("Q5_0")
Q5_1, (Q5_1_VALUES, Q5_1_BYTES) = KIND["Q5_1"], block_shape("Q5_1")
Q2_K, (Q2_K_VALUES, Q2_K_BYTES) = KIND["Q2_K"], block_shape("Q2_K")
Q3_K, (Q3_K_VALUES, Q3_K_BYTES) = KIND["Q3_K"], block_shape("Q3_K")
Q4_K, (Q4_K_VALUES, Q4_K_BYTES) = KIND["Q4_K"], block_shape("Q4_K")
Q5_K, (Q5_K_VALUES, Q5_K_BYTES) = KIND["Q5_K"], block_shape("Q5_K")
Q6_K, (Q6_K_VALUES, Q6_K_BYTES) = KIND["Q6_K"], block_shape("Q6_K")
IQ4_NL, (IQ4_NL_VALUES, IQ4_NL_BYTES) = KIND["IQ4_NL"], block_shape("IQ4_NL")
IQ4_XS, (IQ4_XS_VALUES, IQ4_XS_BYTES) = KIND["IQ4_XS"], block_shape("IQ4_XS")


# --- one block -> float32, as ggml's dequantize_row_* (no fastmath: the roundings are ggml's) ----------

@numba.njit(**JIT)
def _q8_0(blk, y, n):
    """One Q8_0 block (34 bytes) into y[:32]: int8 code times the half scale d.

    n = 32 arrives as a run-time value (see decode_segment): with a constant trip count LLVM unrolls
    the loop and then cannot rule out that y overlaps blk, so it stays scalar; a loop of unknown
    length gets a run-time overlap check and vectorises (docs/kernel-measurements.md).
    """
    d = get_fp16(blk, 0)
    for j in range(n):
        y[j] = np.float32(np.int8(blk[2 + j])) * d


@numba.njit(**JIT)
def _q4_0(blk, y):
    """Q4_0 (18 bytes): (code - 8) * d; element j in the low nibble of byte j, element j + 16 in the high one."""
    d = get_fp16(blk, 0)
    for j in range(16):
        q = np.int32(blk[2 + j])
        y[j] = np.float32((q & 0xF) - 8) * d
        y[j + 16] = np.float32((q >> 4) - 8) * d


@numba.njit(**JIT)
def _q4_1(blk, y):
    """Q4_1 (20 bytes): code * d + m."""
    d, m = get_fp16(blk, 0), get_fp16(blk, 2)
    for j in range(16):
        q = blk[4 + j]
        y[j] = np.float32(q & 0xF) * d + m
        y[j + 16] = np.float32(q >> 4) * d + m


@numba.njit(**JIT)
def _high_bits(blk, at):
    """The 32-bit little-endian qh of a 5-bit block: bit j is bit 4 of element j."""
    return (np.int64(blk[at]) | (np.int64(blk[at + 1]) << 8) | (np.int64(blk[at + 2]) << 16)
            | (np.int64(blk[at + 3]) << 24))


@numba.njit(**JIT)
def _q5_0(blk, y):
    """Q5_0 (22 bytes): (5-bit code - 16) * d; qh after d, then the nibbles."""
    d, qh = get_fp16(blk, 0), _high_bits(blk, 2)
    for j in range(16):
        q = np.int64(blk[6 + j])
        low = (q & 0xF) | (((qh >> j) << 4) & 0x10)
        high = (q >> 4) | ((qh >> (j + 12)) & 0x10)
        y[j] = np.float32(low - 16) * d
        y[j + 16] = np.float32(high - 16) * d


@numba.njit(**JIT)
def _q5_1(blk, y):
    """Q5_1 (24 bytes): 5-bit code * d + m."""
    d, m, qh = get_fp16(blk, 0), get_fp16(blk, 2), _high_bits(blk, 4)
    for j in range(16):
        q = np.int64(blk[8 + j])
        low = (q & 0xF) | (((qh >> j) << 4) & 0x10)
        high = (q >> 4) | ((qh >> (j + 12)) & 0x10)
        y[j] = np.float32(low) * d + m
        y[j + 16] = np.float32(high) * d + m


@numba.njit(**JIT)
def _q2_k(blk, y):
    """Q2_K (84 bytes): scales[16] (4-bit scale, 4-bit min), qs[64] 2-bit codes, d, dmin; 16 sub-blocks of 16."""
    d, dmin = get_fp16(blk, 80), get_fp16(blk, 82)
    for half in range(2):
        for shift in range(0, 8, 2):
            for k in range(2):  # two sub-blocks of 16 per shift: bytes 0-15 and 16-31 of this half's qs
                sub = half * 8 + shift + k
                sc = blk[sub]
                dl, ml = d * np.float32(sc & 0xF), dmin * np.float32(sc >> 4)
                codes, out = blk[16 + half * 32 + 16 * k:], y[16 * sub:16 * sub + 16]
                for l in range(16):
                    out[l] = dl * np.float32((codes[l] >> shift) & 3) - ml


@numba.njit(**JIT)
def _q3_k(blk, y):
    """Q3_K (110 bytes): hmask[32] (bit 3 of the code, inverted), qs[64] 2-bit codes, scales[12], d."""
    d = get_fp16(blk, 108)
    for half in range(2):
        for step in range(4):  # which 2-bit field of qs, and which hmask bit
            mask = 1 << (half * 4 + step)
            for k in range(2):
                sub = half * 8 + step * 2 + k
                dl = d * np.float32(q3_k_scale(blk, sub))
                codes, hmask, out = blk[32 + half * 32 + 16 * k:], blk[16 * k:], y[16 * sub:16 * sub + 16]
                for l in range(16):
                    q = np.int32((codes[l] >> (2 * step)) & 3)
                    out[l] = dl * np.float32(q - (0 if hmask[l] & mask else 4))


@numba.njit(**JIT)
def _q4_k(blk, y):
    """Q4_K (144 bytes): d, dmin, scales[12] (6-bit scale and min per 32), qs[128]: d*sc*q - dmin*m."""
    d, dmin = get_fp16(blk, 0), get_fp16(blk, 2)
    for group in range(4):
        scale, the_min = scale_min_k4(blk, 4, 2 * group)
        d1, m1 = d * np.float32(scale), dmin * np.float32(the_min)
        scale, the_min = scale_min_k4(blk, 4, 2 * group + 1)
        d2, m2 = d * np.float32(scale), dmin * np.float32(the_min)
        codes, out = blk[16 + 32 * group:], y[64 * group:64 * group + 64]
        for l in range(32):
            q = codes[l]
            out[l] = d1 * np.float32(q & 0xF) - m1
            out[32 + l] = d2 * np.float32(q >> 4) - m2


@numba.njit(**JIT)
def _q5_k(blk, y):
    """Q5_K (176 bytes): Q4_K's scales plus qh[32] holding bit 4 of each code."""
    d, dmin = get_fp16(blk, 0), get_fp16(blk, 2)
    for group in range(4):
        scale, the_min = scale_min_k4(blk, 4, 2 * group)
        d1, m1 = d * np.float32(scale), dmin * np.float32(the_min)
        scale, the_min = scale_min_k4(blk, 4, 2 * group + 1)
        d2, m2 = d * np.float32(scale), dmin * np.float32(the_min)
        codes, qh, out = blk[48 + 32 * group:], blk[16:48], y[64 * group:64 * group + 64]
        for l in range(32):
            q, high_bits = np.int32(codes[l]), np.int32(qh[l]) >> (2 * group)
            out[l] = d1 * np.float32((q & 0xF) | ((high_bits & 1) << 4)) - m1
            out[32 + l] = d2 * np.float32((q >> 4) | ((high_bits & 2) << 3)) - m2


@numba.njit(**JIT)
def _q6_k(blk, y):
    """Q6_K (210 bytes): ql[128] low nibbles, qh[64] top 2 bits, scales[16] int8, d: d*sc*(q - 32)."""
    d = get_fp16(blk, 208)
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


@numba.njit(**JIT)
def _iq4_32(qs, dl, y):
    """32 non-linear 4-bit codes (16 bytes, Q4_0's nibble order) times dl: dl * KVALUES[q]."""
    for j in range(16):
        q = qs[j]
        y[j] = dl * np.float32(KVALUES[q & 0xF])
        y[j + 16] = dl * np.float32(KVALUES[q >> 4])


@numba.njit(**JIT)
def _iq4_nl(blk, y):
    """IQ4_NL (18 bytes): d, then 32 codes of the 16 levels KVALUES."""
    _iq4_32(blk[2:], get_fp16(blk, 0), y)


@numba.njit(**JIT)
def _iq4_xs(blk, y):
    """IQ4_XS (136 bytes): d, scales_h (u16), scales_l[4], qs[128]; block ib of 32 has scale d * (ls - 32),
    ls's low 4 bits a nibble of scales_l[ib / 2], its top 2 bits bits 2ib..2ib+1 of scales_h."""
    d = get_fp16(blk, 0)
    scales_h = np.int32(blk[2]) | (np.int32(blk[3]) << 8)
    for ib in range(8):
        ls = ((np.int32(blk[4 + ib // 2]) >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4)
        _iq4_32(blk[8 + 16 * ib:], d * np.float32(ls - 32), y[32 * ib:32 * ib + 32])


# one type's blocks over a segment: block size and bytes as constants, so the loop vectorises

@numba.njit(**JIT)
def segment_q8_0(row, start, width, y, n):
    for i in range(width // Q8_0_VALUES):
        at = (start // Q8_0_VALUES + i) * Q8_0_BYTES
        _q8_0(row[at:at + Q8_0_BYTES], y[Q8_0_VALUES * i:Q8_0_VALUES * i + Q8_0_VALUES], n)


@numba.njit(**JIT)
def segment_q4_0(row, start, width, y):
    for i in range(width // Q4_0_VALUES):
        at = (start // Q4_0_VALUES + i) * Q4_0_BYTES
        _q4_0(row[at:at + Q4_0_BYTES], y[Q4_0_VALUES * i:Q4_0_VALUES * i + Q4_0_VALUES])


@numba.njit(**JIT)
def segment_q4_1(row, start, width, y):
    for i in range(width // Q4_1_VALUES):
        at = (start // Q4_1_VALUES + i) * Q4_1_BYTES
        _q4_1(row[at:at + Q4_1_BYTES], y[Q4_1_VALUES * i:Q4_1_VALUES * i + Q4_1_VALUES])


@numba.njit(**JIT)
def segment_q5_0(row, start, width, y):
    for i in range(width // Q5_0_VALUES):
        at = (start // Q5_0_VALUES + i) * Q5_0_BYTES
        _q5_0(row[at:at + Q5_0_BYTES], y[Q5_0_VALUES * i:Q5_0_VALUES * i + Q5_0_VALUES])


@numba.njit(**JIT)
def segment_q5_1(row, start, width, y):
    for i in range(width // Q5_1_VALUES):
        at = (start // Q5_1_VALUES + i) * Q5_1_BYTES
        _q5_1(row[at:at + Q5_1_BYTES], y[Q5_1_VALUES * i:Q5_1_VALUES * i + Q5_1_VALUES])


@numba.njit(**JIT)
def segment_q2_k(row, start, width, y):
    for i in range(width // Q2_K_VALUES):
        at = (start // Q2_K_VALUES + i) * Q2_K_BYTES
        _q2_k(row[at:at + Q2_K_BYTES], y[Q2_K_VALUES * i:Q2_K_VALUES * i + Q2_K_VALUES])


@numba.njit(**JIT)
def segment_q3_k(row, start, width, y):
    for i in range(width // Q3_K_VALUES):
        at = (start // Q3_K_VALUES + i) * Q3_K_BYTES
        _q3_k(row[at:at + Q3_K_BYTES], y[Q3_K_VALUES * i:Q3_K_VALUES * i + Q3_K_VALUES])


@numba.njit(**JIT)
def segment_q4_k(row, start, width, y):
    for i in range(width // Q4_K_VALUES):
        at = (start // Q4_K_VALUES + i) * Q4_K_BYTES
        _q4_k(row[at:at + Q4_K_BYTES], y[Q4_K_VALUES * i:Q4_K_VALUES * i + Q4_K_VALUES])


@numba.njit(**JIT)
def segment_q5_k(row, start, width, y):
    for i in range(width // Q5_K_VALUES):
        at = (start // Q5_K_VALUES + i) * Q5_K_BYTES
        _q5_k(row[at:at + Q5_K_BYTES], y[Q5_K_VALUES * i:Q5_K_VALUES * i + Q5_K_VALUES])


@numba.njit(**JIT)
def segment_q6_k(row, start, width, y):
    for i in range(width // Q6_K_VALUES):
        at = (start // Q6_K_VALUES + i) * Q6_K_BYTES
        _q6_k(row[at:at + Q6_K_BYTES], y[Q6_K_VALUES * i:Q6_K_VALUES * i + Q6_K_VALUES])


@numba.njit(**JIT)
def segment_iq4_nl(row, start, width, y):
    for i in range(width // IQ4_NL_VALUES):
        at = (start // IQ4_NL_VALUES + i) * IQ4_NL_BYTES
        _iq4_nl(row[at:at + IQ4_NL_BYTES], y[IQ4_NL_VALUES * i:IQ4_NL_VALUES * i + IQ4_NL_VALUES])


@numba.njit(**JIT)
def segment_iq4_xs(row, start, width, y):
    for i in range(width // IQ4_XS_VALUES):
        at = (start // IQ4_XS_VALUES + i) * IQ4_XS_BYTES
        _iq4_xs(row[at:at + IQ4_XS_BYTES], y[IQ4_XS_VALUES * i:IQ4_XS_VALUES * i + IQ4_XS_VALUES])


@numba.njit(**JIT)
def decode_segment(kind, row, start, width, y, block_values):
    """Columns [start, start + width) of one stored row (its bytes) into y[:width]; both multiples of the block.

    One branch on the type per segment, then that type's loop over blocks (`segment_*`).
    `block_values` is the type's block size passed at run time, for Q8_0's loop (see `_q8_0`).
    """
    if kind == Q8_0:
        segment_q8_0(row, start, width, y, block_values)
    elif kind == Q4_0:
        segment_q4_0(row, start, width, y)
    elif kind == Q4_1:
        segment_q4_1(row, start, width, y)
    elif kind == Q5_0:
        segment_q5_0(row, start, width, y)
    elif kind == Q5_1:
        segment_q5_1(row, start, width, y)
    elif kind == Q2_K:
        segment_q2_k(row, start, width, y)
    elif kind == Q3_K:
        segment_q3_k(row, start, width, y)
    elif kind == Q4_K:
        segment_q4_k(row, start, width, y)
    elif kind == Q5_K:
        segment_q5_k(row, start, width, y)
    elif kind == Q6_K:
        segment_q6_k(row, start, width, y)
    elif kind == IQ4_NL:
        segment_iq4_nl(row, start, width, y)
    else:
        segment_iq4_xs(row, start, width, y)


@numba.njit(parallel=True, **JIT)
def dequantize_rows(data, kind, block_values, out):
    """Every row of `data` [M, row_bytes] (blocks of `kind`) into out [M, cols], rows in parallel."""
    for r in numba.prange(data.shape[0]):
        decode_segment(kind, data[r], 0, out.shape[1], out[r], block_values)

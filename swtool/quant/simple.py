"""The 32-element block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Each block stores one half-precision scale d (and for the _1 types a half
minimum m) followed by the packed integers. Ports of ggml's
`quantize_row_q*_ref` (ggml/src/ggml-quants.c) and `dequantize_row_q*`:

  type   bytes  layout                       value
  Q8_0   34     d, qs[32] int8               q * d,          q = roundf(x / d), d = amax / 127
  Q4_0   18     d, qs[16]                    (q - 8) * d,    d = max / -8  (max: the signed value of largest |x|)
  Q4_1   20     d, m, qs[16]                 q * d + m,      d = (max - min) / 15, m = min
  Q5_0   22     d, qh[4], qs[16]             (q - 16) * d,   d = max / -16
  Q5_1   24     d, m, qh[4], qs[16]          q * d + m,      d = (max - min) / 31

4-bit codes: element j in the low nibble of qs[j], element j + 16 in the high
nibble. The 5-bit types keep bit 4 of element j in bit j of the 32-bit qh.

With importance weights (ggml's `quantize_row_q*_impl`, what ggml_quantize_chunk
runs when given an imatrix) each block's scale is searched instead, weighting value j
by w[j] = importance[j] * sqrt(sigma2 + x[j]**2), sigma2 the row's mean square:
make_qx_quants for Q4_0/Q5_0 (codes against the float scale, which is then
stored as a half), make_qkx3_quants for Q4_1/Q5_1 (scale and min). Q8_0 ignores them.

`quantize_*(values, importance, out, bad)` fill out[rows, row_bytes] from
values[rows, cols] in parallel over rows and set bad[row] for rows holding NaN/Inf
(left unwritten); `importance` is float32 [cols], or empty for none.
"""

import numba
import numpy as np

from swtool.block_types import block_shape
from swtool.quant.bits import JIT, has_nonfinite, put_fp16, roundf_int, to_int8, trunc_int
from swtool.quant.search import make_qkx3_quants, make_qx_quants, new_lanes

QK = 32
# bytes per block, as module-level ints: compile-time constants for Numba
Q8_0_BYTES, Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES = (
    block_shape(name)[1] for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"))


# ---------------------------------------------------------------------------
# block statistics

@numba.njit(**JIT)
def _larger(a, b):
    return b if b > a else a


@numba.njit(**JIT)
def _smaller(a, b):
    return b if b < a else a


# Four running maxima instead of ggml's one break the chain of dependent compares
# (4x shorter); the result is the same value. Which element holds it matters
# only for its sign, handled where it does.

@numba.njit(**JIT)
def _absmax(x):
    """max |x| of the block (ggml: amax = MAX(amax, fabsf(v)) from 0)."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for j in range(0, QK, 4):
        a0 = _larger(a0, abs(x[j]))
        a1 = _larger(a1, abs(x[j + 1]))
        a2 = _larger(a2, abs(x[j + 2]))
        a3 = _larger(a3, abs(x[j + 3]))
    return _larger(_larger(a0, a1), _larger(a2, a3))


@numba.njit(**JIT)
def _signed_absmax(x):
    """The value of largest |x|, the first one on ties; +0.0 for an all-zero block.

    ggml: `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` from max = +0.0,
    so the first element reaching amax wins, with its sign.
    """
    amax = _absmax(x)
    if amax == 0:
        return np.float32(0.0)  # stays +0.0 even for -0.0 inputs
    for j in range(QK):
        if abs(x[j]) == amax:
            return x[j]
    return amax


@numba.njit(**JIT)
def _first_zero(x, zero):
    """The first element equal to 0 (it may be -0.0): ggml's strict compares keep the first of equals."""
    for j in range(QK):
        if x[j] == 0:
            return x[j]
    return zero


@numba.njit(**JIT)
def _min_max(x):
    """min and max as ggml's Q4_1/Q5_1 loops find them (from FLT_MAX / -FLT_MAX, strict compares)."""
    big = np.float32(np.finfo(np.float32).max)
    l0 = l1 = l2 = l3 = big
    h0 = h1 = h2 = h3 = -big
    for j in range(0, QK, 4):
        l0, h0 = _smaller(l0, x[j]), _larger(h0, x[j])
        l1, h1 = _smaller(l1, x[j + 1]), _larger(h1, x[j + 1])
        l2, h2 = _smaller(l2, x[j + 2]), _larger(h2, x[j + 2])
        l3, h3 = _smaller(l3, x[j + 3]), _larger(h3, x[j + 3])
    lo = _smaller(_smaller(l0, l1), _smaller(l2, l3))
    hi = _larger(_larger(h0, h1), _larger(h2, h3))
    if lo == 0:
        lo = _first_zero(x, lo)
    if hi == 0:
        hi = _first_zero(x, hi)
    return lo, hi


@numba.njit(**JIT)
def _inverse(d):
    return np.float32(1.0) / d if d != 0 else np.float32(0.0)


@numba.njit(**JIT)
def _ordinary(d, inv):
    """d and 1/d finite: then every x/d of the block is a small number (|x/d| <= 2**5 or so).

    Otherwise (d a denormal whose inverse is inf, or a range overflowing to inf)
    ggml's float->int conversions see inf or NaN, which trunc_int reproduces.
    """
    return abs(d) < np.float32(np.inf) and abs(inv) < np.float32(np.inf)


@numba.njit(**JIT)
def _to_int(value, ordinary):
    """C's (int)value; plain truncation when the caller knows the value is in range (it vectorises)."""
    if ordinary:
        return np.int64(np.int32(value))
    return trunc_int(value)


@numba.njit(**JIT)
def _round_to_int(value, ordinary):
    """C's (int)roundf(value), half away from zero."""
    if ordinary:
        whole = np.int32(value)
        rest = value - np.float32(whole)
        return np.int64(whole) + (rest >= np.float32(0.5)) - (rest <= np.float32(-0.5))
    return roundf_int(value)


# ---------------------------------------------------------------------------
# one block each

@numba.njit(**JIT)
def block_q4_0(x, out):
    d = _signed_absmax(x) / np.float32(-8.0)
    inv = _inverse(d)
    ordinary = _ordinary(d, inv)
    put_fp16(out, 0, d)
    for j in range(QK // 2):
        low = min(15, to_int8(_to_int(x[j] * inv + np.float32(8.5), ordinary)))
        high = min(15, to_int8(_to_int(x[j + 16] * inv + np.float32(8.5), ordinary)))
        out[2 + j] = (low & 0xFF) | ((high << 4) & 0xFF)


@numba.njit(**JIT)
def block_q4_1(x, out):
    lo, hi = _min_max(x)
    d = (hi - lo) / np.float32(15.0)
    inv = _inverse(d)
    ordinary = _ordinary(d, inv)
    put_fp16(out, 0, d)
    put_fp16(out, 2, lo)
    for j in range(QK // 2):
        low = min(15, to_int8(_to_int((x[j] - lo) * inv + np.float32(0.5), ordinary)))
        high = min(15, to_int8(_to_int((x[j + 16] - lo) * inv + np.float32(0.5), ordinary)))
        out[4 + j] = (low & 0xFF) | ((high << 4) & 0xFF)


@numba.njit(**JIT)
def _pack_5bit(codes, out, qh_at):
    """codes[32] (0..31) -> 4-bit nibbles after qh, bit 4 of code j into bit j of the 32-bit qh."""
    qh = 0
    for j in range(QK // 2):
        low, high = codes[j], codes[j + 16]
        out[qh_at + 4 + j] = (low & 0x0F) | ((high & 0x0F) << 4)
        qh |= ((low & 0x10) >> 4) << j
        qh |= ((high & 0x10) >> 4) << (j + 16)
    for k in range(4):
        out[qh_at + k] = (qh >> (8 * k)) & 0xFF


@numba.njit(**JIT)
def block_q5_0(x, out, codes):
    d = _signed_absmax(x) / np.float32(-16.0)
    inv = _inverse(d)
    ordinary = _ordinary(d, inv)
    put_fp16(out, 0, d)
    for j in range(QK):
        codes[j] = min(31, to_int8(_to_int(x[j] * inv + np.float32(16.5), ordinary))) & 0xFF
    _pack_5bit(codes, out, 2)


@numba.njit(**JIT)
def block_q5_1(x, out, codes):
    lo, hi = _min_max(x)
    d = (hi - lo) / np.float32(31.0)
    inv = _inverse(d)
    ordinary = _ordinary(d, inv)
    put_fp16(out, 0, d)
    put_fp16(out, 2, lo)
    for j in range(QK):
        codes[j] = _to_int((x[j] - lo) * inv + np.float32(0.5), ordinary) & 0xFF  # (uint8_t), no clamp in ggml
    _pack_5bit(codes, out, 4)


# ---------------------------------------------------------------------------
# one block each, under importance weights

@numba.njit(**JIT)
def mean_square(x):
    """sum(x**2) / len(x), summed in element order as ggml does."""
    total = np.float32(0.0)
    for j in range(x.shape[0]):
        total += x[j] * x[j]
    return total / np.float32(x.shape[0])


@numba.njit(**JIT)
def block_weights(x, importance, sigma2, weights):
    """ggml's weight[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j])."""
    for j in range(x.shape[0]):
        weights[j] = importance[j] * np.float32(np.sqrt(sigma2 + x[j] * x[j]))


@numba.njit(**JIT)
def _pack_4bit(codes, out, at):
    for j in range(QK // 2):
        out[at + j] = (codes[j] | (codes[j + 16] << 4)) & 0xFF


@numba.njit(**JIT)
def weighted_q4_0(x, weights, out, codes, lanes):
    put_fp16(out, 0, make_qx_quants(x, 8, codes, lanes, weights))
    _pack_4bit(codes, out, 2)


@numba.njit(**JIT)
def weighted_q5_0(x, weights, out, codes, lanes):
    put_fp16(out, 0, make_qx_quants(x, 16, codes, lanes, weights))
    _pack_5bit(codes, out, 2)


@numba.njit(**JIT)
def weighted_q4_1(x, weights, out, codes, lanes):
    d, the_min = make_qkx3_quants(x, weights, 15, codes, lanes)
    put_fp16(out, 0, d)
    put_fp16(out, 2, -the_min)
    _pack_4bit(codes, out, 4)


@numba.njit(**JIT)
def weighted_q5_1(x, weights, out, codes, lanes):
    d, the_min = make_qkx3_quants(x, weights, 31, codes, lanes)
    put_fp16(out, 0, d)
    put_fp16(out, 2, -the_min)
    _pack_5bit(codes, out, 4)


@numba.njit(**JIT)
def weighted_block(x, importance, sigma2, b, weights):
    """Block b of the row x, its weights (from the row's mean square sigma2) put into `weights`."""
    block_weights(x[b * QK:(b + 1) * QK], importance[b * QK:(b + 1) * QK], sigma2, weights)
    return x[b * QK:(b + 1) * QK]


# ---------------------------------------------------------------------------
# rows, in parallel

@numba.njit(inline="always", **JIT)
def _q8_0_codes(x, inv, out):
    """out[j] = roundf(x[j] * inv) for a block whose d and 1/d are finite; True if x holds a NaN.

    The NaN test rides along in this loop, so Q8_0 reads each row once instead of
    checking it first in a pass of its own (bench/quant.py; docs/kernel-measurements.md).
    """
    nan = False
    for j in range(QK):
        nan |= x[j] != x[j]
        value = x[j] * inv  # _round_to_int's ordinary case, written out so the loop vectorises
        whole = np.int32(value)
        rest = value - np.float32(whole)
        out[j] = (whole + np.int32(rest >= np.float32(0.5)) - np.int32(rest <= np.float32(-0.5))) & 0xFF
    return nan


@numba.njit(parallel=True, **JIT)
def quantize_q8_0(values, importance, out, bad):  # importance: ignored, as ggml does
    for r in numba.prange(values.shape[0]):
        x, y = values[r], out[r]
        row_bad = False  # NaN or Inf: an infinity shows in amax, a NaN in the codes loop
        for b in range(x.shape[0] // QK):
            block, at = x[b * QK:(b + 1) * QK], b * Q8_0_BYTES
            amax = _absmax(block)
            row_bad |= amax == np.float32(np.inf)
            d = amax / np.float32(127.0)
            inv = _inverse(d)
            put_fp16(y, at, d)
            if _ordinary(d, inv):
                row_bad |= _q8_0_codes(block, inv, y[at + 2:at + Q8_0_BYTES])
            else:
                for j in range(QK):
                    row_bad |= block[j] != block[j]
                    y[at + 2 + j] = roundf_int(block[j] * inv) & 0xFF
        bad[r] = row_bad


@numba.njit(parallel=True, **JIT)
def quantize_q4_0(values, importance, out, bad):
    for r in numba.prange(values.shape[0]):
        x, y = values[r], out[r]
        bad[r] = has_nonfinite(x)
        if bad[r]:
            continue
        if importance.shape[0]:
            sigma2, weights, L, lanes = mean_square(x), np.empty(QK, np.float32), np.empty(QK, np.int32), new_lanes()
            for b in range(x.shape[0] // QK):
                block = weighted_block(x, importance, sigma2, b, weights)
                weighted_q4_0(block, weights, y[b * Q4_0_BYTES:(b + 1) * Q4_0_BYTES], L, lanes)
        else:
            for b in range(x.shape[0] // QK):
                block_q4_0(x[b * QK:(b + 1) * QK], y[b * Q4_0_BYTES:(b + 1) * Q4_0_BYTES])


@numba.njit(parallel=True, **JIT)
def quantize_q4_1(values, importance, out, bad):
    for r in numba.prange(values.shape[0]):
        x, y = values[r], out[r]
        bad[r] = has_nonfinite(x)
        if bad[r]:
            continue
        if importance.shape[0]:
            sigma2, weights, L, lanes = mean_square(x), np.empty(QK, np.float32), np.empty(QK, np.int32), new_lanes()
            for b in range(x.shape[0] // QK):
                block = weighted_block(x, importance, sigma2, b, weights)
                weighted_q4_1(block, weights, y[b * Q4_1_BYTES:(b + 1) * Q4_1_BYTES], L, lanes)
        else:
            for b in range(x.shape[0] // QK):
                block_q4_1(x[b * QK:(b + 1) * QK], y[b * Q4_1_BYTES:(b + 1) * Q4_1_BYTES])


@numba.njit(parallel=True, **JIT)
def quantize_q5_0(values, importance, out, bad):
    for r in numba.prange(values.shape[0]):
        x, y = values[r], out[r]
        bad[r] = has_nonfinite(x)
        codes = np.empty(QK, dtype=np.int64)
        if bad[r]:
            continue
        if importance.shape[0]:
            sigma2, weights, L, lanes = mean_square(x), np.empty(QK, np.float32), np.empty(QK, np.int32), new_lanes()
            for b in range(x.shape[0] // QK):
                block = weighted_block(x, importance, sigma2, b, weights)
                weighted_q5_0(block, weights, y[b * Q5_0_BYTES:(b + 1) * Q5_0_BYTES], L, lanes)
        else:
            for b in range(x.shape[0] // QK):
                block_q5_0(x[b * QK:(b + 1) * QK], y[b * Q5_0_BYTES:(b + 1) * Q5_0_BYTES], codes)


@numba.njit(parallel=True, **JIT)
def quantize_q5_1(values, importance, out, bad):
    for r in numba.prange(values.shape[0]):
        x, y = values[r], out[r]
        bad[r] = has_nonfinite(x)
        codes = np.empty(QK, dtype=np.int64)
        if bad[r]:
            continue
        if importance.shape[0]:
            sigma2, weights, L, lanes = mean_square(x), np.empty(QK, np.float32), np.empty(QK, np.int32), new_lanes()
            for b in range(x.shape[0] // QK):
                block = weighted_block(x, importance, sigma2, b, weights)
                weighted_q5_1(block, weights, y[b * Q5_1_BYTES:(b + 1) * Q5_1_BYTES], L, lanes)
        else:
            for b in range(x.shape[0] // QK):
                block_q5_1(x[b * QK:(b + 1) * QK], y[b * Q5_1_BYTES:(b + 1) * Q5_1_BYTES], codes)

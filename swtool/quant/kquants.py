"""The K-quants: super-blocks of 256 values, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Ports of ggml's `quantize_row_q*_K_ref` and `dequantize_row_q*_K`
(ggml/src/ggml-quants.c); byte layouts from ggml-common.h:

  type  bytes  layout                                          sub-blocks          value
  Q2_K   84    scales[16], qs[64], d, dmin                     16 x 16, 2-bit      d*sc*q - dmin*m   (sc, m: 4 bits each)
  Q3_K  110    hmask[32], qs[64], scales[12], d                16 x 16, 3-bit      d*(sc-32)*(q-4)   (sc: 6 bits)
  Q4_K  144    d, dmin, scales[12], qs[128]                    8 x 32, 4-bit       d*sc*q - dmin*m   (sc, m: 6 bits)
  Q5_K  176    d, dmin, scales[12], qh[32], qs[128]            8 x 32, 5-bit       d*sc*q - dmin*m   (sc, m: 6 bits)
  Q6_K  210    ql[128], qh[64], scales[16] int8, d             16 x 16, 6-bit      d*sc*(q-32)       (sc: int8)

Every type works in three steps per super-block:
  1. a float scale (and min) per sub-block, from a search in search.py;
  2. those scales quantized to small integers against a half-precision d (and dmin);
  3. every value re-quantized against its sub-block's *stored* scale (d rounded
     to half times the integer scale), which is what a reader will multiply by.

With importance weights (ggml's `quantize_row_q*_K_impl`, what ggml_quantize_chunk
runs when given an imatrix) steps 1 and 2 change, step 3 does not:
  1. each value weighs importance[j] * sqrt(sigma2 + x[j]**2), sigma2 from the
     super-block's mean square (Q6_K: importance[j] alone), in make_qkx3_quants
     (Q2_K, Q4_K, Q5_K) or make_qx_quants (Q3_K, Q6_K);
  2. the sub-block scales are themselves searched against d, weighted by their
     sub-block's summed weights: make_qp_quants (Q2_K, Q4_K, Q5_K), make_qx_quants
     (Q3_K); Q6_K keeps its plain step 2.

The `quantize_*(values, importance, out, bad)` row drivers run in parallel over
rows; each row gets its own scratch arrays. `importance` is float32 [cols], or empty
for none. They set bad[row] for rows holding NaN/Inf (left unwritten).
"""

import numba
import numpy as np

from swtool.block_types import block_shape
from swtool.quant.bits import JIT, get_fp16, has_nonfinite, nearest_int, put_fp16, to_int8
from swtool.quant.search import (GROUP_MAX_EPS, make_q3_quants, make_qkx2_quants, make_qkx3_quants, make_qp_quants,
                                 make_qx_quants, new_lanes)

QK_K = 256
# bytes per super-block, as module-level ints: compile-time constants for Numba
Q2_K_BYTES, Q3_K_BYTES, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES = (
    block_shape(name)[1] for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))


@numba.njit(**JIT)
def _clamp(value, lo, hi):
    return max(lo, min(hi, value))


@numba.njit(**JIT)
def _pack_2bit(L, out, at):
    """Codes 0..3 -> qs: for each half of 128, byte l holds codes l, l+32, l+64, l+96 (2 bits each)."""
    for half in range(0, QK_K, 128):
        for l in range(32):
            out[at + half // 4 + l] = (L[half + l] | (L[half + l + 32] << 2)
                                       | (L[half + l + 64] << 4) | (L[half + l + 96] << 6)) & 0xFF


@numba.njit(**JIT)
def _super_block_weights(x, importance, sigma2, weights, sums):
    """Per value importance[j] * sqrt(sigma2 + x[j]**2) into weights, each sub-block's sum into sums."""
    size = x.shape[0] // sums.shape[0]
    for j in range(sums.shape[0]):
        total = np.float32(0.0)
        for l in range(size * j, size * j + size):
            weights[l] = importance[l] * np.float32(np.sqrt(sigma2 + x[l] * x[l]))
            total += weights[l]
        sums[j] = total


@numba.njit(**JIT)
def _sum_squares(x):
    total = np.float32(0.0)
    for j in range(x.shape[0]):
        total += x[j] * x[j]
    return total


# ---------------------------------------------------------------------------
# the 6-bit scale/min packing of Q4_K and Q5_K (12 bytes for 8 pairs)

@numba.njit(**JIT)
def _put_scale_min_k4(out, at, j, scale, the_min):
    """Pairs 0-3 take bytes j and j+4 whole; pairs 4-7 put their low nibbles in byte j+4
    and their top 2 bits in the spare top bits of bytes j-4 (scale) and j (min)."""
    if j < 4:
        out[at + j] = scale
        out[at + j + 4] = the_min
    else:
        out[at + j + 4] = (scale & 0xF) | ((the_min & 0xF) << 4)
        out[at + j - 4] |= ((scale >> 4) << 6) & 0xFF  # uint8_t |= : the bits above 8 fall away
        out[at + j] |= ((the_min >> 4) << 6) & 0xFF


@numba.njit(**JIT)
def scale_min_k4(data, at, j):
    """ggml get_scale_min_k4: the 6-bit (scale, min) of sub-block j."""
    if j < 4:
        return np.int64(data[at + j] & 63), np.int64(data[at + j + 4] & 63)
    scale = (data[at + j + 4] & 0xF) | ((data[at + j - 4] >> 6) << 4)
    the_min = (data[at + j + 4] >> 4) | ((data[at + j] >> 6) << 4)
    return np.int64(scale), np.int64(the_min)


# ---------------------------------------------------------------------------
# Q2_K

@numba.njit(**JIT)
def block_q2_k(x, out, L, lanes, weights, scales, mins):
    # 1. scale and min per 16, weighted by |x|, absolute error
    max_scale = np.float32(0.0)
    max_min = np.float32(0.0)
    for j in range(16):
        xs = x[16 * j:16 * j + 16]
        for l in range(16):
            weights[l] = abs(xs[l])
        scales[j], mins[j] = make_qkx2_quants(xs, weights[:16], 3, np.float32(-0.5), np.float32(0.1), 15, True,
                                              L[16 * j:16 * j + 16], lanes)
        if scales[j] > max_scale:  # ggml's strict compares: a -0.0 never replaces the +0.0 start
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    # 2. 4-bit scales (low nibbles) and mins (high nibbles) against d = max/15, dmin = max_min/15
    if max_scale > 0:
        iscale = np.float32(15.0) / max_scale
        for j in range(16):
            out[j] = nearest_int(iscale * scales[j]) & 0xFF
        d = put_fp16(out, 80, max_scale / np.float32(15.0))
    else:
        for j in range(16):
            out[j] = 0
        d = put_fp16(out, 80, np.float32(0.0))
    if max_min > 0:
        iscale = np.float32(15.0) / max_min
        for j in range(16):
            out[j] = (out[j] | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
        dmin = put_fp16(out, 82, max_min / np.float32(15.0))
    else:
        dmin = put_fp16(out, 82, np.float32(0.0))
    _codes_q2_k(x, out, d, dmin, L)


@numba.njit(**JIT)
def _codes_q2_k(x, out, d, dmin, L):
    """Step 3 of Q2_K: codes 0..3 against the stored scales and mins, packed into qs."""
    for j in range(16):
        dj = d * np.float32(out[j] & 0xF)
        if dj == 0:
            continue
        dm = dmin * np.float32(out[j] >> 4)
        for i in range(16):
            L[16 * j + i] = _clamp(nearest_int((x[16 * j + i] + dm) / dj), 0, 3)
    _pack_2bit(L, out, 16)


@numba.njit(**JIT)
def weighted_q2_k(x, qw, out, L, lanes, weights, scales, mins, sums, Ls, Lm):
    _super_block_weights(x, qw, _sum_squares(x) / np.float32(QK_K), weights, sums)
    for j in range(16):
        scales[j], mins[j] = make_qkx3_quants(x[16 * j:16 * j + 16], weights[16 * j:16 * j + 16], 3,
                                              L[16 * j:16 * j + 16], lanes)
    d = put_fp16(out, 80, make_qp_quants(scales, 15, Ls, sums))
    dmin = put_fp16(out, 82, make_qp_quants(mins, 15, Lm, sums))
    for j in range(16):
        out[j] = (Ls[j] | (Lm[j] << 4)) & 0xFF
    _codes_q2_k(x, out, d, dmin, L)


@numba.njit(parallel=True, **JIT)
def quantize_q2_k(values, importance, out, bad):
    for r in numba.prange(values.shape[0]):
        x, y = values[r], out[r]
        bad[r] = has_nonfinite(x)
        L, lanes, Ls, Lm = np.empty(QK_K, np.int32), new_lanes(), np.empty(16, np.int32), np.empty(16, np.int32)
        weights, scales, mins, sums = (np.empty(QK_K, np.float32), np.empty(16, np.float32),
                                       np.empty(16, np.float32), np.empty(16, np.float32))
        if bad[r]:
            continue
        for b in range(x.shape[0] // QK_K):
            xb, yb = x[b * QK_K:(b + 1) * QK_K], y[b * Q2_K_BYTES:(b + 1) * Q2_K_BYTES]
            if importance.shape[0]:
                weighted_q2_k(xb, importance[b * QK_K:(b + 1) * QK_K], yb, L, lanes, weights, scales, mins,
                              sums, Ls, Lm)
            else:
                block_q2_k(xb, yb, L, lanes, weights, scales, mins)


# ---------------------------------------------------------------------------
# Q3_K

@numba.njit(**JIT)
def q3_k_scale(out, j):
    """The signed 6-bit scale of sub-block j: low nibble in bytes 96..103, top 2 bits in 104..107."""
    low = np.int64(out[96 + j] & 0xF) if j < 8 else np.int64(out[96 + j - 8] >> 4)
    return (low | ((np.int64(out[104 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32


@numba.njit(**JIT)
def block_q3_k(x, out, L, scales):
    # 1. a signed scale per 16
    max_scale = np.float32(0.0)
    amax = np.float32(0.0)
    for j in range(16):
        scales[j] = make_q3_quants(x[16 * j:16 * j + 16], 4, L[16 * j:16 * j + 16])
        if abs(scales[j]) > amax:
            amax = abs(scales[j])
            max_scale = scales[j]
    # 2. 6-bit scales against d = max_scale / -32
    for k in range(12):
        out[96 + k] = 0
    if max_scale != 0:
        iscale = np.float32(-32.0) / max_scale
        for j in range(16):
            _put_q3_k_scale(out, j, _clamp(to_int8(nearest_int(iscale * scales[j])), -32, 31) + 32)
        put_fp16(out, 108, np.float32(1.0) / iscale)
    else:
        put_fp16(out, 108, np.float32(0.0))
    _codes_q3_k(x, out, L)


@numba.njit(**JIT)
def _put_q3_k_scale(out, j, l):
    """Scale code l (0..63) of sub-block j: low nibble into bytes 96..103, top 2 bits into 104..107."""
    if j < 8:
        out[96 + j] = l & 0xF
    else:
        out[96 + j - 8] |= (l & 0xF) << 4
    out[104 + j % 4] |= (l >> 4) << (2 * (j // 4))


@numba.njit(**JIT)
def _codes_q3_k(x, out, L):
    """Step 3 of Q3_K: codes against the stored scales, into hmask and qs."""
    d = get_fp16(out, 108)
    for j in range(16):
        dj = d * np.float32(q3_k_scale(out, j))
        if dj == 0:
            continue
        for i in range(16):
            L[16 * j + i] = _clamp(nearest_int(x[16 * j + i] / dj), -4, 3) + 4
    # high bit of code j -> bit j // 32 of hmask[j % 32]; low 2 bits -> qs
    for k in range(32):
        out[k] = 0
    for j in range(QK_K):
        if L[j] > 3:
            out[j % 32] |= 1 << (j // 32)
            L[j] -= 4
    _pack_2bit(L, out, 32)


@numba.njit(**JIT)
def weighted_q3_k(x, qw, out, L, lanes, weights, scales, sums, Ls):
    _super_block_weights(x, qw, np.float32(2.0) * _sum_squares(x) / np.float32(QK_K), weights, sums)
    for j in range(16):
        scales[j] = make_qx_quants(x[16 * j:16 * j + 16], 4, L[16 * j:16 * j + 16], lanes, weights[16 * j:16 * j + 16])
    for k in range(12):
        out[96 + k] = 0
    d_block = make_qx_quants(scales, 32, Ls, lanes, sums)
    for j in range(16):
        _put_q3_k_scale(out, j, Ls[j])
    put_fp16(out, 108, d_block)
    _codes_q3_k(x, out, L)


@numba.njit(parallel=True, **JIT)
def quantize_q3_k(values, importance, out, bad):
    for r in numba.prange(values.shape[0]):
        x, y = values[r], out[r]
        bad[r] = has_nonfinite(x)
        L, scales, lanes, Ls = np.empty(QK_K, np.int32), np.empty(16, np.float32), new_lanes(), np.empty(16, np.int32)
        weights, sums = np.empty(QK_K, np.float32), np.empty(16, np.float32)
        if bad[r]:
            continue
        for b in range(x.shape[0] // QK_K):
            xb, yb = x[b * QK_K:(b + 1) * QK_K], y[b * Q3_K_BYTES:(b + 1) * Q3_K_BYTES]
            if importance.shape[0]:
                weighted_q3_k(xb, importance[b * QK_K:(b + 1) * QK_K], yb, L, lanes, weights, scales, sums, Ls)
            else:
                block_q3_k(xb, yb, L, scales)


# ---------------------------------------------------------------------------
# Q4_K and Q5_K share step 1 and 2: (scale, min) per 32, weighted by rms + |x|

@numba.njit(**JIT)
def _scales_mins_k4(x, out, nmax, rmin, nstep, L, lanes, weights, scales, mins):
    """Steps 1-2 of Q4_K/Q5_K: per-32 scale/min searches, 6-bit packing at out[4:16];
    returns (d, dmin) as stored (half precision, read back)."""
    max_scale = np.float32(0.0)
    max_min = np.float32(0.0)
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        sum_x2 = np.float32(0.0)
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.float32(np.sqrt(sum_x2 / np.float32(32.0)))
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        scales[j], mins[j] = make_qkx2_quants(xs, weights[:32], nmax, rmin, np.float32(0.1), nstep, False,
                                              L[32 * j:32 * j + 32], lanes)
        if scales[j] > max_scale:  # ggml's strict compares: a -0.0 never replaces the +0.0 start
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = np.float32(63.0) / max_scale if max_scale > 0 else np.float32(0.0)
    inv_min = np.float32(63.0) / max_min if max_min > 0 else np.float32(0.0)
    for j in range(8):
        scale = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # ggml stores into uint8_t, then MIN(63, .)
        the_min = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        _put_scale_min_k4(out, 4, j, scale, the_min)
    d = put_fp16(out, 0, max_scale / np.float32(63.0))
    dmin = put_fp16(out, 2, max_min / np.float32(63.0))
    return d, dmin


@numba.njit(**JIT)
def _weighted_scales_mins_k4(x, qw, out, nmax, cap, L, lanes, weights, scales, mins, sums, Ls, Lm):
    """Steps 1-2 of Q4_K/Q5_K under importance weights; `cap` the MIN(63, .) Q5_K puts on its codes."""
    _super_block_weights(x, qw, np.float32(2.0) * _sum_squares(x) / np.float32(QK_K), weights, sums)
    for j in range(8):
        scales[j], mins[j] = make_qkx3_quants(x[32 * j:32 * j + 32], weights[32 * j:32 * j + 32], nmax,
                                              L[32 * j:32 * j + 32], lanes)
    d_block = make_qp_quants(scales, 63, Ls, sums)
    m_block = make_qp_quants(mins, 63, Lm, sums)
    for j in range(8):
        _put_scale_min_k4(out, 4, j, min(cap, Ls[j]), min(cap, Lm[j]))
    return put_fp16(out, 0, d_block), put_fp16(out, 2, m_block)


@numba.njit(**JIT)
def _codes_k4(x, out, d, dmin, nmax, L):
    """Step 3 of Q4_K/Q5_K: codes 0..nmax against each sub-block's stored scale and min."""
    for j in range(8):
        scale, the_min = scale_min_k4(out, 4, j)
        dj = d * np.float32(scale)
        if dj == 0:
            continue
        dm = dmin * np.float32(the_min)
        for i in range(32):
            L[32 * j + i] = _clamp(nearest_int((x[32 * j + i] + dm) / dj), 0, nmax)


@numba.njit(**JIT)
def block_q4_k(x, qw, out, L, lanes, weights, scales, mins, sums, Ls, Lm):
    """One Q4_K super-block; under importance weights if qw (its 256 importances) is not empty."""
    if qw.shape[0]:
        d, dmin = _weighted_scales_mins_k4(x, qw, out, 15, 255, L, lanes, weights, scales, mins, sums, Ls, Lm)
    else:
        d, dmin = _scales_mins_k4(x, out, 15, np.float32(-1.0), 20, L, lanes, weights, scales, mins)
    _codes_k4(x, out, d, dmin, 15, L)
    # byte l of each 32-byte group: code l (low nibble) and code l + 32 (high) of a 64-value stretch
    for group in range(4):
        for l in range(32):
            out[16 + 32 * group + l] = L[64 * group + l] | (L[64 * group + l + 32] << 4)


@numba.njit(**JIT)
def block_q5_k(x, qw, out, L, lanes, weights, scales, mins, sums, Ls, Lm):
    """One Q5_K super-block; under importance weights if qw (its 256 importances) is not empty."""
    if qw.shape[0]:
        d, dmin = _weighted_scales_mins_k4(x, qw, out, 31, 63, L, lanes, weights, scales, mins, sums, Ls, Lm)
    else:
        d, dmin = _scales_mins_k4(x, out, 31, np.float32(-0.5), 15, L, lanes, weights, scales, mins)
    _codes_k4(x, out, d, dmin, 31, L)
    # as Q4_K for the low 4 bits (at 48); bit 4 of code 64g + l -> bit 2g of qh[l], of 64g + 32 + l -> bit 2g + 1
    for l in range(32):
        out[16 + l] = 0
    for group in range(4):
        for l in range(32):
            low, high = L[64 * group + l], L[64 * group + l + 32]
            if low > 15:
                low -= 16
                out[16 + l] |= 1 << (2 * group)
            if high > 15:
                high -= 16
                out[16 + l] |= 2 << (2 * group)
            out[48 + 32 * group + l] = low | (high << 4)


@numba.njit(parallel=True, **JIT)
def quantize_q4_k(values, importance, out, bad):
    for r in numba.prange(values.shape[0]):
        x, y = values[r], out[r]
        bad[r] = has_nonfinite(x)
        L, lanes, Ls, Lm = np.empty(QK_K, np.int32), new_lanes(), np.empty(8, np.int32), np.empty(8, np.int32)
        weights, scales, mins, sums = (np.empty(QK_K, np.float32), np.empty(8, np.float32),
                                       np.empty(8, np.float32), np.empty(8, np.float32))
        if not bad[r]:
            for b in range(x.shape[0] // QK_K):
                block_q4_k(x[b * QK_K:(b + 1) * QK_K], importance[b * QK_K:(b + 1) * QK_K],
                           y[b * Q4_K_BYTES:(b + 1) * Q4_K_BYTES], L, lanes, weights, scales, mins, sums, Ls, Lm)


@numba.njit(parallel=True, **JIT)
def quantize_q5_k(values, importance, out, bad):
    for r in numba.prange(values.shape[0]):
        x, y = values[r], out[r]
        bad[r] = has_nonfinite(x)
        L, lanes, Ls, Lm = np.empty(QK_K, np.int32), new_lanes(), np.empty(8, np.int32), np.empty(8, np.int32)
        weights, scales, mins, sums = (np.empty(QK_K, np.float32), np.empty(8, np.float32),
                                       np.empty(8, np.float32), np.empty(8, np.float32))
        if not bad[r]:
            for b in range(x.shape[0] // QK_K):
                block_q5_k(x[b * QK_K:(b + 1) * QK_K], importance[b * QK_K:(b + 1) * QK_K],
                           y[b * Q5_K_BYTES:(b + 1) * Q5_K_BYTES], L, lanes, weights, scales, mins, sums, Ls, Lm)


# ---------------------------------------------------------------------------
# Q6_K

@numba.njit(**JIT)
def block_q6_k(x, qw, out, L, lanes, scales):
    # 1. a signed scale per 16 (codes -32..31, weights x**2, or the importances qw when not empty)
    max_scale = np.float32(0.0)
    max_abs_scale = np.float32(0.0)
    for j in range(16):
        scales[j] = make_qx_quants(x[16 * j:16 * j + 16], 32, L[16 * j:16 * j + 16], lanes, qw[16 * j:16 * j + 16])
        if abs(scales[j]) > max_abs_scale:
            max_abs_scale = abs(scales[j])
            max_scale = scales[j]
    if max_abs_scale < GROUP_MAX_EPS:  # an all-zero block is all-zero bytes
        for k in range(Q6_K_BYTES):
            out[k] = 0
        return
    # 2. int8 scales against d = max_scale / -128
    iscale = np.float32(-128.0) / max_scale
    d = put_fp16(out, 208, np.float32(1.0) / iscale)
    for j in range(16):
        out[192 + j] = to_int8(min(127, nearest_int(iscale * scales[j]))) & 0xFF
    # 3. codes against the stored scales
    for j in range(16):
        dj = d * np.float32(to_int8(np.int64(out[192 + j])))
        if dj == 0:
            continue
        for i in range(16):
            L[16 * j + i] = _clamp(nearest_int(x[16 * j + i] / dj), -32, 31) + 32
    # per 128 values: ql[l] = low nibbles of codes l and l+64, ql[l+32] of l+32 and l+96; qh[l] their top 2 bits
    for half in range(2):
        c, ql, qh = 128 * half, 64 * half, 128 + 32 * half
        for l in range(32):
            q1, q2, q3, q4 = L[c + l], L[c + l + 32], L[c + l + 64], L[c + l + 96]
            out[ql + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            out[ql + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
            out[qh + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


@numba.njit(parallel=True, **JIT)
def quantize_q6_k(values, importance, out, bad):
    for r in numba.prange(values.shape[0]):
        x, y = values[r], out[r]
        bad[r] = has_nonfinite(x)
        L, lanes, scales = np.empty(QK_K, np.int32), new_lanes(), np.empty(16, np.float32)
        if not bad[r]:
            for b in range(x.shape[0] // QK_K):
                block_q6_k(x[b * QK_K:(b + 1) * QK_K], importance[b * QK_K:(b + 1) * QK_K],
                           y[b * Q6_K_BYTES:(b + 1) * Q6_K_BYTES], L, lanes, scales)

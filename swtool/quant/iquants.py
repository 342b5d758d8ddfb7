"""The non-linear 4-bit types: IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256).

A 4-bit code does not stand for a step of an even grid but for one of 16 fixed
levels, KVALUES, denser near zero. Ports of ggml's `quantize_iq4_nl` and
`quantize_iq4_xs` (ggml/src/ggml-quants.c: both run quantize_row_iq4_nl_impl) and
`dequantize_row_iq4_*`; layouts from ggml-common.h:

  type    bytes  layout                                      value
  IQ4_NL   18    d, qs[16]                                   d * KVALUES[q]
  IQ4_XS  136    d, scales_h (u16), scales_l[4], qs[128]      d * (ls - 32) * KVALUES[q], ls 6 bits per 32

Codes are packed as Q4_0's: element j of a 32 in the low nibble of byte j, element
j + 16 in the high one.

Per block of 32 the scale is searched: start from d = max / 127 (the value of largest
|x| on the outermost level), fit d by weighted least squares to the codes that
gives, then try 15 more starts (-127 + k) / max, k = -7..7, and keep the fit with
the largest sum(w*q*x)**2 / sum(w*q*q). The weights are x**2, or with importance
importance[j] * sqrt(sigma2 + x[j]**2), sigma2 twice the (super-)block's mean square.
IQ4_NL stores that d and codes it; IQ4_XS stores each block's d as a 6-bit multiple
of a super-scale -max/32 and codes against the stored multiple.

These are what ggml_quantize_chunk writes, with or without an importance matrix;
ggml's quantize_row_iq4_nl_ref (no scale search) differs and is not ported.
Same driver conventions as kquants.py.
"""

import numba
import numpy as np

from swtool.block_types import block_shape
from swtool.quant.bits import JIT, has_nonfinite, nearest_int, put_fp16, put_u16
from swtool.quant.search import GROUP_MAX_EPS

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
QK = 32
QK_K = 256
NTRY = 7  # the scale search's starts on either side of -127 / max
IQ4_NL_BYTES, IQ4_XS_BYTES = block_shape("IQ4_NL")[1], block_shape("IQ4_XS")[1]


@numba.njit(**JIT)
def level(code):
    return np.float32(KVALUES[code])


@numba.njit(**JIT)
def nearest_code(x):
    """ggml best_index_int8(16, kvalues_iq4nl, x): the level nearest x; of two equally near, the upper."""
    if x <= level(0):
        return 0
    if x >= level(15):
        return 15
    lo, hi = 0, 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x < level(mid):
            hi = mid
        else:
            lo = mid
    return hi - 1 if x - level(hi - 1) < level(hi) - x else hi


@numba.njit(**JIT)
def _fit(x, weights, inv_scale):
    """sum(w*q*x) and sum(w*q*q) over the block, q the level nearest inv_scale * x, in element order."""
    sumqx = np.float32(0.0)
    sumq2 = np.float32(0.0)
    for j in range(x.shape[0]):
        q = level(nearest_code(inv_scale * x[j]))
        w = weights[j]
        sumqx += w * q * x[j]
        sumq2 += w * q * q
    return sumqx, sumq2


@numba.njit(**JIT)
def block_scale(x, weights):
    """The searched float scale of one block of 32 (0 for a block below GROUP_MAX_EPS)."""
    amax = np.float32(0.0)
    biggest = np.float32(0.0)
    for j in range(x.shape[0]):
        if abs(x[j]) > amax:
            amax = abs(x[j])
            biggest = x[j]
    if amax < GROUP_MAX_EPS:
        return np.float32(0.0)
    d = -biggest / level(0)
    sumqx, sumq2 = _fit(x, weights, np.float32(1.0) / d)
    d = sumqx / sumq2 if sumq2 > 0 else np.float32(0.0)
    best = d * sumqx
    for k in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = _fit(x, weights, np.float32(k + KVALUES[0]) / biggest)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@numba.njit(**JIT)
def _weights(x, qw, sigma2, weights):
    """x**2 when qw is empty, else ggml's qw[j] * sqrtf(sigma2 + x[j]*x[j])."""
    for j in range(x.shape[0]):
        if qw.shape[0]:
            weights[j] = qw[j] * np.float32(np.sqrt(sigma2 + x[j] * x[j]))
        else:
            weights[j] = x[j] * x[j]


@numba.njit(**JIT)
def _sigma2(x):
    """Twice the mean square, as ggml: the sum in element order times 2/len."""
    total = np.float32(0.0)
    for j in range(x.shape[0]):
        total += x[j] * x[j]
    return total * (np.float32(2.0) / np.float32(x.shape[0]))


@numba.njit(**JIT)
def _put_codes(x, inv_scale, out, at):
    """Codes of the 32 values x against 1/inv_scale, packed into out[at:at + 16]."""
    for j in range(16):
        out[at + j] = nearest_code(inv_scale * x[j]) | (nearest_code(inv_scale * x[j + 16]) << 4)


@numba.njit(**JIT)
def block_iq4_nl(x, qw, out, weights):
    _weights(x, qw, _sigma2(x), weights)
    d = block_scale(x, weights)
    put_fp16(out, 0, d)
    _put_codes(x, np.float32(1.0) / d if d != 0 else np.float32(0.0), out, 2)


@numba.njit(**JIT)
def block_iq4_xs(x, qw, out, weights, scales):
    sigma2 = _sigma2(x)
    max_scale = np.float32(0.0)
    amax_scale = np.float32(0.0)
    for ib in range(8):
        _weights(x[QK * ib:QK * ib + QK], qw[QK * ib:QK * ib + QK], sigma2, weights)
        scales[ib] = block_scale(x[QK * ib:QK * ib + QK], weights)
        if abs(scales[ib]) > amax_scale:
            amax_scale = abs(scales[ib])
            max_scale = scales[ib]
    d = -max_scale / np.float32(32.0)  # -0.0 for an all-zero super-block, as ggml stores it
    put_fp16(out, 0, d)
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    scales_h = 0
    for ib in range(8):
        l = max(-32, min(31, nearest_int(inv * scales[ib])))
        dl = d * np.float32(l)
        _put_codes(x[QK * ib:QK * ib + QK], np.float32(1.0) / dl if dl != 0 else np.float32(0.0), out, 8 + 16 * ib)
        l += 32
        if ib % 2 == 0:
            out[4 + ib // 2] = l & 0xF
        else:
            out[4 + ib // 2] |= (l & 0xF) << 4
        scales_h |= (l >> 4) << (2 * ib)
    put_u16(out, 2, scales_h)


@numba.njit(parallel=True, **JIT)
def quantize_iq4_nl(values, importance, out, bad):
    for r in numba.prange(values.shape[0]):
        x, y = values[r], out[r]
        bad[r] = has_nonfinite(x)
        weights = np.empty(QK, np.float32)
        if not bad[r]:
            for b in range(x.shape[0] // QK):
                block_iq4_nl(x[b * QK:(b + 1) * QK], importance[b * QK:(b + 1) * QK],
                             y[b * IQ4_NL_BYTES:(b + 1) * IQ4_NL_BYTES], weights)


@numba.njit(parallel=True, **JIT)
def quantize_iq4_xs(values, importance, out, bad):
    for r in numba.prange(values.shape[0]):
        x, y = values[r], out[r]
        bad[r] = has_nonfinite(x)
        weights, scales = np.empty(QK, np.float32), np.empty(8, np.float32)
        if not bad[r]:
            for b in range(x.shape[0] // QK_K):
                block_iq4_xs(x[b * QK_K:(b + 1) * QK_K], importance[b * QK_K:(b + 1) * QK_K],
                             y[b * IQ4_XS_BYTES:(b + 1) * IQ4_XS_BYTES], weights, scales)

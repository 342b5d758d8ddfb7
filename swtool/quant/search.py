"""The scale searches of ggml's K-quants, ported from ggml/src/ggml-quants.c.

A K-quant super-block of 256 values is cut into sub-blocks of 16 or 32. Each
sub-block first gets its own float scale (and minimum) from one of these
searches; the super-block then stores those scales as small integers against a
half-precision super-scale. Each search writes its integer codes into L and
returns what ggml's function returns:

  make_qx_quants    symmetric, codes -nmax..nmax-1, least squares over 19 trial scales (Q6_K)
  make_q3_quants    symmetric, refined code by code (Q3_K)
  make_qkx2_quants  asymmetric (scale and min), weighted least squares over trial scales (Q2_K, Q4_K, Q5_K)

Float operations follow the C expressions term by term (see bits.py for why).
"""

import numba
import numpy as np

from swtool.quant.bits import JIT, nearest_int

GROUP_MAX_EPS = np.float32(1e-15)


@numba.njit(**JIT)
def _clamp(value, lo, hi):
    return max(lo, min(hi, value))


@numba.njit(**JIT)
def _signed_absmax(x):
    """ggml's `if (ax > amax) { amax = ax; max = x[i]; }` scan: largest |x| and its signed value."""
    amax = np.float32(0.0)
    biggest = np.float32(0.0)
    for i in range(x.shape[0]):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            biggest = x[i]
    return amax, biggest


@numba.njit(**JIT)
def make_qx_quants(x, nmax, L):
    """ggml make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL): codes L in 0..2*nmax-1, returns the scale.

    Weights are x**2 (rmse_type 1). Tries iscale = -(nmax + 0.1*k)/max for k = -9..9
    and keeps the one with the best sum(w*x*l)**2 / sum(w*l*l).
    """
    n = x.shape[0]
    amax, biggest = _signed_absmax(x)
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    fmax = np.float32(nmax)
    iscale = -fmax / biggest
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        l = _clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1)
        L[i] = l + nmax
        w = x[i] * x[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else np.float32(0.0)
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        iscale = -(fmax + np.float32(0.1) * np.float32(k)) / biggest
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(n):
            fl = np.float32(_clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1))
            w = x[i] * x[i]
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + _clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1)
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@numba.njit(**JIT)
def make_q3_quants(x, nmax, L):
    """ggml make_q3_quants(n, nmax, x, L, do_rmse=true): codes L in 0..2*nmax-1, returns the scale.

    Starts from iscale = -nmax/max, then up to 5 sweeps that move one code at a
    time when that raises sum(w*x*l)**2 / sum(w*l*l), with w = x**2.
    """
    n = x.shape[0]
    amax, biggest = _signed_absmax(x)
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    iscale = -np.float32(nmax) / biggest
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        l = _clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1)
        L[i] = l
        w = x[i] * x[i]
        sumlx += w * x[i] * np.float32(l)
        suml2 += w * np.float32(l) * np.float32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fl = np.float32(L[i])
            slx = sumlx - w * x[i] * fl
            if slx > 0:
                sl2 = suml2 - w * fl * fl
                new_l = _clamp(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1)
                if new_l != L[i]:
                    fnew = np.float32(new_l)
                    slx += w * x[i] * fnew
                    sl2 += w * fnew * fnew
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else np.float32(0.0)


@numba.njit(**JIT)
def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad, L, Laux):
    """ggml make_qkx2_quants: codes L in 0..nmax for x ~ scale * L - min; returns (scale, min).

    The min is returned as ggml's `*the_min` (>= 0, subtracted). Trial inverse
    scales (rmin + rdelta*k + nmax) / (max - min), k = 0..nstep, each refit by
    weighted least squares for scale and min; the lowest weighted error
    (absolute if use_mad, else squared) wins.
    """
    n = x.shape[0]
    lo = x[0]
    hi = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < lo:
            lo = x[i]
        if x[i] > hi:
            hi = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if lo > 0:
        lo = np.float32(0.0)
    if hi == lo:
        for i in range(n):
            L[i] = 0
        return np.float32(0.0), -lo
    fmax = np.float32(nmax)
    iscale = fmax / (hi - lo)
    scale = np.float32(1.0) / iscale
    best_error = np.float32(0.0)
    for i in range(n):
        l = _clamp(nearest_int(iscale * (x[i] - lo)), 0, nmax)
        L[i] = l
        diff = scale * np.float32(l) + lo - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    for k in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(k) + fmax) / (hi - lo)
        sum_l = np.float32(0.0)
        sum_l2 = np.float32(0.0)
        sum_xl = np.float32(0.0)
        for i in range(n):
            l = _clamp(nearest_int(iscale * (x[i] - lo)), 0, nmax)
            Laux[i] = l
            w = weights[i]
            fl = np.float32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = np.float32(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = np.float32(0.0)
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                lo = this_min
    return scale, -lo

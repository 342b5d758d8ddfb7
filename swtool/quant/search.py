"""The scale searches of ggml's K-quants, ported from ggml/src/ggml-quants.c.

A K-quant super-block of 256 values is cut into sub-blocks of 16 or 32. Each
sub-block first gets its own float scale (and minimum) from one of these
searches; the super-block then stores those scales as small integers against a
half-precision super-scale. Each search writes its integer codes into L and
returns what ggml's function returns:

  make_qx_quants    symmetric, codes -nmax..nmax-1, least squares over 19 trial scales (Q6_K)
  make_q3_quants    symmetric, refined code by code (Q3_K)
  make_qkx2_quants  asymmetric (scale and min), weighted least squares over trial scales (Q2_K, Q4_K, Q5_K)
  make_qkx3_quants  the same with ggml's settings for importance weights (and Q4_1, Q5_1 under them)
  make_qp_quants    non-negative, codes 0..nmax: the super-block scales under importance weights

With importance weights (ggml's quant_weights, `importance` in swtool) the quantizers
call these with per-value weights qw[j] * sqrt(sigma2 + x[j]**2) instead of their
fixed ones; make_qx_quants takes an empty weights array for its fixed x**2.

Float operations follow the C expressions term by term (see bits.py for why).

Trials side by side. ggml tries its trial scales one after another, each with a
loop over the sub-block that sums in element order. Those sums cannot be
vectorised along the elements without changing their rounding, but the trials
are independent (in make_qkx2_quants until one moves the min, see there):
here the loop over elements is outside and the loop over
trials inside, so every trial still adds its terms in element order (the same
float32 sums, bit for bit) while LLVM vectorises across trials. The choice of
the best trial is then replayed in ggml's order. `lanes` is a per-row float32
scratch array [LANE_ROWS, TRIALS]; unused lanes repeat a real trial and are ignored.
"""

import numba
import numpy as np

from swtool.quant.bits import JIT, nearest_int

GROUP_MAX_EPS = np.float32(1e-15)
TRIALS = 24  # >= the most trials of any search (19 for Q6_K, 22 for Q4_K): 3 vectors of 8, fastest measured
LANE_ROWS = 7
MAGIC = np.float32(12582912.0)  # 1.5 * 2**23


@numba.njit(**JIT)
def new_lanes():
    """Scratch for one thread's searches."""
    return np.empty((LANE_ROWS, TRIALS), dtype=np.float32)


@numba.njit(**JIT)
def _clamp(value, lo, hi):
    return max(lo, min(hi, value))


@numba.njit(**JIT)
def _rint(value):
    """nearest_int(value) as a float32, for |value| < 4194303: the same half-to-even rounding.

    Staying in float32 (no int round trip) is what lets the trial loops vectorise well.
    """
    return (value + MAGIC) - MAGIC


SAFE = np.float32(4.0e6)  # below nearest_int's limit of 4194303 with room for rounding


@numba.njit(**JIT)
def _code(value, lo, hi, exact):
    """clamp(nearest_int(value), lo, hi) as a float32.

    ggml asserts |value| <= 4194303 but compiles the assert out: beyond it
    nearest_int returns wrapped bits. `exact` keeps that; otherwise `value` is
    known to be in range and the float path is used.
    """
    if exact:
        return min(max(np.float32(nearest_int(value)), lo), hi)
    return min(max(_rint(value), lo), hi)


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
def make_qx_quants(x, nmax, L, lanes, weights):
    """ggml make_qx_quants(n, nmax, x, L, rmse_type=1, qw): codes L in 0..2*nmax-1, returns the scale.

    `weights` is ggml's qw, one per value, or empty for qw=NULL: then the weights
    are x**2 (rmse_type 1). Trial 0 is iscale = -nmax/max; then
    -(nmax + 0.1*k)/max for k = -9..9 (k = 0 is trial 0 again, skipped). The
    winner has the largest sum(w*x*l)**2 / sum(w*l*l), compared in ggml's order.
    """
    n = x.shape[0]
    amax, biggest = _signed_absmax(x)
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    weighted = weights.shape[0] > 0
    fmax = np.float32(nmax)
    iscale, sumlx, suml2 = lanes[0], lanes[1], lanes[2]
    iscale[:] = -fmax / biggest
    t = 1
    for k in range(-9, 10):
        if k != 0:
            iscale[t] = -(fmax + np.float32(0.1) * np.float32(k)) / biggest
            t += 1
    sumlx[:] = 0
    suml2[:] = 0
    for i in range(n):
        w = weights[i] if weighted else x[i] * x[i]
        wx = w * x[i]
        for t in range(TRIALS):  # |iscale * x| <= nmax + 0.9 as |x| <= |max|: in _rint's range
            l = min(max(_rint(iscale[t] * x[i]), -fmax), fmax - np.float32(1.0))
            sumlx[t] += wx * l  # ggml: w*x[i]*l
            suml2[t] += w * l * l
    scale = sumlx[0] / suml2[0] if suml2[0] != 0 else np.float32(0.0)
    best = scale * sumlx[0]
    winner = 0
    for t in range(1, 19):
        if suml2[t] > 0 and sumlx[t] * sumlx[t] > best * suml2[t]:
            scale = sumlx[t] / suml2[t]
            best = scale * sumlx[t]
            winner = t
    for i in range(n):
        L[i] = nmax + _clamp(nearest_int(iscale[winner] * x[i]), -nmax, nmax - 1)
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
def _refit_trials(x, weights, nmax, rmin, rdelta, first, last, shift, lo, hi, sum_w, sum_x, use_mad, lanes):
    """Trials k = first..last of make_qkx2_quants (at most TRIALS of them), side by side, all with ggml's current `min` = shift.

    Lane t holds trial first + t: its iscale, the least-squares (scale, min) refit
    (scale NaN where ggml skips the trial, D <= 0) and the refit's weighted error.
    lo..hi bounds the block (lo = min(x, 0), hi = max(x)).
    """
    fmax = np.float32(nmax)
    iscale, scale, the_min, error = lanes[0], lanes[1], lanes[2], lanes[3]
    sum_l, sum_l2, sum_xl = lanes[4], lanes[5], lanes[6]
    width = hi - shift  # ggml: max - min
    n_trials = last + 1 - first
    n_lanes = min(TRIALS, (n_trials + 7) // 8 * 8)  # whole vectors of 8
    for t in range(n_lanes):
        k = first + min(t, n_trials - 1)  # spare lanes repeat the last trial
        iscale[t] = (rmin + rdelta * np.float32(k) + fmax) / width
    # |iscale * (x - shift)| is about nmax when shift is the block's min; a refit's
    # min could in principle put it out of nearest_int's range, then do as ggml does
    largest = np.float32(0.0)
    for t in range(n_lanes):
        largest = max(largest, abs(iscale[t]))
    exact = not largest * max(abs(hi - shift), abs(lo - shift)) < SAFE  # lo <= every x <= hi
    zero = np.float32(0.0)
    sum_l[:] = 0
    sum_l2[:] = 0
    sum_xl[:] = 0
    for i in range(x.shape[0]):  # sums in element order, each lane on its own
        w = weights[i]
        shifted = x[i] - shift
        for t in range(n_lanes):
            l = _code(iscale[t] * shifted, zero, fmax, exact)
            sum_l[t] += w * l
            sum_l2[t] += w * l * l
            sum_xl[t] += w * l * x[i]
    for t in range(n_trials):
        D = sum_w * sum_l2[t] - sum_l[t] * sum_l[t]
        if D > 0:
            scale[t] = (sum_w * sum_xl[t] - sum_x * sum_l[t]) / D
            the_min[t] = (sum_l2[t] * sum_x - sum_l[t] * sum_xl[t]) / D
            if the_min[t] > 0:
                the_min[t] = np.float32(0.0)
                scale[t] = sum_xl[t] / sum_l2[t]
        else:
            scale[t] = np.float32(np.nan)
            the_min[t] = np.float32(0.0)
    for t in range(n_trials, n_lanes):
        scale[t] = np.float32(np.nan)
        the_min[t] = np.float32(0.0)
    error[:] = 0
    for i in range(x.shape[0]):  # errors in element order
        w = weights[i]
        shifted = x[i] - shift
        for t in range(n_lanes):
            l = _code(iscale[t] * shifted, zero, fmax, exact)
            diff = scale[t] * l + the_min[t] - x[i]
            error[t] += w * (abs(diff) if use_mad else diff * diff)


@numba.njit(**JIT)
def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad, L, lanes):
    """ggml make_qkx2_quants: codes L in 0..nmax for x ~ scale * L - min; returns (scale, min).

    The min is returned as ggml's `*the_min` (>= 0, subtracted). The first fit
    spans [min(x, 0), max(x)] with iscale = nmax / (max - min); trials
    k = 0..nstep take iscale = (rmin + rdelta*k + nmax) / (max - min), refit
    scale and min by weighted least squares, and replace the fit when their
    weighted error (absolute if use_mad, else squared) is lower.

    A winning trial also replaces `min`, which the later trials subtract before
    rounding. So trials run side by side on the current min, the winners are
    replayed in ggml's order, and from the first win that moves min the
    remaining trials run again (about 3 times per search on weight-like data).
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
    # the first fit
    the_min = lo
    best_iscale = np.float32(nmax) / (hi - lo)
    best_shift = lo
    scale = np.float32(1.0) / best_iscale
    best_error = np.float32(0.0)
    for i in range(n):
        l = np.float32(_clamp(nearest_int(best_iscale * (x[i] - lo)), 0, nmax))
        diff = scale * l + lo - x[i]
        best_error += weights[i] * (abs(diff) if use_mad else diff * diff)
    # the trials, replayed in order
    iscales, scales, mins, errors = lanes[0], lanes[1], lanes[2], lanes[3]
    first = 0
    while first <= nstep:
        last = min(nstep, first + TRIALS - 1)  # TRIALS at a time (make_qkx3_quants has 37)
        shift = the_min
        _refit_trials(x, weights, nmax, rmin, rdelta, first, last, shift, lo, hi, sum_w, sum_x, use_mad, lanes)
        moved = False
        for t in range(last + 1 - first):
            if scales[t] == scales[t] and errors[t] < best_error:  # NaN scale: ggml skipped it
                best_error = errors[t]
                scale = scales[t]
                the_min = mins[t]
                best_iscale, best_shift = iscales[t], shift
                if the_min != shift:
                    first += t + 1
                    moved = True
                    break
        if not moved:
            first = last + 1
    for i in range(n):
        L[i] = _clamp(nearest_int(best_iscale * (x[i] - best_shift)), 0, nmax)
    return scale, -the_min


@numba.njit(**JIT)
def make_qkx3_quants(x, weights, nmax, L, lanes):
    """ggml make_qkx3_quants with weights, as the importance-weighted quantizers call it
    (rmin -0.9, rdelta 0.05, 37 trials, squared error): the same search as make_qkx2_quants."""
    return make_qkx2_quants(x, weights, nmax, np.float32(-0.9), np.float32(0.05), 36, False, L, lanes)


@numba.njit(**JIT)
def _qp_error(x, weights, iscale, nmax, clamp):
    """sum(w * (x - l/iscale)**2), l = nearest_int(iscale * x) (capped at nmax if `clamp`), in element order."""
    scale = np.float32(1.0) / iscale
    error = np.float32(0.0)
    for i in range(x.shape[0]):
        l = nearest_int(iscale * x[i])
        if clamp:
            l = min(nmax, l)
        else:
            l &= 0xFF  # ggml keeps the first codes in uint8_t L[]
        diff = x[i] - scale * np.float32(l)
        error += weights[i] * diff * diff
    return error


@numba.njit(**JIT)
def make_qp_quants(x, nmax, L, weights):
    """ggml make_qp_quants: codes L in 0..nmax for the non-negative x ~ scale * L; returns the scale.

    The K-quants' super-block scales under importance weights: x are the sub-block scales
    (or mins), weights their sub-blocks' summed weights. The best of iscale = (nmax + 0.1*k)/max,
    k = -4..4, by weighted squared error, then up to 5 sweeps moving one code at a time
    (as make_q3_quants) when that raises sum(w*x*l)**2 / sum(w*l*l). L holds what
    ggml's uint8_t L[] holds (codes wrap modulo 256) and the sweeps read it back so.
    """
    n = x.shape[0]
    biggest = np.float32(0.0)
    for i in range(n):
        biggest = biggest if biggest > x[i] else x[i]  # ggml's MAX(max, x[i])
    if biggest < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    iscale = np.float32(nmax) / biggest
    best_error = _qp_error(x, weights, iscale, nmax, False)
    for k in range(-4, 5):
        if k != 0:
            trial = (np.float32(0.1) * np.float32(k) + np.float32(nmax)) / biggest
            error = _qp_error(x, weights, trial, nmax, True)
            if error < best_error:
                best_error = error
                iscale = trial
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        w = weights[i]
        sumlx += w * x[i] * np.float32(l)
        suml2 += w * np.float32(l) * np.float32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = weights[i]
            fl = np.float32(L[i])
            slx = sumlx - w * x[i] * fl
            sl2 = suml2 - w * fl * fl
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fnew = np.float32(new_l)
                    slx += w * x[i] * fnew
                    sl2 += w * fnew * fnew
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else np.float32(0.0)

"""The numerical building blocks of a decoder block, in float32 NumPy.

Activations have shape [worlds, tokens, channels]: `worlds` are copies of the
same prompt run through differently edited models in one pass (see forward.py).
"""

import math

import numpy as np


def rms_norm(x, weight, eps):
    """x / rms(x) * weight, per token (Llama's RMSNorm)."""
    variance = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return (x / np.sqrt(variance + np.float32(eps))) * weight


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """(x - mean) / sqrt(var + eps) per token, then * weight + bias if given (OLMo's LayerNorm has neither)."""
    centered = x - np.mean(x, axis=-1, keepdims=True, dtype=np.float32)
    variance = np.mean(np.square(centered), axis=-1, keepdims=True)
    out = centered / np.sqrt(variance + np.float32(eps))
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def silu(x):
    """x / (1 + exp(-x)), the steps in one new array (an MLP's activations are the largest arrays of a pass)."""
    out = np.negative(x)
    np.exp(out, out=out)
    out += np.float32(1.0)
    np.divide(x, out, out=out)
    return out


def gelu_tanh(x):
    inner = np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x * x * x)
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))


# NumPy has no erf ufunc; exact GELU (torch's default) is rare in decoders, so a vectorised math.erf will do
_erf = np.vectorize(math.erf, otypes=[np.float32])


def gelu_erf(x):
    return np.float32(0.5) * x * (np.float32(1.0) + _erf(x / np.float32(math.sqrt(2.0))))

ACTIVATIONS = {
    "silu": silu,
    "swish": silu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "gelu": gelu_erf,
}


def softmax(scores, axis=-1):
    """exp(x - max) / sum in one new array: the steps run in place, as fresh temporaries the
    size of an attention matrix cost 10x the arithmetic (measured on [3, 9, 512, 512] scores)."""
    out = scores - np.max(scores, axis=axis, keepdims=True)
    np.exp(out, out=out)
    out /= np.sum(out, axis=axis, keepdims=True)
    return out


def log_softmax(logits, axis=-1):
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


# --- rotary position embedding (Hugging Face "rotate half" layout) ---------------------

def rope_cos_sin(inv_freq, positions):
    """cos and sin tables [tokens, rotary_dim] for the given positions."""
    freqs = np.outer(positions.astype(np.float32), inv_freq.astype(np.float32))
    angles = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x, cos, sin):
    """Rotate [.., tokens, head_dim] by position; only the first cos.shape[-1] dims rotate (partial rotary)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated_half = np.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos + rotated_half * sin
    return np.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


# --- attention ------------------------------------------------------------------------

def causal_mask(n_tokens, window=None):
    """Additive mask [tokens, tokens]: 0 where query i may see key j (j <= i, i - j < window), -inf elsewhere."""
    i = np.arange(n_tokens)[:, None]
    j = np.arange(n_tokens)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    return np.where(allowed, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)


QUERY_BLOCK = 128  # queries per slice of the attention matrix (see `attention`)


def attention(q, k, v, mask, scale, softcap=None):
    """Scaled dot-product attention with grouped KV heads.

    q [W, H, T, d], k and v [W, Hkv, T, d]; each KV head serves H/Hkv query heads.
    mask [T, T] is additive (0 or -inf, see causal_mask).

    Long inputs go in slices of QUERY_BLOCK queries, each against only the keys its
    mask lets it see: a causal mask then costs about half the full T x T matrix in
    products, exponentials and memory (eval chunks of 512 tokens: 4 slices, 5/8 of
    the work). The result is the same: a masked key adds exp(-inf) = 0 to a softmax.
    """
    n_heads, n_kv = q.shape[1], k.shape[1]
    if n_heads != n_kv:
        k = np.repeat(k, n_heads // n_kv, axis=1)
        v = np.repeat(v, n_heads // n_kv, axis=1)
    n_tokens = q.shape[2]
    if n_tokens <= QUERY_BLOCK:
        return _attend(q, k, v, mask, scale, softcap)
    out = np.empty(q.shape[:-1] + v.shape[-1:], dtype=np.float32)
    visible = np.isfinite(mask)
    blocks = []
    for start in range(0, n_tokens, QUERY_BLOCK):
        stop = min(n_tokens, start + QUERY_BLOCK)
        seen = np.flatnonzero(visible[start:stop].any(axis=0))  # never empty: a query sees itself
        blocks.append((start, stop, seen[0], seen[-1] + 1))

    def attend(part):  # part: (batch rows, heads)
        for start, stop, first, last in blocks:
            out[part + (slice(start, stop),)] = _attend(
                q[part + (slice(start, stop),)], k[part + (slice(first, last),)], v[part + (slice(first, last),)],
                mask[start:stop, first:last], scale, softcap)

    _over_threads(attend, q.shape[:2])
    return out


def _over_threads(work, shape):
    """work((rows, heads)) over parts of the [rows, heads] grid, split along rows when there are enough of
    them, else along heads: on as many Python threads as BLAS has, each multiplying single-threaded
    (swtool/blas.py explains why); in this thread when there is one thread."""
    from swtool.blas import blas_threads, configured_threads

    n_threads = min(max(shape), configured_threads())
    if n_threads <= 1:
        with blas_threads(1):
            work((slice(None), slice(None)))
        return
    from concurrent.futures import ThreadPoolExecutor

    axis = 0 if shape[0] >= n_threads else 1
    n_threads = min(n_threads, shape[axis])
    bounds = np.linspace(0, shape[axis], n_threads + 1).astype(int)

    def run(i):
        part = [slice(None), slice(None)]
        part[axis] = slice(bounds[i], bounds[i + 1])
        with blas_threads(1):
            work(tuple(part))

    with ThreadPoolExecutor(n_threads) as pool:
        list(pool.map(run, range(n_threads)))


def _attend(q, k, v, mask, scale, softcap):
    """softmax(q k^T * scale [softcapped] + mask) v for q [.., Tq, d], k and v [.., Tk, d], mask [Tq, Tk]."""
    scores = np.matmul(q, np.swapaxes(k, -1, -2))
    scores *= np.float32(scale)
    if softcap is not None:
        scores = np.tanh(scores / np.float32(softcap)) * np.float32(softcap)
    scores += mask
    probs = softmax(scores)
    return np.matmul(probs, v)

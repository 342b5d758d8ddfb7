"""Perplexity of a GGUF file in llama.cpp itself (llama-cpp-python, an optional extra).

    pip install 'swtool[llama]'

Each window of `ctx` tokens is an independent sequence (reset, then evaluate the window),
every prediction in it is scored (position p's logits against token p+1), and the NLL is
averaged over all predictions of all windows: the convention of swtool.evaluate, so a
GGUF's score and `swtool eval`'s score of its source are comparable window for window.
llama.cpp runs with `threads` threads for both the prompt and generation (its batch
default is every core); one thread keeps runs on a shared machine comparable.
"""

import numpy as np

from swtool.errors import SwtoolError

EXTRA_HINT = "pip install 'swtool[llama]'"


def require_llama(what="scoring in llama.cpp"):
    """Fail at once, before any long work, if llama-cpp-python is missing."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SwtoolError(f"{what} needs llama-cpp-python, an optional extra: {EXTRA_HINT}") from None


def load(path, ctx=512, threads=1):
    """The GGUF at `path` in llama.cpp, keeping the logits of every position of a window."""
    require_llama()
    import llama_cpp

    try:
        return llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=threads,
                               n_threads_batch=threads, verbose=False)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise SwtoolError(f"{path}: llama.cpp could not load it ({e})") from None


def close(llm):
    """Free llama.cpp's model and context now rather than at garbage collection."""
    if hasattr(llm, "close"):
        llm.close()


def windows(ids, ctx, n_windows):
    """The first n_windows full windows of ctx tokens of `ids`."""
    ids = [int(i) for i in ids]
    if n_windows < 1 or len(ids) < ctx * n_windows:
        from swtool.table import plural

        raise SwtoolError(f"{plural(len(ids), 'token')} do not fill {plural(n_windows, 'window')} of {ctx}")
    return [ids[i * ctx:(i + 1) * ctx] for i in range(n_windows)]


def window_nll(llm, window):
    """(summed NLL, predictions) of one window: every position's logits against the next token."""
    nll, n, _ = _window(llm, window)
    return nll, n


def _window(llm, window):
    """(summed NLL, predictions, llama.cpp's logits [predictions, vocab] float32) of one window."""
    llm.reset()
    llm.eval(window)
    raw = np.array(llm.scores[:len(window) - 1], dtype=np.float32)  # a copy: the next eval overwrites scores
    # log-sum-exp with the row maximum taken out, so large logits do not overflow; the exponentials in
    # float32 and their sum in float64, as swtool.evaluate scores its own logits (a float64 copy of every
    # logit would cost more than the rest of the window's scoring)
    peak = raw.max(axis=1)
    shifted = raw - peak[:, None]
    np.exp(shifted, out=shifted)
    log_total = peak.astype(np.float64) + np.log(shifted.sum(axis=1, dtype=np.float64))
    del shifted
    targets = np.asarray(window[1:])
    picked = raw[np.arange(len(targets)), targets].astype(np.float64)
    return float(np.sum(log_total - picked)), len(targets), raw


def perplexity(llm, token_windows):
    """(perplexity, predictions scored) of the windows, each an independent sequence."""
    ppl, count, _ = score(llm, token_windows)
    return ppl, count


def score(llm, token_windows, reference=None):
    """(perplexity, predictions scored, KldStats or None) of the windows, each an independent sequence.

    `reference(i)`: the reference's logits [predictions, vocab] at window i's predictions (every position
    but the last, as scored here), e.g. swtool.kld.ReferenceLogits.rows(i, range(ctx - 1)); with it, the
    KL divergence of llama.cpp's distributions from the reference's (swtool.kld) window by window.
    """
    from swtool.kld import KldAccumulator

    total, count, kld = 0.0, 0, KldAccumulator()
    for i, window in enumerate(token_windows):
        nll, n, logits = _window(llm, window)
        total += nll
        count += n
        if reference is not None:
            kld.add(reference(i), logits)
        del logits
    return float(np.exp(total / count)), count, kld.stats() if reference is not None else None

"""llama.cpp itself (llama-cpp-python) as the judge of swtool's GGUF files: load, generate, perplexity.

Perplexity is computed from llama.cpp's own logits: each window of `ctx` tokens is an
independent sequence (llm.reset(); llm.eval(window)), every prediction in it is scored
(position p's logits against token p+1), and the NLL is averaged over all predictions
of all windows, the same convention as swtool.evaluate. One thread for both the
prompt and generation (n_threads_batch defaults to every core), so runs on a shared
machine stay comparable (shared/reference/llama-cpp-notes.md §2).
"""

import numpy as np


def load(path, n_ctx=512):
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, n_threads=1, n_threads_batch=1,
                           verbose=False)


def windows(ids, ctx, n_windows):
    """The first n_windows full windows of ctx tokens."""
    ids = list(ids)
    if len(ids) < ctx * n_windows:
        raise ValueError(f"{len(ids)} tokens do not fill {n_windows} windows of {ctx}")
    return [ids[i * ctx:(i + 1) * ctx] for i in range(n_windows)]


def perplexity(llm, ids, ctx=512, n_windows=2):
    """(perplexity, predictions scored) of the first n_windows windows of ctx tokens of `ids`."""
    nll, count = 0.0, 0
    for window in windows(ids, ctx, n_windows):
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:len(window)], dtype=np.float64)
        peak = logits.max(axis=1, keepdims=True)
        log_total = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
        targets = np.asarray(window[1:])
        nll += float(np.sum(log_total[:-1] - logits[np.arange(len(targets)), targets]))
        count += len(targets)
    return float(np.exp(nll / count)), count


def greedy(llm, prompt, n_tokens=16):
    """Greedy continuation of `prompt` (temperature 0, top-k 1) as text."""
    out = llm(prompt, max_tokens=n_tokens, temperature=0.0, top_k=1)
    return out["choices"][0]["text"]


def greedy_ids(llm, ids, n_tokens):
    """The next n_tokens token ids after `ids`, each the argmax of llama.cpp's logits."""
    llm.reset()
    llm.eval(list(ids))
    out = []
    for _ in range(n_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out

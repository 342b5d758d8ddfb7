"""KL divergence of a model's next-token distributions from a reference's, as llama.cpp reports it.

llama.cpp's `llama-perplexity --kl-divergence` (tools/perplexity/perplexity.cpp, kl_divergence())
compares, at every scored position, the distribution P of the base model (saved with
--kl-divergence-base) with the distribution Q of the model under test:

  - KLD per prediction = sum_i P_i (log P_i - log Q_i), in nats;
  - "Mean KLD ± e": the mean over all predictions, e = sqrt((mean(KLD²) - mean²) / (n - 1));
  - "Maximum", "99.9 %", "99.0 %", ..., "Median", ... "Minimum" KLD: percentiles of the per-prediction
    values, interpolated linearly at fraction x (n - 1) of the sorted values (numpy's default), the
    median the mean of the two middle values when n is even;
  - "Same top p": the share of predictions where Q's most likely token is P's (argmax, first on ties).

What this module does differently, and why the numbers still agree:
  - llama.cpp stores the base log-probabilities as 16-bit integers (a linear scale per position) and
    skips the terms with log P_i < -16; here both distributions are full float64 log-softmaxes of the
    logits, every term kept. The difference is llama.cpp's rounding, not a different quantity.
  - which predictions are scored is the caller's: llama.cpp scores positions ctx/2 .. ctx-2 of each
    window; `swtool eval` scores what its perplexity scores (every prediction, or from ctx/2 on with
    --score-second-half, llama.cpp's selection), `swtool sweep` every prediction of each window, the
    same predictions as its perplexity column.

The reference's logits are kept on disk (ReferenceLogits, a float32 memmap, 4 x vocab bytes per
prediction) and read back a window at a time, so memory holds one window of logits, not the text's.
"""

import shutil
from dataclasses import dataclass

import numpy as np

from swtool.errors import SwtoolError

BLOCK_ELEMENTS = 1 << 22  # positions x vocab of float64 worked on at once (32 MiB per array)


def log_softmax64(logits):
    """log softmax of each row of `logits` [P, V], in float64: x - max - log(sum(exp(x - max)))."""
    shifted = _shifted64(logits)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax_and_log64(logits):
    """(softmax, log softmax) of each row of `logits` [P, V], in float64. The softmax divides the exponentials
    the log softmax sums: exp of the log softmax would be one more exponential per element."""
    shifted = _shifted64(logits)
    exps = np.exp(shifted)
    sums = exps.sum(axis=1, keepdims=True)
    return exps / sums, shifted - np.log(sums)


def _shifted64(logits):
    x = np.asarray(logits, dtype=np.float64)
    return x - x.max(axis=1, keepdims=True)  # the largest term is exp(0) = 1: no overflow, sum >= 1


def token_kld(reference_logits, logits):
    """(KLD [P], same top token [P] bool) of each position: sum_i P_i (log P_i - log Q_i) with P the
    reference's softmax and Q the model's, both from float64 log-softmaxes of the logits [P, V].

    A KLD is never negative; the float64 rounding of two equal distributions can be (~1e-16), and is
    clamped to 0, so a model against itself gives exactly 0.
    """
    reference_logits, logits = np.asarray(reference_logits), np.asarray(logits)
    if reference_logits.shape != logits.shape or logits.ndim != 2:
        raise SwtoolError(f"KL divergence: logits of shape {logits.shape} against a reference of shape "
                          f"{reference_logits.shape}")
    n, vocab = logits.shape
    kld = np.empty(n, dtype=np.float64)
    step = max(1, BLOCK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, step):
        block = slice(start, min(n, start + step))
        (p, log_p), log_q = softmax_and_log64(reference_logits[block]), log_softmax64(logits[block])
        kld[block] = np.sum(p * (log_p - log_q), axis=1)
    same = np.argmax(reference_logits, axis=1) == np.argmax(logits, axis=1)
    return np.maximum(kld, 0.0, where=~np.isnan(kld), out=kld), same


@dataclass
class KldStats:
    """llama.cpp's KL-divergence statistics over a set of predictions."""

    predictions: int
    mean: float
    mean_uncertainty: float  # llama.cpp's "± e" of the mean
    median: float
    p90: float
    p99: float
    maximum: float
    same_top: float  # fraction of predictions whose most likely token is the reference's

    def to_json(self):
        return {"predictions": self.predictions, "mean": self.mean, "mean_uncertainty": self.mean_uncertainty,
                "median": self.median, "p90": self.p90, "p99": self.p99, "max": self.maximum,
                "same_top": self.same_top}


def statistics(kld, same):
    """KldStats of per-prediction KLD values and same-top flags (as llama.cpp computes them)."""
    kld = np.asarray(kld, dtype=np.float64)
    n = len(kld)
    if n == 0:
        raise SwtoolError("KL divergence: no prediction to compare")
    mean = float(kld.mean())
    variance = float(np.mean(kld * kld)) - mean * mean
    uncertainty = float(np.sqrt(variance / (n - 1))) if variance > 0 and n > 10 else 0.0  # llama.cpp's rule
    median, p90, p99 = (float(v) for v in np.percentile(kld, [50, 90, 99]))
    return KldStats(n, mean, uncertainty, median, p90, p99, float(kld.max()),
                    float(np.count_nonzero(same)) / n)


class KldAccumulator:
    """Per-prediction KLDs and same-top flags gathered block by block; `stats()` at the end."""

    def __init__(self):
        self.kld, self.same = [], []

    def add(self, reference_logits, logits):
        kld, same = token_kld(reference_logits, logits)
        self.kld.append(kld)
        self.same.append(same)

    @property
    def count(self):
        return sum(len(k) for k in self.kld)

    def stats(self):
        return statistics(np.concatenate(self.kld), np.concatenate(self.same))


class ReferenceLogits:
    """The reference's logits at every scored prediction of some chunks, in a float32 file (np.memmap).

    Row layout: chunk by chunk, the scored positions of each chunk in order (they are contiguous:
    first_scored .. length-2, evaluate.Chunks.scored). `store` is evaluate()'s logits_sink for the
    reference's pass; `rows(chunk, positions)` reads them back.
    """

    def __init__(self, chunks, vocab_size, directory):
        scored = chunks.scored()
        self.counts = scored.sum(axis=1)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.first = chunks.first_scored
        self.vocab_size = vocab_size
        n = int(self.counts.sum())
        need = n * vocab_size * 4
        free = shutil.disk_usage(directory).free
        if need > free:
            raise SwtoolError(f"KL divergence: the reference's logits take {need / 1e9:.1f} GB "
                              f"({n} predictions x {vocab_size} x 4 bytes) and {directory} has "
                              f"{free / 1e9:.1f} GB free; score fewer tokens or windows")
        self.path = f"{directory}/reference-logits.f32"
        self.logits = np.memmap(self.path, dtype=np.float32, mode="w+", shape=(max(n, 1), vocab_size))
        self.filled = np.zeros(n, dtype=bool)

    def _index(self, chunk, positions):
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) and (positions.min() < self.first or positions.max() - self.first >= self.counts[chunk]):
            raise SwtoolError(f"KL divergence: positions {positions.min()}..{positions.max()} of chunk {chunk} "
                              f"are not all scored")
        return self.offsets[chunk] + positions - self.first

    def store(self, world, chunk, positions, logits):
        """evaluate()'s logits_sink: keep the logits [len(positions), vocab] of one chunk's positions."""
        index = self._index(chunk, positions)
        self.logits[index] = logits
        self.filled[index] = True

    def rows(self, chunk, positions):
        index = self._index(chunk, positions)
        if not self.filled[index].all():
            raise SwtoolError(f"KL divergence: the reference has no logits for chunk {chunk}")
        return self.logits[index]


class KldComparison:
    """evaluate()'s logits_sink for the model's pass: each world's KLD against `reference`."""

    def __init__(self, reference, n_worlds):
        self.reference = reference
        self.worlds = [KldAccumulator() for _ in range(n_worlds)]

    def __call__(self, world, chunk, positions, logits):
        self.worlds[world].add(self.reference.rows(chunk, positions), logits)


# --- swtool eval --kld-reference -------------------------------------------------------

def check_same_vocabulary(model, reference, model_ids, reference_ids, reference_name):
    """Refuse, in one line, a reference whose distributions are not over the same tokens, or whose
    tokenizer cuts the text into other tokens (the chunks would not be the same windows)."""
    from swtool.tokenizer import load_tokenizer

    what = f"--kld-reference {reference_name}"
    if model.arch.vocab_size != reference.arch.vocab_size:
        raise SwtoolError(f"{what}: a vocabulary of {reference.arch.vocab_size} tokens, the model's has "
                          f"{model.arch.vocab_size}; the KL divergence compares distributions over the same tokens")
    ours = load_tokenizer(model.directory).get_vocab(with_added_tokens=True)
    theirs = load_tokenizer(reference.directory).get_vocab(with_added_tokens=True)
    if ours != theirs:
        token = min(set(ours.items()) ^ set(theirs.items()), key=lambda item: (item[1], item[0]))[0]

        def where(vocabulary):
            return f"id {vocabulary[token]}" if token in vocabulary else "absent"

        raise SwtoolError(f"{what}: another vocabulary than the model's (token {token!r}: {where(ours)} in the "
                          f"model's, {where(theirs)} in the reference's); the KL divergence compares "
                          f"distributions over the same tokens")
    if list(model_ids) != list(reference_ids):
        first = next((i for i, (a, b) in enumerate(zip(model_ids, reference_ids)) if a != b),
                     min(len(model_ids), len(reference_ids)))
        raise SwtoolError(f"{what}: its tokenizer cuts the text into other tokens than the model's "
                          f"(from token {first} on); the KL divergence needs the same chunks")


def reference_pass(reference, chunks, directory, progress=True, batch_tokens=None):
    """The reference scored on `chunks` by swtool's pass, its logits kept in `directory`:
    (ReferenceLogits, its WorldScore)."""
    from swtool.evaluate import DEFAULT_BATCH_TOKENS, Plan, evaluate
    from swtool.forward import World

    logits = ReferenceLogits(chunks, reference.arch.vocab_size, directory)
    (score,) = evaluate(reference, chunks, Plan([World("reference")]), progress=progress,
                        batch_tokens=batch_tokens or DEFAULT_BATCH_TOKENS, logits_sink=logits.store)
    return logits, score

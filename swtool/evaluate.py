"""Perplexity of a text through the streaming forward pass, for one or more worlds.

What is scored (the convention `swtool eval` prints):
  - the text is tokenized once, with the tokenizer's special tokens (BOS where
    the model expects one), and cut into consecutive chunks of `ctx` tokens; the
    last chunk may be shorter;
  - each chunk is an independent sequence (no context carried over) and every
    prediction inside it is scored: the logits at position p against token p+1,
    for p = 0 .. len-2, as transformers' `labels=input_ids` loss on that chunk;
  - `score_second_half` scores only p >= ctx // 2, as llama.cpp's llama-perplexity
    does, so every scored token has at least ctx/2 tokens of context;
  - NLL = the mean over all scored predictions of all chunks (token-weighted),
    perplexity = exp(NLL).

All chunks of all worlds go through each layer together as one batch (rows =
worlds x chunks, see forward.py), so each layer's weights are read once per
pass. `batch_tokens` caps the rows x ctx of one pass: a longer text takes
several passes, and memory stays near one layer plus those activations. The
head's logits are produced a block of rows or positions at a time (forward.head_logits,
128 MiB) and reduced at once to the scored log-likelihoods and the mean next-token distribution: [rows, ctx, vocab]
floats never exist for the whole text.

The last chunk is padded to `ctx` with copies of its last token. Attention is
causal, so the padding cannot change any real position; padded positions are
not scored, not profiled and never chosen by an activation transform.
"""

import io
from dataclasses import dataclass, field

import numpy as np

from swtool.arch.base import DOWN_OUT
from swtool.errors import SwtoolError
from swtool.table import plural
from swtool.inputfile import open_regular
from swtool.forward import World, head_logits, run_layers

DEFAULT_BATCH_TOKENS = 8192  # rows x ctx of one pass (SmolLM2 at ctx 512: ~50 KiB of activations per row-token)
HEAD_BLOCK_BYTES = 128 * 1024 * 1024  # logits made at once by the head


@dataclass
class Chunks:
    """A tokenized text cut into equal-length rows for one batched pass."""

    tokens: np.ndarray  # [B, ctx] int64, the last row padded
    lengths: np.ndarray  # [B] real tokens per row
    first_scored: int  # first position p whose prediction (of token p+1) is scored

    @property
    def ctx(self):
        return self.tokens.shape[1]

    def scored(self):
        """[B, ctx-1] bool: is the prediction at position p (of token p+1) scored?"""
        p = np.arange(self.ctx - 1)[None, :]
        return (p >= self.first_scored) & (p + 1 < self.lengths[:, None])

    def valid(self):
        """[B, ctx] bool: real (not padding) positions."""
        return np.arange(self.ctx)[None, :] < self.lengths[:, None]

    def n_scored(self):
        return int(self.scored().sum())


def make_chunks(ids, ctx, score_second_half=False):
    """Cut token ids into chunks of `ctx` (see the module docstring for what is scored)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ctx < 2:
        raise SwtoolError(f"--ctx must be at least 2 tokens, got {ctx}")
    if len(ids) < 2:
        raise SwtoolError(f"the text has {len(ids)} token(s); at least 2 are needed to score a prediction")
    n_chunks = -(-len(ids) // ctx)
    tokens = np.empty((n_chunks, ctx), dtype=np.int64)
    lengths = np.empty(n_chunks, dtype=np.int64)
    for b in range(n_chunks):
        piece = ids[b * ctx:(b + 1) * ctx]
        tokens[b, :len(piece)] = piece
        tokens[b, len(piece):] = piece[-1]  # padding after the real tokens: invisible to them (causal)
        lengths[b] = len(piece)
    chunks = Chunks(tokens, lengths, ctx // 2 if score_second_half else 0)
    if chunks.n_scored() == 0:
        raise SwtoolError(f"nothing to score: {len(ids)} tokens with --ctx {ctx}"
                          f"{' and --score-second-half' if score_second_half else ''}")
    return chunks


@dataclass
class WorldScore:
    """What one world scored over the text."""

    name: str
    nll_sum: float = 0.0
    count: int = 0
    probability_sum: np.ndarray = None  # [vocab] next-token probabilities summed over scored predictions
    peak_down_out: np.ndarray = None  # [layers] max |down_proj output| over the text

    @property
    def nll(self):
        return self.nll_sum / self.count

    @property
    def perplexity(self):
        return float(np.exp(self.nll))

    def mean_probability(self, ids):
        """Mean next-token probability of each token id in `ids`, over the scored predictions."""
        return self.probability_sum[np.asarray(ids, dtype=np.int64)] / self.count

    def top_tokens(self, k):
        """The k token ids with the largest mean next-token probability."""
        return np.argsort(-self.probability_sum, kind="stable")[:k]


class PeakProfile:
    """Observer: per world and layer, the largest |down_proj output| over real positions."""

    def __init__(self, n_worlds, n_layers, valid):
        self.n_worlds = n_worlds
        self.valid = valid  # [B, ctx] real positions of this pass's chunks
        self.peak = np.zeros((n_worlds, n_layers), dtype=np.float64)

    def observe(self, point, layer, x):
        if point != DOWN_OUT:
            return
        per_world = x.reshape((self.n_worlds,) + self.valid.shape + (x.shape[-1],))[:, self.valid]
        self.peak[:, layer] = np.abs(per_world).max(axis=(1, 2))


@dataclass
class Plan:
    """What one evaluation runs: the worlds side by side and what applies to all of them."""

    worlds: list  # World per result row
    transforms: list = field(default_factory=list)  # weight transforms for every world (--zero ...)
    # activation transforms: callables (chunks of this pass) -> [hooks] (RestoreActivation ...)
    hook_factories: list = field(default_factory=list)


def evaluate(model, chunks, plan, progress=True, batch_tokens=DEFAULT_BATCH_TOKENS, logits_sink=None):
    """Score `chunks` in every world of `plan`: [WorldScore], in plan.worlds order.

    `logits_sink(world, chunk, positions, logits)`, if given, sees the head's logits [len(positions),
    vocab] float32 of the scored positions of each chunk (its index in `chunks`), a block at a time,
    before they are reduced; it must copy what it keeps (swtool.kld: KL divergence).
    """
    n_worlds, n_layers = len(plan.worlds), model.arch.n_layers
    scores = [WorldScore(w.name, probability_sum=np.zeros(model.arch.vocab_size), peak_down_out=np.zeros(n_layers))
              for w in plan.worlds]
    per_pass = max(1, batch_tokens // (chunks.ctx * n_worlds))  # chunks per pass
    n_passes = -(-len(chunks.tokens) // per_pass)
    for i, start in enumerate(range(0, len(chunks.tokens), per_pass)):
        part = Chunks(chunks.tokens[start:start + per_pass], chunks.lengths[start:start + per_pass],
                      chunks.first_scored)
        label = (f"eval pass {i + 1}/{n_passes} ({plural(n_worlds, 'world')} x {plural(len(part.tokens), 'chunk')})"
                 if progress else None)
        _one_pass(model, part, plan, scores, label, start, logits_sink)
    return scores


def _one_pass(model, part, plan, scores, label, first_chunk=0, logits_sink=None):
    """One streaming pass over the weights for these chunks in every world; adds to `scores`."""
    n_worlds, n_chunks = len(plan.worlds), len(part.tokens)
    profile = PeakProfile(n_worlds, model.arch.n_layers, part.valid())
    hooks = [hook for make in plan.hook_factories for hook in make(part)]
    ctx, x = run_layers(model, part.tokens, plan.worlds, plan.transforms, [profile], label, hooks)
    # per position p: the token it predicts and whether it is scored (the last position predicts nothing)
    targets = np.concatenate([part.tokens[:, 1:], np.zeros((n_chunks, 1), dtype=np.int64)], axis=1)
    scored = np.concatenate([part.scored(), np.zeros((n_chunks, 1), dtype=bool)], axis=1)
    for rows, tokens, logits in head_logits(model, ctx, x, max_bytes=HEAD_BLOCK_BYTES):
        for local, row in enumerate(range(rows.start, rows.stop)):
            w, b = divmod(row, n_chunks)
            if not scored[b, tokens].any():
                continue
            if logits_sink is not None:  # before score_predictions turns the logits into probabilities
                positions = np.arange(tokens.start, tokens.stop)[scored[b, tokens]]
                logits_sink(w, first_chunk + b, positions, logits[local][scored[b, tokens]])
            nll, probabilities = score_predictions(logits[local], targets[b, tokens], scored[b, tokens])
            scores[w].nll_sum += nll
            scores[w].count += int(scored[b, tokens].sum())
            scores[w].probability_sum += probabilities
        del logits
    for w, score in enumerate(scores):
        score.peak_down_out = np.maximum(score.peak_down_out, profile.peak[w])


def score_predictions(logits, targets, scored):
    """Over the scored positions of one row: the sum of -log p(target), and the next-token
    probabilities summed over positions [vocab] (for stop words and the average distribution).

    logits [P, vocab] (overwritten when every position is scored), targets [P], scored [P] bool.
    """
    # the scored positions, turned into probabilities in place (a copy only if some are not scored)
    probabilities = logits if scored.all() else logits[scored]
    picked = probabilities[np.arange(len(probabilities)), targets[scored]]
    # softmax per position in float32 (as transformers' float32 loss), the normaliser summed in float64
    peak = probabilities.max(axis=1, keepdims=True)
    np.subtract(probabilities, peak, out=probabilities)
    np.exp(probabilities, out=probabilities)
    total = probabilities.sum(axis=1, dtype=np.float64)
    nll = float(np.sum(peak[:, 0] + np.log(total) - picked, dtype=np.float64))
    probabilities /= total[:, None].astype(np.float32)
    return nll, probabilities.sum(axis=0, dtype=np.float64)


def perplexity(model, ids, ctx=512, transforms=(), score_second_half=False, progress=False,
               batch_tokens=DEFAULT_BATCH_TOKENS, logits_sink=None):
    """Perplexity of token ids through `model` with weight `transforms`: (perplexity, scored predictions).
    `logits_sink`: as evaluate()'s, the chunks being make_chunks(ids, ctx, score_second_half)."""
    chunks = make_chunks(ids, ctx, score_second_half)
    (score,) = evaluate(model, chunks, Plan([World("model")], list(transforms)), progress=progress,
                        batch_tokens=batch_tokens, logits_sink=logits_sink)
    return score.perplexity, score.count


MAX_TEXT_CHARS = 256 << 20  # a text scored whole (no --max-tokens) beyond this is refused, not read into memory
READ_STEP = 64 << 10  # characters read first when --max-tokens needs only a prefix; doubled until enough
TOKEN_MARGIN = 64  # tokens tokenized past the kept ones, so a word cut at the prefix's end changes none of them


def read_text(path, limit=MAX_TEXT_CHARS):
    """The UTF-8 text to score, at most `limit` characters; a one-line error for a missing, non-text,
    directory, FIFO or device path, or a longer text."""
    with _open_text(path) as f:
        text = _read(f, path, limit + 1)
    if len(text) > limit:
        raise SwtoolError(f"{path}: longer than {limit >> 20} M characters; score a part of it with --max-tokens")
    return text


def text_token_ids(directory, path, max_tokens=None):
    """Token ids of the text file `path` (tokenizer.encode), reading only as much of it as
    `max_tokens` needs: a prefix, doubled until it holds TOKEN_MARGIN tokens more than kept."""
    from swtool.tokenizer import encode, load_tokenizer

    if max_tokens is None:
        return encode(directory, read_text(path))
    text, step, tokenizer = "", READ_STEP, load_tokenizer(directory)  # loaded once for every prefix
    with _open_text(path) as f:
        while True:
            chunk = _read(f, path, step)
            text += chunk
            ids = encode(directory, text, tokenizer)
            if not chunk or len(ids) >= max_tokens + TOKEN_MARGIN:
                return ids[:max_tokens]
            step *= 2


def _open_text(path):
    try:  # a missing path, a FIFO or a device: open_regular's one-line errors
        return io.TextIOWrapper(open_regular(path), encoding="utf-8")  # newlines as open() reads them
    except IsADirectoryError:
        raise SwtoolError(f"{path}: is a directory, expected a text file") from None


def _read(f, path, n):
    try:
        return f.read(n)
    except UnicodeDecodeError as e:
        raise SwtoolError(f"{path}: not UTF-8 text ({e})") from None

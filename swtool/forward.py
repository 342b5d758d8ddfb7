"""The streaming forward pass: one decoder layer's weights in memory at a time.

    x = embed(tokens)
    for layer in layers:              # weights read, decoded, used and dropped here
        x = block(layer, x)           # observers see activations as they flow
    logits = head(x)

Three kinds of plug-in:
  - weight transforms change a tensor as it is read, for every world
    (`ScaleElements` zeroes or scales chosen elements); a transform is a callable
    (name, float32 weight, rows, expert=None) -> weight with a `touches(name)`
    method, so tensors no transform touches can skip decoding (kernels.py);
  - observers receive activations at the observation points of arch/base.py
    (DOWN_IN, DOWN_OUT, RESID_MID, RESID: the down projection's input and output,
    the residual stream after attention and after the block), with shape
    [rows, tokens, channels]; recording any other point is an error. An observer with
    an `observe_expert` method also sees each expert of a mixture (see below), and one
    with an `observe_linear(name, expert, x)` method the input of every linear (LINEAR_IN:
    q/k/v/o, gate/up/down, routers, each expert's rows only), as that product multiplies it;
  - activation transforms change an activation as it flows: callables
    (point, layer, x, ctx) -> replacement or None, run before the observers at
    the same points. A replacement is written into x in place, so the block
    goes on with it (experiments.RestoreActivation writes a super activation back).
    One with a `linear_input(name, x, ctx)` method also sees the input of every
    linear and may return what that product uses instead, leaving x unchanged
    (quantsim.QuantizeActivations: simulated int8 inputs of the linears).

Mixtures of experts: a stacked tensor [experts, out, in] (transformers 5's fused
`mlp.experts.down_proj`) is used one expert at a time, `linear(x, name, expert=e)`
reading only the 2-D slice e; `rows`, `Edit.row/col` then address that slice.

Worlds are extra batch rows: the same prompt through models that differ by a few
edited weights (the intact model, the model without candidate A, ...). An edit
of W[j, m] changes only output channel j of that linear by (f - 1)·W[j, m]·x[m],
so all worlds share one read of each weight. A world of a mixture may also remove
whole experts (`DropExpert`): the router masks their logits in that world's rows
(`Pass.drop_experts`, moe.Mixture.routed).

Batch rows: tokens [T] is one sequence, tokens [B, T] are B sequences of equal
length (the chunks of a text, for perplexity). Every world runs every sequence:
row r = world r // B, sequence r % B, so the activations are [W·B, T, channels]
(with one sequence, row = world, as a scan has it). `Pass.rows_of_world(w)`
gives a world's rows; `Pass.world_of_row` maps rows back.

`run_layers` stops before the LM head; `head_logits` then yields the logits a
block of rows or positions at a time, so a long text never holds [rows, T, vocab] floats at once.
"""

from dataclasses import dataclass, field

import numpy as np

from swtool import kernels
from swtool.arch.base import DOWN_IN, DOWN_OUT, POINTS
from swtool.checkpoint.transposed import TransposedTensor
from swtool.errors import SwtoolError

LINEAR_CHUNK_BYTES = 256 * 1024 * 1024  # decode larger matrices (e.g. a 128k-vocab head) in row chunks
# the stored dtypes kernels.matmul_stored multiplies from (GGUF block types through kernels/gguf_blocks.py)
FUSED_DTYPES = ("BF16", "F16", "F32") + kernels.BLOCK_TYPES


@dataclass(frozen=True)
class Edit:
    """Multiply one element W[row, col] of a 2-D weight by `factor` (0 removes it).

    `expert`: the mixture expert the element belongs to. For a stacked tensor
    [experts, out, in] it selects the slice, so the element is W[expert, row, col];
    for a per-expert 2-D tensor (`...experts.3.w2.weight`) the name already says
    which expert, and `expert` is only a label.
    """

    tensor: str
    row: int
    col: int
    factor: float = 0.0
    expert: int | None = None

    def applies(self, expert):
        """Does this edit hit the matrix that linear(..., expert=expert) multiplies by?"""
        if expert is None:
            return True  # a 2-D tensor: the name alone says which matrix
        if self.expert is None:
            raise SwtoolError(f"edit of {self.tensor}[{self.row}, {self.col}]: that tensor stacks "
                              f"experts [experts, out, in], so the edit must name its expert")
        return self.expert == expert


@dataclass(frozen=True)
class DropExpert:
    """Remove mixture expert `expert` of layer `layer`: the router never chooses it.

    Its router logit is -inf before the softmax and the top-k, so each token goes to
    the next most probable experts and their weights are computed as the family
    computes them (moe.Mixture.route: divided by their sum where the family
    normalises, the softmax over the remaining experts otherwise). A world edit like
    `Edit`; the expert's weights are not read for that world's rows.
    """

    layer: int
    expert: int


@dataclass(frozen=True)
class World:
    """One version of the model in a batched pass: the intact weights plus `edits`."""

    name: str
    edits: tuple = ()


@dataclass
class ScaleElements:
    """Weight transform: multiply chosen elements as their tensor is read (every world)."""

    edits: list = field(default_factory=list)

    def touches(self, name):
        return any(edit.tensor == name for edit in self.edits)

    def __call__(self, name, weight, rows=None, expert=None):
        for edit in self.edits:
            if edit.tensor != name or not edit.applies(expert):
                continue
            local_row = _local_row(edit.row, rows, weight.shape[0])
            if local_row is not None:
                weight[local_row, edit.col] *= np.float32(edit.factor)
        return weight


def _local_row(row, rows, n_rows):
    """Where global row `row` sits in an array holding `rows` (None = all rows), or None."""
    if rows is None:
        return row if row < n_rows else None
    if isinstance(rows, slice):
        start = rows.start or 0
        return row - start if start <= row < start + n_rows else None
    hits = np.flatnonzero(np.asarray(rows) == row)
    return hits if hits.size else None


class Pass:
    """What a block sees during one forward pass: weights, edits, observers, per-pass cache."""

    def __init__(self, checkpoint, worlds, n_tokens, transforms=(), observers=(), activation_transforms=(),
                 n_sequences=1):
        self.checkpoint = checkpoint
        self.worlds = list(worlds)
        self.n_tokens = n_tokens
        self.n_sequences = n_sequences
        self.transforms = list(transforms)
        self.observers = list(observers)
        self.activation_transforms = list(activation_transforms)
        self.cache = {}
        # batch row r runs sequence r % B through world r // B
        self.world_of_row = np.repeat(np.arange(len(self.worlds)), n_sequences)
        # per tensor: [(world index, edit)], so a linear finds its edits at once
        self.edits = {}
        self.dropped = {}  # layer -> [(world index, expert)]: DropExpert edits, for the router
        for w, world in enumerate(self.worlds):
            for edit in world.edits:
                if isinstance(edit, DropExpert):
                    self.dropped.setdefault(edit.layer, []).append((w, edit.expert))
                else:
                    self.edits.setdefault(edit.tensor, []).append((w, edit))

    def _transformed(self, name, weight, rows=None, expert=None):
        for transform in self.transforms:
            weight = transform(name, weight, rows, expert=expert)
        return weight

    def weight(self, name):
        """A whole tensor as float32, transforms applied."""
        return self._transformed(name, self.checkpoint.tensor(name).read())

    def rows_of_world(self, w):
        """The batch rows of world w: its B sequences."""
        return slice(w * self.n_sequences, (w + 1) * self.n_sequences)

    def embedding(self, name, tokens):
        """Rows `tokens` ([T] or [B, T]) of an embedding matrix, for every world: [W·B, T, hidden]."""
        info = self.checkpoint.tensor(name)
        if len(info.shape) != 2 or int(np.max(tokens)) >= info.shape[0]:
            raise SwtoolError(f"{info.path}: {name} has shape {list(info.shape)}, "
                              f"too small for token id {int(np.max(tokens))}")
        sequences = np.asarray(tokens).reshape(-1, self.n_tokens)  # [B, T]
        flat = sequences.reshape(-1)
        rows = self._transformed(name, info.read(rows=flat), rows=flat).reshape(sequences.shape + (-1,))
        return np.tile(rows, (len(self.worlds), 1, 1))

    def linear(self, x, name, bias=False, world=None, expert=None, transposed=False, positions=None):
        """x @ W.T (+ b) for [W, T, in] -> [W, T, out], with each world's edits of W applied.

        With `world=w`, x is [1, T', in]: rows of world w only (e.g. the tokens one
        expert of a mixture receives), and only world w's edits apply. `world` may
        also be an int array [T'] naming each row's batch row (its world when B = 1):
        rows of several worlds gathered into one product, so the weight is still read once.
        With `expert=e`, W is slice e of the stacked tensor `name` [experts, out, in].
        With `transposed=True`, `name` is stored [in, out] (GPT-2's Conv1D) and W is its
        transpose: edits and transforms still address W[row = output, col = input].
        `positions` (with `world`): the token position of each of x's rows, for the observers.
        """
        info = self.checkpoint.tensor(name)
        if expert is not None:
            info = info.sub(expert)
        if transposed:
            info = TransposedTensor(info)  # reads W's rows from the stored columns
        if len(info.shape) != 2 or info.shape[1] != x.shape[-1]:
            raise SwtoolError(f"{info.path}: {name} has shape {list(info.shape)}, "
                              f"expected [*, {x.shape[-1]}]")
        n_out, n_in = info.shape
        x = self._linear_input(name, x)
        self.observe_linear(name, expert, x, world, positions)
        x2 = np.ascontiguousarray(x.reshape(-1, n_in), dtype=np.float32)
        out = np.empty((x2.shape[0], n_out), dtype=np.float32)
        # few rows and an untouched weight: multiply straight from the stored bits (kernels.py)
        # (a transform needs the decoded weight: it goes through read() + BLAS, as long inputs do)
        fused = (kernels.fused_pays_off(x2.shape[0], info.dtype) and info.dtype in FUSED_DTYPES
                 and not any(t.touches(name) for t in self.transforms))
        chunk = max(1, LINEAR_CHUNK_BYTES // (4 * n_in))
        for start in range(0, n_out, chunk):
            rows = slice(start, min(n_out, start + chunk))
            if fused:
                out[:, rows] = info.with_stored(lambda w: kernels.matmul_stored(x2, w, info.dtype), rows)
            else:
                weight = self._transformed(name, info.read(rows=rows), rows, expert)
                np.matmul(x2, weight.T, out=out[:, rows])
                del weight
        out = out.reshape(x.shape[:-1] + (n_out,))
        self._apply_edits(out, x, name, info, world, expert)
        if bias:
            out += self.weight(name[: -len("weight")] + "bias")
        return out

    def drop_experts(self, layer, logits):
        """Router logits [rows, T, experts] of `layer` with each world's removed experts (DropExpert) at -inf."""
        for w, expert in self.dropped.get(layer, ()):
            logits[self.world_of_row == w, :, expert] = -np.inf
        return logits

    def _apply_edits(self, out, x, name, info, world=None, expert=None):
        """World edits of W[j, m] change output j by (f - 1) * W[j, m] * x[m], world by world."""
        for w, edit in self.edits.get(name, ()):
            if not edit.applies(expert):
                continue  # an edit of another expert's slice of this stacked tensor
            if world is None:
                at = (self.world_of_row == w, slice(None))  # x's first axis is the batch row
            else:
                # `world` names the batch row of each of x's rows (= the world when B = 1)
                at = (0, np.broadcast_to(self.world_of_row[np.asarray(world)] == w, x.shape[1]))
            rows = [edit.row]
            value = self._transformed(name, info.read(rows=rows), rows, expert)[0, edit.col]
            out[at + (edit.row,)] += (np.float32(edit.factor) - 1) * value * x[at + (edit.col,)]

    def _linear_input(self, name, x):
        """What linear `name` multiplies: x, or what activation transforms with a `linear_input`
        method make of it (a new array for this product only, e.g. quantized; x itself is kept)."""
        for transform in self.activation_transforms:
            if hasattr(transform, "linear_input"):
                replacement = transform.linear_input(name, x, self)
                if replacement is not None:
                    x = replacement
        return x

    def observe(self, point, layer, x):
        """Activation transforms may replace x (in place, so the caller's array changes), then observers look."""
        if point not in POINTS:
            raise ValueError(f"unknown observation point {point!r} (known: {', '.join(POINTS)})")
        for transform in self.activation_transforms:
            replacement = transform(point, layer, x, self)
            if replacement is not None and replacement is not x:
                x[...] = replacement
        for observer in self.observers:
            observer.observe(point, layer, x)
        return x

    def observe_linear(self, name, expert, x, world=None, positions=None):
        """LINEAR_IN (arch/base.py): the input x of linear `name` (slice `expert` of a stacked tensor, or
        None) as it is multiplied, for the observers that look at every linear's input (swtool/imatrix.py).
        `world`, `positions`: as Pass.linear has them (x [1, N, in] holds rows of several batch rows)."""
        for observer in self.observers:
            if hasattr(observer, "observe_linear"):
                observer.observe_linear(name, expert, x, world=world, positions=positions)

    def observe_expert(self, point, layer, expert, routed, x):
        """Expert `expert` of layer `layer` at `point` (DOWN_IN, DOWN_OUT): x [N, channels]
        holds only the rows routed to it, row n being token routed.token[n] of world routed.world[n]."""
        if point not in (DOWN_IN, DOWN_OUT):
            raise ValueError(f"unknown observation point of an expert {point!r} (known: {DOWN_IN}, {DOWN_OUT})")
        for observer in self.observers:
            if hasattr(observer, "observe_expert"):
                observer.observe_expert(point, layer, expert, routed, x)


def forward(model, tokens, worlds=None, transforms=(), observers=(), progress=None, activation_transforms=()):
    """Logits [worlds, tokens, vocab] of `tokens` through `model`, one layer at a time.

    tokens [B, T] gives [worlds·B, T, vocab] (see "Batch rows" above).
    `progress`: None, or a label for a per-layer progress bar on stderr.
    """
    ctx, x = run_layers(model, tokens, worlds, transforms, observers, progress, activation_transforms)
    return model.arch.head(ctx, x)


def layer_progress(layers, label):
    """`layers`, with a per-layer progress bar on stderr when `label` is given and stderr is a terminal
    (swtool/progress.py; tqdm is imported only then: a command run with --no-progress does not load it)."""
    if label is None:
        return layers
    from swtool.progress import progress_bar

    return progress_bar(layers, desc=label, unit="layer", leave=False)


def run_layers(model, tokens, worlds=None, transforms=(), observers=(), progress=None, activation_transforms=()):
    """Every decoder layer, not the head: (the pass's ctx, final residual stream [rows, T, hidden])."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim not in (1, 2) or tokens.shape[-1] == 0:
        raise SwtoolError(f"tokens must be [T] or [B, T] with T >= 1, got shape {list(tokens.shape)}")
    n_sequences = 1 if tokens.ndim == 1 else tokens.shape[0]
    ctx = Pass(model.checkpoint, worlds or [World("intact")], tokens.shape[-1], transforms, observers,
               activation_transforms, n_sequences)
    arch = model.arch
    x = arch.embed(ctx, tokens)
    for layer in layer_progress(range(arch.n_layers), progress):
        x = arch.block(ctx, layer, x)
    return ctx, x


def head_logits(model, ctx, x, max_bytes=256 * 1024 * 1024):
    """Yield (rows, tokens, logits [rows, tokens, vocab]) over x: at most `max_bytes` of logits at a time.

    Whole rows when several fit in max_bytes, else slices of one row's positions: the head
    (final norm, LM head) works position by position, so a slice gives the same numbers.
    """
    n_rows, n_tokens = x.shape[:2]
    per_token = model.arch.vocab_size * 4
    budget = max(1, max_bytes // per_token)  # positions per block
    rows_per_block = max(1, budget // n_tokens)
    tokens_per_block = min(n_tokens, budget)
    whole = ctx.world_of_row
    for start in range(0, n_rows, rows_per_block):
        rows = slice(start, min(n_rows, start + rows_per_block))
        for first in range(0, n_tokens, tokens_per_block):
            tokens = slice(first, min(n_tokens, first + tokens_per_block))
            # the head sees a sub-batch: its world edits (if any) must follow those rows
            ctx.world_of_row = whole[rows]
            try:
                yield rows, tokens, model.arch.head(ctx, x[rows, tokens])
            finally:
                ctx.world_of_row = whole


def mean_nll(logits, tokens):
    """Mean negative log-likelihood of tokens[1:] given the prefix, per world: [W]."""
    tokens = np.asarray(tokens)
    if len(tokens) < 2:
        raise SwtoolError("the prompt must have at least 2 tokens to score its likelihood")
    from swtool.ops import log_softmax

    logp = log_softmax(logits[:, :-1, :])
    picked = np.take_along_axis(logp, tokens[None, 1:, None], axis=-1)[..., 0]
    return -picked.mean(axis=1)


def greedy(model, tokens, n_new, transforms=()):
    """Greedy continuation: recompute the whole sequence per new token (a scan-sized tool, not a server)."""
    tokens = list(tokens)
    for _ in range(n_new):
        logits = forward(model, tokens, transforms=transforms)
        tokens.append(int(np.argmax(logits[0, -1])))
    return tokens

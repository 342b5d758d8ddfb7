"""One streaming pass for worlds that fork at the layer where they start to differ.

A world is the model with a few down-projection weights zeroed (or, in a mixture,
a few experts removed: forward.DropExpert). Its key is the set of its edits, each
with its layer: frozenset({(layer, Edit or DropExpert), ...}). Worlds
agree with each other up to the first layer one of them edits, so a world's
activations at layer l depend only on its edits at layers <= l, its *prefix*
at l. The pass computes each distinct prefix once:

    layer 0 1 2 3 4 5 ...
    {}      o o o o o o     the intact model
    {A@2}       o o o o     forks from {} at layer 2, where A is
    {A@2, B@4}      o o     forks from {A@2} at layer 4

A world that appears while the pass is at layer l (scan finds a weight there)
forks by running block l again for its rows alone, from its parent's output of
layer l - 1: one layer's weights are read twice, never the layers before.
A world needed after the pass ended (`complete`) is computed from the last
layer where its prefix exists, so it re-reads only the layers after that.

All the rows of a layer go through one block call (`compute`), as extra batch
rows of the same weights (forward.py's worlds).

Several prompts share the pass the same way: each prompt has its own worlds
(`Lane`, one per prompt, keys as above), and one block call runs the rows of
every prompt's worlds. Prompts of different lengths are padded on the right to
the longest: attention is causal, so a real token never sees the padding after
it, positions start at 0 in every row as in a pass of that prompt alone, and the
padded positions are cut off before an observer or the NLL sees them. A prompt's
numbers are therefore those of a pass of that prompt alone, up to float32
rounding in products of another shape (tests/test_scan_prompts.py measures it).
RoPE with dynamic NTK or longrope scaling changes its frequencies with the
length past the trained context: prompts that long are refused in a mixed batch.

Two ways to read from disk faster were tried and measured, and left out:
reading ahead (posix_fadvise WILLNEED on the next layers' bytes, from a
background thread: 7B shape from disk 52 and 59 s with it, 48 and 60 s without;
the memory maps' own read-ahead already keeps the disk busy), and asking for
huge pages (MADV_HUGEPAGE: faster on the 1B shape, 6.3 vs 7.4-13.5 s, but on
the 7B shape, whose file nearly fills the page cache, 52 and 111 s against 64
and 42 s: direct compaction under memory pressure).
"""

import numpy as np

from swtool.arch.rope import length_limit
from swtool.errors import SwtoolError
from swtool.forward import DropExpert, Pass, World, layer_progress


def prefix(key, layer):
    """The edits of world `key` at layers <= `layer`: what its rows at `layer` depend on."""
    return frozenset(edit for edit in key if edit[0] <= layer)


class ForkingPass:
    """Per layer, the residual stream after the layer of every world prefix computed so far, of every prompt.

    `prompts`: token ids of one prompt [T], or a list of prompts (each [T_p]);
    `observer`: one observer, or one per prompt. Each gets its prompt's worlds'
    activations, one world at a time, padding cut off: observe(point, layer, key,
    x [T_p, channels]) and, for mixtures, observe_expert(point, layer, expert, key,
    tokens, router_weights, x [n, channels]).

    With one prompt, keys are world keys. With several, the pass's own keys are
    (prompt index, world key); `lane(p)` gives prompt p a view that takes plain world keys.

    `linear_observer`: an observer with `observe_linear(name, expert, x)` (forward.py's LINEAR_IN)
    that sees the input of every linear in the intact model only, every prompt's real tokens as rows
    of one x (no world with a weight zeroed, no padding): what a pass of the prompts alone would
    show it, so an importance matrix (imatrix.Collector) comes with the scan's one read of the weights.
    """

    def __init__(self, model, prompts, observer, linear_observer=None):
        self.model = model
        self.arch = model.arch
        single = np.ndim(prompts[0]) == 0  # one prompt: [T] token ids
        self.single = single
        self.prompts = [np.asarray(p, dtype=np.int64) for p in ([prompts] if single else prompts)]
        self.observers = [observer] if single else list(observer)
        self.linear_observer = linear_observer
        self.lengths = [len(p) for p in self.prompts]
        self.n_tokens = max(self.lengths)
        limit = length_limit(model.checkpoint.config)
        if limit is not None and self.n_tokens > limit and min(self.lengths) < self.n_tokens:
            raise SwtoolError(f"a prompt of {self.n_tokens} tokens is longer than the {int(limit)} up to which this "
                              f"model's RoPE frequencies do not depend on the length: padded with shorter "
                              f"prompts, those would not be scanned as alone; scan it alone")
        # right padding with each prompt's first token (a valid id): causal attention keeps it out of the real tokens
        self.tokens = np.stack([np.concatenate([p, np.full(self.n_tokens - len(p), p[0], dtype=np.int64)])
                                for p in self.prompts])
        self.cache = {}  # shared by every block call of the pass (e.g. RoPE tables for these positions)
        self.outputs = [{} for _ in range(self.arch.n_layers)]  # layer -> {(prompt, prefix): residual [T, hidden]}
        self.blocks_run = 0  # layer computations, forks included: n_layers x (weight reads)
        self.rounds = 0  # calls of `complete` that had to compute something
        self.embedded = self._embed()

    def lane(self, p):
        """Prompt p's view of the pass, with plain world keys."""
        return Lane(self, p)

    def _pairs(self, keys):
        """(prompt, world key) pairs: the keys as given when there are several prompts, prompt 0's otherwise."""
        return [(0, key) for key in keys] if self.single else list(keys)

    def _context(self, worlds, observers=()):
        ctx = Pass(self.model.checkpoint, worlds, self.n_tokens, observers=observers)
        ctx.cache = self.cache
        return ctx

    def _embed(self):
        """The embedded prompts [prompts, T, hidden]: every world starts from its prompt's (edits are in
        down projections only)."""
        ctx = self._context([World("intact")])
        return np.stack([self.arch.embed(ctx, tokens)[0] for tokens in self.tokens])

    def computed(self, key, layer):
        p, key = self._pairs([key])[0]
        return (p, prefix(key, layer)) in self.outputs[layer]

    def output(self, key, layer):
        """World `key`'s residual stream after `layer` [T, hidden] (T: the padded length)."""
        p, key = self._pairs([key])[0]
        return self.outputs[layer][p, prefix(key, layer)]

    def compute(self, layer, keys):
        """Run block `layer` for the worlds among `keys` whose prefix at `layer` is not computed yet.

        Their input, the prefix at layer - 1, must be computed (true for worlds that
        existed at the layer before, and for any world once `complete` reaches here).
        """
        todo = sorted({(p, prefix(key, layer)) for p, key in self._pairs(keys)} - set(self.outputs[layer]),
                      key=lambda pair: (pair[0], world_order(pair[1])))
        if not todo:
            return
        inputs = np.stack([self.embedded[p] if layer == 0 else self.outputs[layer - 1][p, prefix(key, layer - 1)]
                           for p, key in todo])
        # each world's edits of this layer apply inside its down projection (forward.Pass._apply_edits)
        worlds = [World(f"world {i}", tuple(edit for at, edit in key if at == layer)) for i, (_, key) in enumerate(todo)]
        ctx = self._context(worlds, [_PerWorld(self.observers, todo, self.lengths, self.linear_observer)])
        x = self.arch.block(ctx, layer, inputs)
        for pair, rows in zip(todo, x):
            self.outputs[layer][pair] = rows
        self.blocks_run += 1

    def complete(self, keys, progress=None):
        """Compute `keys` through the last layer, each from the last layer where its prefix exists."""
        start = min((self._first_missing(key) for key in keys), default=self.arch.n_layers)
        if start == self.arch.n_layers:
            return
        self.rounds += 1
        for layer in layer_progress(range(start, self.arch.n_layers), progress):
            self.compute(layer, keys)

    def _first_missing(self, key):
        for layer in range(self.arch.n_layers):
            if not self.computed(key, layer):
                return layer
        return self.arch.n_layers

    def logits(self, keys):
        """{key: logits [T_p, vocab]} of complete worlds (padding cut off), through the head in one batch."""
        keys = list(keys)
        last = self.arch.n_layers - 1
        x = np.stack([self.output(key, last) for key in keys])
        logits = self.arch.head(self._context([World(f"world {i}") for i in range(len(keys))]), x)
        return {key: rows[:self.lengths[p]] for key, (p, _), rows in zip(keys, self._pairs(keys), logits)}


class Lane:
    """Prompt p's view of a ForkingPass of several prompts: the pass's methods, with plain world keys."""

    def __init__(self, stream, p):
        self.stream, self.p = stream, p
        self.arch = stream.arch

    def pair(self, key):
        return key if self.stream.single else (self.p, key)

    def computed(self, key, layer):
        return self.stream.computed(self.pair(key), layer)

    def output(self, key, layer):
        return self.stream.output(self.pair(key), layer)

    def compute(self, layer, keys):
        self.stream.compute(layer, [self.pair(key) for key in keys])

    def complete(self, keys, progress=None):
        self.stream.complete([self.pair(key) for key in keys], progress)

    def logits(self, keys):
        keys = list(keys)
        return dict(zip(keys, self.stream.logits([self.pair(key) for key in keys]).values()))


def world_order(key):
    """A stable order of world keys in a batch: fewer edits first, then by position."""
    return (len(key), sorted(_edit_order(at, edit) for at, edit in key))


def _edit_order(at, edit):
    if isinstance(edit, DropExpert):  # a removed expert: before the weight edits of its layer
        return (at, "", -1, -1, edit.expert)
    return (at, edit.tensor, edit.row, edit.col, edit.expert or -1)


class _PerWorld:
    """Observer adapter: splits a batch's activations into its worlds (batch row i is (prompt, key) todo[i]),
    cutting off each prompt's padding, and hands each to its prompt's observer."""

    def __init__(self, observers, todo, lengths, linear_observer=None):
        self.observers = observers
        self.todo = todo
        self.lengths = lengths
        self.linear_observer = linear_observer
        self.intact = np.array([not key for _, key in todo])  # the intact world's prefix is the empty set
        self.row_lengths = np.array([lengths[p] for p, _ in todo])

    def observe(self, point, layer, x):
        for (p, key), rows in zip(self.todo, x):
            self.observers[p].observe(point, layer, key, rows[:self.lengths[p]])

    def observe_linear(self, name, expert, x, world=None, positions=None):
        """The intact world's real tokens of every prompt, as the rows of one array, to the linear observer."""
        if self.linear_observer is None or not self.intact.any():
            return
        if world is None:  # x [rows, T, in]: batch row i is todo[i]
            rows = np.concatenate([x[i, :self.row_lengths[i]] for i in np.flatnonzero(self.intact)])
        else:  # x [1, N, in]: row n is token positions[n] of batch row world[n]
            world = np.asarray(world)
            rows = x[0, self.intact[world] & (np.asarray(positions) < self.row_lengths[world])]
        if len(rows):
            self.linear_observer.observe_linear(name, expert, rows)

    def observe_expert(self, point, layer, expert, routed, x):
        for i, (p, key) in enumerate(self.todo):
            mine = (routed.world == i) & (routed.token < self.lengths[p])
            if mine.any():
                self.observers[p].observe_expert(point, layer, expert, key, routed.token[mine],
                                                 routed.weight[mine], x[mine])

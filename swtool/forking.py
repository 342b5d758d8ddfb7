"""One streaming pass for worlds that fork at the layer where they start to differ.

A world is the model with a few down-projection weights zeroed. Its key is the
set of its edits, each with its layer: frozenset({(layer, Edit), ...}). Worlds
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

Two ways to read from disk faster were tried and measured, and left out:
reading ahead (posix_fadvise WILLNEED on the next layers' bytes, from a
background thread: 7B shape from disk 52 and 59 s with it, 48 and 60 s without;
the memory maps' own read-ahead already keeps the disk busy), and asking for
huge pages (MADV_HUGEPAGE: faster on the 1B shape, 6.3 vs 7.4-13.5 s, but on
the 7B shape, whose file nearly fills the page cache, 52 and 111 s against 64
and 42 s: direct compaction under memory pressure).
"""

import numpy as np

from swtool.forward import Pass, World, layer_progress


def prefix(key, layer):
    """The edits of world `key` at layers <= `layer`: what its rows at `layer` depend on."""
    return frozenset(edit for edit in key if edit[0] <= layer)


class ForkingPass:
    """Per layer, the residual stream after the layer of every world prefix computed so far.

    `observer` gets each world's activations, one world at a time:
    observe(point, layer, key, x [T, channels]) and, for mixtures,
    observe_expert(point, layer, expert, key, tokens, router_weights, x [n, channels]).
    """

    def __init__(self, model, tokens, observer):
        self.model = model
        self.arch = model.arch
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.observer = observer
        self.cache = {}  # shared by every block call of the pass (e.g. RoPE tables for these tokens)
        self.outputs = [{} for _ in range(self.arch.n_layers)]  # layer -> {prefix: residual [T, hidden]}
        self.blocks_run = 0  # layer computations, forks included: n_layers x (weight reads)
        self.rounds = 0  # calls of `complete` that had to compute something
        self.embedded = self._embed()

    def _context(self, worlds, observers=()):
        ctx = Pass(self.model.checkpoint, worlds, len(self.tokens), observers=observers)
        ctx.cache = self.cache
        return ctx

    def _embed(self):
        """The embedded prompt [T, hidden]: every world starts from it (edits are in down projections only)."""
        return self.arch.embed(self._context([World("intact")]), self.tokens)[0]

    def computed(self, key, layer):
        return prefix(key, layer) in self.outputs[layer]

    def output(self, key, layer):
        """World `key`'s residual stream after `layer` [T, hidden]."""
        return self.outputs[layer][prefix(key, layer)]

    def compute(self, layer, keys):
        """Run block `layer` for the worlds among `keys` whose prefix at `layer` is not computed yet.

        Their input, the prefix at layer - 1, must be computed (true for worlds that
        existed at the layer before, and for any world once `complete` reaches here).
        """
        todo = sorted({prefix(key, layer) for key in keys} - set(self.outputs[layer]), key=world_order)
        if not todo:
            return
        inputs = np.stack([self.embedded if layer == 0 else self.outputs[layer - 1][prefix(key, layer - 1)]
                           for key in todo])
        # each world's edits of this layer apply inside its down projection (forward.Pass._apply_edits)
        worlds = [World(f"world {i}", tuple(edit for at, edit in key if at == layer)) for i, key in enumerate(todo)]
        ctx = self._context(worlds, [_PerWorld(self.observer, todo)])
        x = self.arch.block(ctx, layer, inputs)
        for key, rows in zip(todo, x):
            self.outputs[layer][key] = rows
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
        """{key: logits [T, vocab]} of complete worlds, through the head in one batch."""
        keys = list(keys)
        last = self.arch.n_layers - 1
        x = np.stack([self.output(key, last) for key in keys])
        logits = self.arch.head(self._context([World(f"world {i}") for i in range(len(keys))]), x)
        return dict(zip(keys, logits))


def world_order(key):
    """A stable order of world keys in a batch: fewer edits first, then by position."""
    return (len(key), sorted((at, edit.tensor, edit.row, edit.col, edit.expert or -1) for at, edit in key))


class _PerWorld:
    """Observer adapter: splits a batch's activations into its worlds (batch row i is world keys[i])."""

    def __init__(self, observer, keys):
        self.observer = observer
        self.keys = keys

    def observe(self, point, layer, x):
        for key, rows in zip(self.keys, x):
            self.observer.observe(point, layer, key, rows)

    def observe_expert(self, point, layer, expert, routed, x):
        for i, key in enumerate(self.keys):
            mine = routed.world == i
            if mine.any():
                self.observer.observe_expert(point, layer, expert, key, routed.token[mine], routed.weight[mine],
                                             x[mine])

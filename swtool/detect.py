"""Data-free super-weight detection from one prompt (Yu et al. 2024, section 3).

A super weight W[j, m] of some layer's down projection turns a large
intermediate activation (input channel m) into a massive output in channel j
that persists down the residual stream: a super activation. So, per pass:

  1. record every layer's down_proj input and output and the residual stream;
  2. a layer spikes when its largest |output| stands out against the other
     layers' (a ratio to their median, not a fixed threshold);
  3. keep spikes that *create* a massive residual value which then persists,
     dropping late-layer spikes that cancel an existing one;
  4. the columns are chosen by contribution |x[t, m] * W[j, m]| to the spike,
     so two weights feeding one spike are both found;
  5. zero what was found and run again until no spike remains (max_iter).

The worlds those steps look at (intact, all found removed, each found weight
removed alone) run side by side as extra batch rows, and all in ONE read of the
checkpoint (forking.py): a world forks at the layer of its first zeroed weight,
while the pass is there. Which worlds to fork is decided online, as the pass
goes (`OnlineSearch`); the decisions that count are then made once more on the
recorded activations of whole worlds, exactly as passes 1, 2, ... of step 5
would make them (`_decide`), and a world the online guess missed is computed
then, from the layer where it departs from one the pass has. The last worlds
also yield the verification: the prompt's mean NLL and the super activation
with each weight zeroed vs intact.

Several prompts (`scan_prompts`) are scanned in the same single read: each has
its own worlds, recorder, online search and decisions, exactly as a scan of that
prompt alone, and their rows share every block call (forking.py's lanes; the
prompts are padded to the longest, which causal attention keeps out of the real
tokens). `merge_prompts` then lists each candidate once, with in how many prompts
it was found and verified; it counts as verified when verified in more than half
of the prompts (VERIFIED_RULE).

Blocks that renormalise the MLP's output (Gemma 2/3, OLMo 2: `Architecture.mlp_output_norm`) cap a
spike at about sqrt(hidden) x the norm's gain before it reaches the residual. Steps 1-5 look at the
raw down_proj output, so a spike whose gain lets it through is a super weight as anywhere; one the
norm caps fails step 2, and its outlier weights are listed apart (`renormalised_spikes`, the
catalog's renormalised_spikes): not super weights, with the spike's size before and after the norm.

Mixtures of experts (Mixtral): a layer has one down projection per expert, and
each sees only the tokens routed to it. The layer's output is then the
router-weighted sum of its experts' down projections; a spike in it is traced to
columns of every expert its token was routed to, by contribution
router weight * x[t, m] * W[j, m], so a super weight is found inside one expert
and the catalog names that expert. A shared expert (Qwen2-MoE) sees every token and
is scaled by its sigmoid gate: it is one more source of the spike, judged by
gate * x[t, m] * W[j, m]; its down projection is a plain 2-D matrix
(`mlp.shared_expert.down_proj.weight`), so its catalog entry has expert null.
A mixture's scan also lists its super experts, whole experts whose down projection
makes the largest outputs, and verifies each by removing it (experts.py).
"""

from dataclasses import asdict, dataclass, field

import numpy as np

from swtool import kernels
from swtool.arch.base import DOWN_IN, DOWN_OUT, POINTS, RESID, RESID_MID
from swtool.arch.moe import SHARED
from swtool.checkpoint.transposed import TransposedTensor
from swtool.coordinate import Coordinate
from swtool.errors import SwtoolError
from swtool.forking import ForkingPass, prefix, world_order
from swtool.forward import Edit, layer_progress, mean_nll


@dataclass
class Settings:
    prompt: str
    max_iter: int = 8
    spike_ratio: float = 10.0  # a layer's max |down_proj output| over the median layer's
    min_contribution: float = 0.2  # a column must supply this share of the spike
    min_weight_sigma: float = 6.0  # and its weight be an outlier: |W[j, m]| >= this many RMS of the tensor
    persist_layers: int = 2  # the super activation must survive this many later layers ...
    persist_fraction: float = 0.5  # ... at this fraction of its size
    verify_activation_drop: float = 0.5  # verified if zeroing leaves < this share of the super activation
    verify_nll_rise: float = 0.1  # ... or raises the prompt's mean NLL by this many nats


@dataclass
class SuperWeight:
    layer: int
    row: int
    col: int
    expert: int | None  # the mixture expert whose down projection holds it; None for a dense MLP or shared expert
    tensor: str  # Hugging Face name; a stacked-experts tensor holds it at [expert, row, col]
    gguf_tensor: str  # llama.cpp name; ffn_down_exps stacks experts: element [expert, row, col]
    value: float
    dtype: str
    rank: int  # 1 = largest |value| in its tensor
    token: int  # position of the spike in the prompt
    input_activation: float  # down_proj input x[token, col] (the expert's, for a mixture)
    output_activation: float  # down_proj output y[token, row] (for a mixture: the experts' weighted sum)
    contribution: float  # x[token, col] * W[row, col], times router_weight for an expert or shared expert
    super_activation: float  # residual stream [token, row] after the layer, intact model
    iteration: int
    # the expert's routing weight at `token` (a shared expert's: its sigmoid gate); None for a dense MLP
    router_weight: float | None = None
    # the element's index in `tensor` as stored: [row, col]; [col, row] for a Conv1D weight
    # stored [in, out] (GPT-2); [expert, row, col] in a stacked-experts tensor
    tensor_index: list | None = None
    verification: dict = field(default_factory=dict)
    # across the prompts of a scan (merge_prompts): in how many it was found, and verified; and per
    # prompt, null where not found, else that prompt's token, activations, iteration and verification
    found_in: int | None = None
    verified_in: int | None = None
    per_prompt: list | None = None

    @property
    def at(self):
        return Coordinate(self.layer, self.row, self.col, self.expert)

    def to_json(self):
        return asdict(self)


RENORMALISED = "renormalised"  # why a RenormalisedSpike is not a super weight (the table: weak: renormalised)


@dataclass
class RenormalisedSpike:
    """An outlier weight feeding a down_proj output spike that the block's output norm caps
    (`Architecture.mlp_output_norm`): the spike reaches the residual stream rescaled, creates no
    massive activation there, and so is not a super weight (`renormalised_spikes`)."""

    layer: int
    row: int
    col: int
    expert: int | None
    tensor: str
    gguf_tensor: str
    value: float
    dtype: str
    rank: int
    token: int
    input_activation: float  # down_proj input x[token, col]
    output_activation: float  # down_proj output y[token, row]: the spike, before the norm
    contribution: float  # x[token, col] * W[row, col]
    after_norm: float  # what the norm passes on to the residual at [token, row]
    residual: float  # residual stream [token, row] after the layer
    norm: str  # the norm's weight tensor (Hugging Face name)
    reason: str = RENORMALISED
    tensor_index: list | None = None
    # across the prompts of a scan (merge_renormalised): in how many it was found, and per prompt
    # null where not found, else that prompt's token and activations
    found_in: int | None = None
    per_prompt: list | None = None

    def to_json(self):
        return asdict(self)


def world_key(removed):
    """The key of the world with these SuperWeights zeroed (forking.py): {(layer, Edit)}."""
    return frozenset((sw.layer, Edit(sw.tensor, sw.row, sw.col, 0.0, sw.expert)) for sw in removed)


INTACT = frozenset()


class Recorder:
    """Observer keeping each layer's down_proj input/output and residual stream, per world prefix.

    A world's activations at layer l are stored under its prefix at l (forking.py),
    so worlds that agree up to l share them. A mixture layer has no single
    down_proj input: its experts' inputs are kept per (layer, expert), for the
    tokens routed to each (`experts`); a shared expert's under the label SHARED.
    """

    def __init__(self):
        self.data = {point: {} for point in POINTS}  # point -> layer -> {prefix: [T, channels]}
        self.experts = {}  # layer -> {prefix: {expert: (tokens, router weights, down_in [n, ff])}}
        self.peaks = {}  # layer -> {prefix: max |down_proj output|}
        # layer -> {prefix: {expert: (max |y|, token, channel, y there)}}: each expert's own down_proj
        # output y, before its router weight (experts.py: super experts)
        self.expert_peaks = {}

    def observe(self, point, layer, key, x):
        if point not in self.data:
            raise ValueError(f"unknown observation point {point!r} (known: {', '.join(POINTS)})")
        self.data[point].setdefault(layer, {})[key] = x.copy()
        if point == DOWN_OUT:
            self.peaks.setdefault(layer, {})[key] = float(np.max(np.abs(x)))

    def observe_expert(self, point, layer, expert, key, tokens, weights, x):
        if point == DOWN_IN:
            self.experts.setdefault(layer, {}).setdefault(key, {})[expert] = (tokens, weights, x.copy())
        elif point == DOWN_OUT and len(x):
            row, channel = np.unravel_index(np.argmax(np.abs(x)), x.shape)
            self.expert_peaks.setdefault(layer, {}).setdefault(key, {})[expert] = (
                float(abs(x[row, channel])), int(tokens[row]), int(channel), float(x[row, channel]))

    def at(self, point, layer, key):
        """World `key`'s activation at `point` of `layer`: [T, channels]."""
        return self.data[point][layer][prefix(key, layer)]

    def world(self, point, key, upto=None):
        """World `key`'s activations at `point` as [layers, tokens, channels], layers 0..upto (all
        recorded when None): a view that looks each indexed layer up, so nothing is stacked."""
        return Layers(self, point, key, (max(self.data[point]) if upto is None else upto) + 1)

    def peak(self, layer, key):
        """World `key`'s max |down_proj output| in `layer`."""
        return self.peaks[layer][prefix(key, layer)]

    def down_inputs(self, layer, key, token):
        """[(expert, router weight, input vector)] of each down projection that saw `token` of world
        `key` in `layer`: the dense MLP's (expert None, weight 1), or each expert the token was routed to
        (and a shared expert, label SHARED, its sigmoid gate as the weight)."""
        if layer in self.data[DOWN_IN]:
            return [(None, 1.0, self.at(DOWN_IN, layer, key)[token])]
        sources = []
        for expert, (tokens, weights, x) in by_expert(self.experts.get(layer, {}).get(prefix(key, layer), {})):
            hit = np.flatnonzero(tokens == token)
            if hit.size:
                sources.append((expert, float(weights[hit[0]]), x[hit[0]]))
        return sources


def by_expert(experts):
    """{expert: value}.items() in expert order, a shared expert (label SHARED) last."""
    return sorted(experts.items(), key=lambda item: (item[0] == SHARED, -1 if item[0] == SHARED else item[0]))


class Layers:
    """One world's activations at one point, indexed [layer, token, channel] like a stacked
    array; a layer index or slice looks the layers up in the recorder (`np.asarray` stacks all)."""

    def __init__(self, recorder, point, key, count):
        self.recorder, self.point, self.key, self.count = recorder, point, key, count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(first, slice):
            layers = range(*first.indices(self.count))
            return np.array([self.recorder.at(self.point, layer, self.key)[rest] for layer in layers])
        if not 0 <= first < self.count:
            raise IndexError(f"layer {first} of {self.count}")
        return self.recorder.at(self.point, first, self.key)[rest]

    def __array__(self, dtype=None, copy=None):
        return np.stack([self.recorder.at(self.point, layer, self.key) for layer in range(self.count)])


@dataclass
class Spike:
    layer: int
    token: int
    row: int
    output: float


def find_spikes(profile_out, ratio):
    """Layers whose max |down_proj output| is `ratio` times the median layer's: [Spike]."""
    peak = np.abs(profile_out).reshape(len(profile_out), -1).max(axis=1)
    baseline = float(np.median(peak))
    spikes = []
    for layer in np.flatnonzero(peak >= ratio * max(baseline, np.finfo(np.float32).tiny)):
        spikes.append(_spike_at(profile_out[layer], int(layer)))
    return spikes


def _spike_at(out, layer):
    """The largest |down_proj output| of `layer`, out [T, C], as a Spike."""
    token, row = np.unravel_index(np.argmax(np.abs(out)), out.shape)
    return Spike(layer, int(token), int(row), float(out[token, row]))


def provisional_spike(peaks, down_out, ratio):
    """The online guess of find_spikes for the newest layer l: peaks [l + 1], the max |down_proj
    output| of layers 0..l; down_out [T, C], layer l's output.

    find_spikes compares a layer with the median of ALL layers, which a pass knows
    only at its end. While it runs, the newest layer is compared with the layers
    before it: their median, or, with fewer than EARLY_LAYERS of them, their
    smallest peak. Early layers often build an activation up (SmolLM2's layer 1
    makes a quarter of its super activation), so their median overestimates the
    median of all layers and would hide a real spike in layer 2. Layer 0, with
    nothing before it, is never a guess. A guess only decides which worlds the pass
    forks: a wrong one costs time (a world computed later, `_decide`), not results.
    """
    layer = len(peaks) - 1
    if layer == 0:
        return None
    earlier = peaks[:layer]
    baseline = float(np.min(earlier) if layer < EARLY_LAYERS else np.median(earlier))
    if peaks[layer] < ratio * max(baseline, np.finfo(np.float32).tiny):
        return None
    return _spike_at(down_out, layer)


EARLY_LAYERS = 3


def creates_massive_activation(spike, resid_mid, resid, settings):
    """Does the spike's layer make a massive residual value (not shrink an existing one)?"""
    before = abs(float(resid_mid[spike.layer, spike.token, spike.row]))
    after = abs(float(resid[spike.layer, spike.token, spike.row]))
    if after <= before:
        return False  # the layer shrinks an activation that already existed: a late-layer canceller
    typical = float(np.median(np.abs(resid[spike.layer, spike.token])))
    return after >= settings.spike_ratio * typical  # massive next to the other channels of its token


def persists(spike, resid, settings):
    """Do the next persist_layers layers keep the spike's residual value at persist_fraction of its size?"""
    after = abs(float(resid[spike.layer, spike.token, spike.row]))
    later = resid[spike.layer + 1: spike.layer + 1 + settings.persist_layers, spike.token, spike.row]
    if len(later) == 0:
        return False  # the last layer: nothing can persist
    return bool(np.all(np.abs(later) >= settings.persist_fraction * after))


def creates_persistent_activation(spike, resid_mid, resid, settings):
    """Does the spike create a massive residual value (not cancel one) that later layers keep?"""
    return creates_massive_activation(spike, resid_mid, resid, settings) and persists(spike, resid, settings)


def contributing_columns(spike, down_in, weight_row, settings):
    """Columns m whose x[t, m] * W[j, m] supplies at least min_contribution of the spike, largest first."""
    return [m for m, _ in _contributors(spike, down_in[spike.layer, spike.token], weight_row, settings)]


def _contributors(spike, x, weight_row, settings):
    """[(column m, its share x[m] * W[j, m] in the spike's direction)] at or above min_contribution, largest first."""
    aligned = x * weight_row * np.sign(spike.output)
    order = np.argsort(-aligned)
    return [(int(m), float(aligned[m])) for m in order if aligned[m] >= settings.min_contribution * abs(spike.output)]


def scan(model, tokens, settings, progress=False, fork_online=True):
    """Find the super weights of `model` with prompt `tokens`: (list[SuperWeight], report dict).

    One streaming pass (forking.py) carries every world the decisions need, when the
    online search guesses them right; `_decide` then makes the decisions of the
    pass-by-pass algorithm on the recorded worlds and computes any world the pass
    lacks. `fork_online=False` skips the online search: every world but the intact
    one is then computed by `_decide`, pass by pass, as the multi-pass scan did
    (the tests check both ways give the same result).
    """
    (result,) = scan_prompts(model, [tokens], settings, progress, fork_online)
    return result


def scan_prompts(model, prompts, settings, progress=False, fork_online=True, linear_observer=None):
    """`scan` of every prompt (token id lists) in one read of the weights: [(found, report)], one per prompt.

    `linear_observer`: sees every linear's input in the intact model over the prompts' tokens
    (forking.ForkingPass), e.g. an imatrix.Collector: the importance matrix of the scan's prompts.

    Each prompt's result is what `scan` of it alone gives (its own spikes, worlds,
    decisions and verification), up to float32 rounding in batched products of
    another shape; the prompts' worlds are extra rows of the same block calls.
    `merge_prompts` turns the results into one list with per-prompt counts.
    """
    for i, tokens in enumerate(prompts):
        if len(tokens) < 2:
            which = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
            raise SwtoolError(f"{which} must have at least 2 tokens to score its likelihood")
    recorders = [Recorder() for _ in prompts]
    stream = ForkingPass(model, list(prompts), recorders, linear_observer)
    lanes = [stream.lane(p) for p in range(len(prompts))]
    weights = WeightStats(model)
    online = [OnlineSearch(model, lane, recorder, weights, settings) for lane, recorder in zip(lanes, recorders)]
    _stream_once(stream, lanes, online if fork_online else None, "scan pass 1" if progress else None)

    def complete(requests):
        label = f"scan pass {stream.rounds + 2} (worlds pass 1 lacked)" if progress else None
        stream.complete([lanes[p].pair(key) for p, keys in requests.items() for key in keys], progress=label)

    decided = _drive([_decide(model, lane, recorder, weights, settings)
                      for lane, recorder in zip(lanes, recorders)], complete)
    nll = _nll(stream, lanes, [worlds for _, worlds, _ in decided], prompts)
    experts = _super_experts(model, stream, lanes, recorders, prompts, settings, progress) \
        if model.arch.moe is not None else None
    results = []
    for recorder, (found, worlds, decision_passes), nll_p in zip(recorders, decided, nll):
        _verify(found, worlds, recorder, nll_p, settings)
        removed = world_key(found)
        results.append((found, {
            "renormalised": renormalised_spikes(model, recorder, weights, found, settings),
            "passes": 1 + stream.rounds,  # reads of the checkpoint; `complete` rounds re-read from some layer on
            "weight_reads": stream.blocks_run / model.arch.n_layers,  # layers computed / layers: 1.0 = each once
            "decision_passes": decision_passes,  # passes the pass-by-pass algorithm makes (iterations + 1)
            "nll_intact": float(nll_p[INTACT]),
            "nll_all_removed": float(nll_p[removed]) if found else None,
            "profile": layer_profile(recorder, INTACT),
            "profile_removed": layer_profile(recorder, removed) if found else None,
            "super_experts": experts,  # a mixture's, over every prompt (experts.py); None otherwise
        }))
    return results


def _super_experts(model, stream, lanes, recorders, prompts, settings, progress):
    """A mixture's super experts (experts.py), their removal worlds computed in every prompt's lane:
    the catalog's `super_experts` section."""
    from swtool import experts

    found, control, worlds, numbers = experts.plan(model, recorders)
    label = f"scan pass {stream.rounds + 2} (super experts removed)" if progress else None
    stream.complete([lane.pair(key) for lane in lanes for key in set(worlds.values())], progress=label)
    nll = _nll(stream, lanes, [worlds] * len(lanes), prompts)
    return experts.verify(found, control, worlds, recorders, nll, numbers, settings)


def _drive(steps, run):
    """Run generators side by side, one round at a time: each yields a request (world keys to compute),
    `run({index: request})` serves every pending request of a round at once (one block call or one
    `complete` for all prompts); returns each generator's return value."""
    results, requests = [None] * len(steps), {}

    def advance(i):
        try:
            requests[i] = next(steps[i])
        except StopIteration as stop:
            results[i] = stop.value

    for i in range(len(steps)):
        advance(i)
    while requests:
        run(dict(requests))
        pending = list(requests)
        requests.clear()
        for i in pending:
            advance(i)
    return results


def _stream_once(stream, lanes, online, progress):
    """The single pass: every layer for the live worlds of every prompt, then the online searches may
    fork new ones there (each prompt's forks of a round share one block call)."""
    live = [{INTACT} for _ in lanes]
    for layer in layer_progress(range(stream.arch.n_layers), progress):
        stream.compute(layer, [lane.pair(key) for lane, keys in zip(lanes, live) for key in keys])
        if online is not None:
            live = _drive([search.after_layer(layer, keys) for search, keys in zip(online, live)],
                          lambda requests: stream.compute(
                              layer, [lanes[p].pair(key) for p, keys in requests.items() for key in keys]))


def _decide(model, stream, recorder, weights, settings):
    """The decisions of passes 1, 2, ... (module docstring, steps 2-5) on whole recorded worlds.

    Pass p looks for spikes in the world with everything found by passes 1..p-1
    zeroed, over all its layers. Each world it needs was usually carried by the
    single pass; one that was not is computed now, from the layer where it departs
    from one that was: a generator, it yields the world keys it needs complete
    (`_drive` completes every prompt's at once). Returns (found, the verification
    worlds, number of passes).
    """
    found, passes = [], 0
    while True:
        key = world_key(found)
        # with the worlds that verify what is found so far: the pass-by-pass scan ran them together
        yield [key, *verification_worlds(found).values()]
        passes += 1
        new = []
        if passes <= settings.max_iter:
            new = _candidates(model, recorder, weights, key, found, settings, iteration=passes)
        if not new:
            break
        found.extend(new)
    return found, verification_worlds(found), passes


def verification_worlds(found):
    """{name: world key}: intact, all found removed, each alone, each spike's set removed."""
    worlds = {"intact": INTACT, "all": world_key(found)}
    groups = {}
    for sw in found:
        groups.setdefault((sw.layer, sw.row), []).append(sw)  # one spike: possibly several experts
        worlds[("alone", _key(sw))] = world_key([sw])
    for spike, members in groups.items():
        worlds[("set", spike)] = world_key(members)
    return worlds


def _nll(stream, lanes, worlds, prompts):
    """Per prompt, {world key: the prompt's mean NLL} of its verification worlds `worlds[p]`, through
    the head in one batch for every prompt."""
    keys = [sorted(set(by_name.values()), key=world_order) for by_name in worlds]
    logits = stream.logits([lane.pair(key) for lane, mine in zip(lanes, keys) for key in mine])
    result = []
    for lane, mine, tokens in zip(lanes, keys, prompts):
        values = mean_nll(np.stack([logits[lane.pair(key)] for key in mine]), tokens)
        result.append({key: float(value) for key, value in zip(mine, values)})
    return result


def _key(sw):
    # the tensor tells a shared expert's weight (expert None) from a routed one's
    return (sw.layer, sw.tensor, sw.expert, sw.row, sw.col)


class OnlineSearch:
    """Guesses, layer by layer during the pass, which worlds the decisions will need, and forks them there.

    It runs the steps of the module docstring on the layers computed so far, in
    the world of every detection pass at once: pass 1 looks in the intact world,
    pass 2 in the world without pass 1's finds, and so on. A spike is judged by
    `provisional_spike`, and its persistence only once the next persist_layers
    layers are computed; until then its worlds are kept alongside the ones it
    would replace, so dropping it costs nothing.
    """

    def __init__(self, model, stream, recorder, weights, settings):
        self.model = model
        self.stream = stream
        self.recorder = recorder
        self.weights = weights
        self.settings = settings
        self.found = [[]]  # found[p]: the weights detection pass p + 1 found so far, in order
        self.pending = []  # (spike, pass index): spikes whose persistence is not known yet

    def found_before(self, p):
        return [sw for earlier in self.found[:p] for sw in earlier]

    def needed(self):
        """The world keys the decisions need, if the guesses so far are right."""
        every = self.found_before(len(self.found))
        keys = {world_key(self.found_before(p)) for p in range(len(self.found) + 1)}  # detection worlds, all
        return keys | set(verification_worlds(every).values())

    def after_layer(self, layer, live):
        """Search `layer` (just computed for `live`), fork what the finds need; return the live worlds.

        A generator: it yields the world keys to compute at `layer` before it goes on, so that
        `_drive` runs the forks of every prompt in one block call."""
        dropped = self._resolve(layer)
        for p in range(min(len(self.found), self.settings.max_iter)):
            world = world_key(self.found_before(p))
            if not self._computable(world, layer):
                continue  # a world lost to a dropped guess: `_decide` computes it if it matters
            yield [world]  # computed (forked) here if pass p - 1 found a weight in this layer
            known = {_key(sw) for sw in self.found_before(p + 1)}
            spike, new = self._search(layer, world, known, iteration=p + 1)
            if new:
                self.found[p].extend(new)
                self.pending.append((spike, p))
                if p + 1 == len(self.found):
                    self.found.append([])
                # fork every world the finds add, the next pass's included, in one run of this layer
                needed = self.needed()
                yield [key for key in needed if self._computable(key, layer)]
        needed = self.needed()
        # keep what a pending guess would replace, so that dropping the guess needs no recomputation
        keep = live if self.pending or dropped else set()
        return {key for key in needed | keep if self.stream.computed(key, layer)}

    def _computable(self, key, layer):
        """Is the input of world `key` to `layer` there (the embedding, or its prefix's output of layer - 1)?"""
        return layer == 0 or self.stream.computed(key, layer - 1)

    def _search(self, layer, world, known, iteration):
        """(spike, its new weights) at `layer` in `world`, persistence pending; (None, []) if none."""
        recorder = self.recorder
        peaks = [recorder.peak(earlier, world) for earlier in range(layer + 1)]
        spike = provisional_spike(peaks, recorder.at(DOWN_OUT, layer, world), self.settings.spike_ratio)
        if spike is None:
            return None, []
        resid_mid = recorder.world(RESID_MID, world, upto=layer)
        resid = recorder.world(RESID, world, upto=layer)
        if not creates_massive_activation(spike, resid_mid, resid, self.settings):
            return None, []
        intact_mid, intact = recorder.world(RESID_MID, INTACT, upto=layer), recorder.world(RESID, INTACT, upto=layer)
        if cancels(spike, intact_mid, intact):
            return None, []
        return spike, _spike_weights(self.model, recorder, self.weights, world, spike, known, self.settings,
                                     iteration, super_activation=float(intact[layer, spike.token, spike.row]))

    def _resolve(self, layer):
        """Drop the guesses whose spike did not persist, now that its later layers are computed; True if any."""
        last = self.stream.arch.n_layers - 1
        dropped = False
        for spike, p in list(self.pending):
            if layer < min(spike.layer + self.settings.persist_layers, last):
                continue
            self.pending.remove((spike, p))
            world = world_key(self.found_before(p))
            if not self.stream.computed(world, layer) or not persists(
                    spike, self.recorder.world(RESID, world, upto=layer), self.settings):
                self.found[p] = [sw for sw in self.found[p] if (sw.layer, sw.row) != (spike.layer, spike.row)]
                dropped = True
        return dropped


class WeightStats:
    """RMS, ranks and rows of down projections, read from the stored bits and kept for the scan.

    The outlier test needs the RMS of the whole tensor and the catalog the rank of
    each weight in it: both are one pass over the tensor's bits (kernels.py), not a
    float32 copy of it.
    """

    FROM_BITS = ("BF16", "F16", "F32")  # dtypes kernels.py reads; GGUF block types are decoded in row chunks
    CHUNK_ROWS = 1024

    def __init__(self, model):
        self.model = model
        self.rms = {}  # (tensor name, offset) -> RMS
        self.ranks = {}  # (tensor name, offset, value) -> rank

    def matrix(self, layer, expert):
        return down_proj_matrix(self.model, layer, expert)

    def sigma(self, tensor):
        key = _tensor_key(tensor)
        if key not in self.rms:
            total = self._fold(tensor, kernels.sum_of_squares,
                               lambda values: float(np.sum(np.square(values, dtype=np.float64))))
            self.rms[key] = float(np.sqrt(total / np.prod(tensor.shape)))
        return self.rms[key]

    def rank(self, tensor, value):
        """1 + how many weights of `tensor` have a larger magnitude than `value`."""
        key = (*_tensor_key(tensor), value)
        if key not in self.ranks:
            magnitude = np.float32(abs(value))
            self.ranks[key] = 1 + self._fold(
                tensor, lambda stored, dtype: kernels.count_larger(stored, dtype, magnitude),
                lambda values: int(np.count_nonzero(np.abs(values) > magnitude)))
        return self.ranks[key]

    def _fold(self, tensor, from_bits, from_values):
        """Sum a statistic over the tensor: from its stored bits, or over decoded row chunks."""
        if tensor.dtype in self.FROM_BITS:
            return tensor.with_stored(lambda stored: from_bits(stored, tensor.dtype))
        return sum(from_values(tensor.read(rows=slice(start, start + self.CHUNK_ROWS)))
                   for start in range(0, tensor.shape[0], self.CHUNK_ROWS))


def _tensor_key(tensor):
    """A tensor's identity: its name, and its offset, which tells the experts of a stacked tensor apart."""
    return (tensor.name, getattr(tensor, "offset", None))


def _candidates(model, recorder, weights, world, found, settings, iteration):
    """New super weights in world `world` (all layers recorded): pass `iteration` of the module docstring."""
    down_out = np.asarray(recorder.world(DOWN_OUT, world))
    resid_mid, resid = recorder.world(RESID_MID, world), recorder.world(RESID, world)
    intact_mid, intact_resid = recorder.world(RESID_MID, INTACT), recorder.world(RESID, INTACT)
    known = {_key(sw) for sw in found}
    new = []
    for spike in find_spikes(down_out, settings.spike_ratio):
        if not creates_persistent_activation(spike, resid_mid, resid, settings):
            continue
        if cancels(spike, intact_mid, intact_resid):
            continue  # in the real model this layer shrinks an activation; it only looks creative once others are gone
        new.extend(_spike_weights(model, recorder, weights, world, spike, known, settings, iteration,
                                  super_activation=float(intact_resid[spike.layer, spike.token, spike.row])))
    return new


def renormalised_spikes(model, recorder, weights, found, settings):
    """[RenormalisedSpike] of the intact world: in a block whose MLP output passes through a norm,
    each spike (step 1) that the norm shrinks so that it creates no massive residual value (step 2),
    traced to its outlier weights as a super weight's spike is (steps 4-5).

    Such a norm divides the raw output by its RMS: once one channel dominates, it leaves the
    block at about sqrt(hidden) x the norm's gain on that channel, however large the spike. A
    massive activation then comes from that gain (real Gemma checkpoints), not from one weight;
    the weight's spike is reported with its size before and after the norm, as not a super weight.
    """
    norm = model.arch.mlp_output_norm
    if norm is None:
        return []
    down_out = np.asarray(recorder.world(DOWN_OUT, INTACT))
    resid_mid, resid = recorder.world(RESID_MID, INTACT), recorder.world(RESID, INTACT)
    spiking_rows = {(sw.layer, sw.row) for sw in found}
    listed = []
    for spike in find_spikes(down_out, settings.spike_ratio):
        if (spike.layer, spike.row) in spiking_rows or creates_massive_activation(spike, resid_mid, resid, settings):
            continue  # a super weight's spike, or one judged as such (steps 2-3)
        at = (spike.layer, spike.token, spike.row)
        residual = float(resid[at])
        after_norm = residual - float(resid_mid[at])  # the block adds the norm's output to the residual
        if abs(after_norm) >= abs(spike.output):
            continue  # the norm did not shrink it: not what keeps it from being massive
        for sw in _spike_weights(model, recorder, weights, INTACT, spike, set(), settings, 1, residual):
            listed.append(RenormalisedSpike(
                layer=sw.layer, row=sw.row, col=sw.col, expert=sw.expert, tensor=sw.tensor,
                gguf_tensor=sw.gguf_tensor, value=sw.value, dtype=sw.dtype, rank=sw.rank, token=sw.token,
                input_activation=sw.input_activation, output_activation=sw.output_activation,
                contribution=sw.contribution, after_norm=after_norm, residual=residual,
                norm=f"model.layers.{spike.layer}.{norm}.weight", tensor_index=sw.tensor_index))
    return listed


def merge_renormalised(reports):
    """One list of RenormalisedSpikes from `scan_prompts`'s reports: each weight once, in the order the
    prompts found it, its fields the first finding prompt's, with `found_in` and `per_prompt`."""
    from copy import deepcopy

    n, merged = len(reports), {}
    for p, report in enumerate(reports):
        for spike in report.get("renormalised", ()):
            key = _key(spike)
            if key not in merged:
                merged[key] = deepcopy(spike)
                merged[key].per_prompt = [None] * n
            merged[key].per_prompt[p] = {
                "token": spike.token, "input_activation": spike.input_activation,
                "output_activation": spike.output_activation, "after_norm": spike.after_norm,
                "residual": spike.residual}
    for spike in merged.values():
        spike.found_in = sum(entry is not None for entry in spike.per_prompt)
    return list(merged.values())


def _spike_weights(model, recorder, weights, world, spike, known, settings, iteration, super_activation):
    """The outlier weights that feed `spike` (in `world`), largest contribution first; adds them to `known`."""
    picks = []
    # every down projection that fed the spike's token: the dense MLP's, or each routed expert's
    # (and a shared expert's), each judged by its weight in the sum: router weight or sigmoid gate
    for source, gate, x in recorder.down_inputs(spike.layer, world, spike.token):
        tensor = weights.matrix(spike.layer, source)
        expert = None if source == SHARED else source  # a shared expert's matrix is a plain 2-D one
        row = tensor.read(rows=[spike.row])[0]
        sigma = weights.sigma(tensor)
        for col, share in _contributors(spike, gate * x, row, settings):
            value = float(row[col])
            key = (spike.layer, tensor.name, expert, spike.row, col)  # as _key
            if key in known or abs(value) < settings.min_weight_sigma * sigma:
                continue  # a large input through an ordinary weight: the input is super, not the weight
            known.add(key)
            picks.append((share, SuperWeight(
                layer=spike.layer, row=spike.row, col=col, expert=expert, tensor=tensor.name,
                gguf_tensor=model.arch.gguf_name(tensor.name), value=value, dtype=tensor.dtype,
                rank=weights.rank(tensor, value), token=spike.token,
                input_activation=float(x[col]), output_activation=spike.output,
                contribution=gate * float(x[col]) * value, super_activation=super_activation,
                iteration=iteration, router_weight=None if source is None else gate,
                tensor_index=stored_index(model, tensor, expert, spike.row, col))))
    return [sw for _, sw in sorted(picks, key=lambda pick: -pick[0])]  # largest contribution first


def down_proj_matrix(model, layer, expert=None):
    """TensorInfo of the 2-D down projection of `layer` (of one expert, or SHARED, for a mixture).

    Its `name` is the real tensor's: a per-expert tensor, or the stacked
    [experts, out, in] tensor of which this is slice `expert`.
    """
    if expert is None:
        tensor = model.checkpoint.tensor(model.arch.down_proj_name(layer))
        # a Conv1D weight stored [in, out] is read as its [out, in] transpose (checkpoint/transposed.py)
        return TransposedTensor(tensor) if model.arch.stored_transposed(tensor.name) else tensor
    tensor = model.checkpoint.tensor(model.arch.down_proj_name(layer, expert))
    return tensor.sub(expert) if len(tensor.shape) == 3 else tensor


def stored_index(model, tensor, expert, row, col):
    """Where W[row, col] of `tensor` (from down_proj_matrix) is in the tensor as the file stores it."""
    if isinstance(tensor, TransposedTensor):
        return list(tensor.stored_index((row, col)))
    if expert is not None and len(model.checkpoint.tensor(tensor.name).shape) == 3:
        return [expert, row, col]
    return [row, col]


def cancels(spike, resid_mid, resid):
    """Does the layer make |residual| at the spike's position smaller?"""
    before = abs(float(resid_mid[spike.layer, spike.token, spike.row]))
    return abs(float(resid[spike.layer, spike.token, spike.row])) < before


def _verify(found, worlds, recorder, nll, settings):
    """Fill each SuperWeight's verification from the verification worlds."""

    def activation(sw, key):
        return abs(float(recorder.at(RESID, sw.layer, key)[sw.token, sw.row]))

    def tests(sw, key):
        """The tests world `key` passes: it loses the super activation, the prompt's likelihood."""
        return [name for name, passed in (
            ("activation", activation(sw, key) < settings.verify_activation_drop * activation(sw, INTACT)),
            ("NLL", nll[key] - nll[INTACT] > settings.verify_nll_rise)) if passed]

    for sw in found:
        alone, together = worlds[("alone", _key(sw))], worlds[("set", (sw.layer, sw.row))]
        # the tests zeroing it alone passes, or "set": it passes only with the others of its spike
        verified_by = tests(sw, alone) or (["set"] if tests(sw, together) else [])
        sw.verification = {
            "nll_intact": nll[INTACT],
            "nll_removed": nll[alone],
            "nll_set_removed": nll[together],
            "super_activation_intact": activation(sw, INTACT),
            "super_activation_removed": activation(sw, alone),
            "super_activation_set_removed": activation(sw, together),
            # alone, or with the other weights that feed the same spike (two weights in one row)
            "verified": bool(verified_by),
            "verified_by": verified_by,
        }


VERIFIED_RULE = "verified in more than half of the prompts"
VERIFIED_BY = ("activation", "NLL", "set")  # the tests, in the order a list of them is written


def merge_prompts(results):
    """One list of SuperWeights from `scan_prompts`'s results: each candidate once, in the order the
    prompts found them, with `found_in` and `verified_in` (how many prompts) and `per_prompt`.

    Its other fields are those of the first prompt that found it (its token, activations,
    iteration, verification measurements); `verification["verified"]` is the verdict across
    prompts (VERIFIED_RULE: a candidate found in fewer prompts counts as not verified in the
    others) and `verification["verified_by"]` the tests that verified it in those prompts.
    """
    from copy import deepcopy

    n, merged = len(results), {}
    for p, (found, _) in enumerate(results):
        for sw in found:
            if _key(sw) not in merged:
                merged[_key(sw)] = deepcopy(sw)
                merged[_key(sw)].per_prompt = [None] * n
            merged[_key(sw)].per_prompt[p] = {
                "token": sw.token, "input_activation": sw.input_activation,
                "output_activation": sw.output_activation, "super_activation": sw.super_activation,
                "iteration": sw.iteration, "verification": dict(sw.verification)}
    for sw in merged.values():
        seen = [entry for entry in sw.per_prompt if entry is not None]
        verified = [entry for entry in seen if entry["verification"]["verified"]]
        sw.found_in, sw.verified_in = len(seen), len(verified)
        tests = {name for entry in verified for name in entry["verification"]["verified_by"]}
        sw.verification["verified"] = 2 * len(verified) > n
        sw.verification["verified_by"] = [name for name in VERIFIED_BY if name in tests]
    return list(merged.values())


def layer_profile(recorder, world):
    """Per layer: the largest |down_proj input|, |output| and |residual| with channel and token.

    A mixture layer's input is the largest over its experts (the entry names the
    expert, or says shared_expert); its output is the router-weighted sum of the experts' down projections.
    """
    rows = []
    for layer in sorted(recorder.data[DOWN_OUT]):
        entry = {"layer": layer}
        for point, key in ((DOWN_IN, "down_proj_input"), (DOWN_OUT, "down_proj_output"), (RESID, "residual")):
            if point == DOWN_IN and layer not in recorder.data[DOWN_IN]:
                entry[key] = _expert_input_peak(recorder.experts.get(layer, {}).get(prefix(world, layer), {}))
                continue
            x = recorder.at(point, layer, world)
            token, channel = np.unravel_index(np.argmax(np.abs(x)), x.shape)
            entry[key] = {"value": float(x[token, channel]), "channel": int(channel), "token": int(token)}
        rows.append(entry)
    return rows


def _expert_input_peak(experts):
    """The largest |down_proj input| over a mixture layer's experts (in one world), naming the expert."""
    best = None
    for expert, (tokens, _, x) in by_expert(experts):
        row, channel = np.unravel_index(np.argmax(np.abs(x)), x.shape)
        if best is None or abs(float(x[row, channel])) > abs(best["value"]):
            best = {"value": float(x[row, channel]), "channel": int(channel), "token": int(tokens[row])}
            best.update({"shared_expert": True} if expert == SHARED else {"expert": int(expert)})
    return best

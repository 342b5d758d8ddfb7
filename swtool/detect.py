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

Every pass runs several worlds side by side (intact, all found removed, each
found weight removed alone), so the last pass also yields the verification:
the prompt's mean NLL and the super activation with each weight zeroed vs intact.

Mixtures of experts (Mixtral): a layer has one down projection per expert, and
each sees only the tokens routed to it. The layer's output is then the
router-weighted sum of its experts' down projections; a spike in it is traced to
columns of every expert its token was routed to, by contribution
router weight * x[t, m] * W[j, m], so a super weight is found inside one expert
and the catalog names that expert.
"""

from dataclasses import asdict, dataclass, field

import numpy as np

from swtool.checkpoint.transposed import TransposedTensor
from swtool.forward import Edit, World, forward, mean_nll


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
    expert: int | None  # the mixture expert whose down projection holds it; None for a dense MLP
    tensor: str  # Hugging Face name; a stacked-experts tensor holds it at [expert, row, col]
    gguf_tensor: str  # llama.cpp name; ffn_down_exps stacks experts: element [expert, row, col]
    value: float
    dtype: str
    rank: int  # 1 = largest |value| in its tensor
    token: int  # position of the spike in the prompt
    input_activation: float  # down_proj input x[token, col] (the expert's, for a mixture)
    output_activation: float  # down_proj output y[token, row] (for a mixture: the experts' weighted sum)
    contribution: float  # x[token, col] * W[row, col], times router_weight for an expert
    super_activation: float  # residual stream [token, row] after the layer, intact model
    iteration: int
    router_weight: float | None = None  # the expert's routing weight at `token`; None for a dense MLP
    # the element's index in `tensor` as stored: [row, col]; [col, row] for a Conv1D weight
    # stored [in, out] (GPT-2); [expert, row, col] in a stacked-experts tensor
    tensor_index: list | None = None
    verification: dict = field(default_factory=dict)

    def to_json(self):
        return asdict(self)


class Recorder:
    """Observer keeping each layer's down_proj input/output and residual stream, all worlds.

    A mixture layer has no single down_proj input: its experts' inputs and outputs
    are kept per (layer, expert), for the rows routed to each (`experts`).
    """

    POINTS = ("down_in", "down_out", "resid_mid", "resid")

    def __init__(self):
        self.data = {point: {} for point in self.POINTS}
        self.experts = {}  # layer -> expert -> {"routed": Routed, "down_in": [N, ff], "down_out": [N, hidden]}

    def observe(self, point, layer, x):
        if point in self.data:
            self.data[point][layer] = x.copy()

    def observe_expert(self, point, layer, expert, routed, x):
        entry = self.experts.setdefault(layer, {}).setdefault(expert, {"routed": routed})
        entry[point] = x.copy()

    def world(self, point, w):
        """[layers, tokens, channels] for world w."""
        layers = self.data[point]
        return np.stack([layers[i][w] for i in sorted(layers)])

    def down_inputs(self, layer, world, token):
        """[(expert, router weight, input vector)] of each down projection that saw `token` of `world`
        in `layer`: the dense MLP's (expert None, weight 1), or each expert the token was routed to."""
        if layer in self.data["down_in"]:
            return [(None, 1.0, self.data["down_in"][layer][world, token])]
        sources = []
        for expert, entry in sorted(self.experts.get(layer, {}).items()):
            routed = entry["routed"]
            hit = np.flatnonzero((routed.world == world) & (routed.token == token))
            if hit.size:
                sources.append((expert, float(routed.weight[hit[0]]), entry["down_in"][hit[0]]))
        return sources


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
        token, row = np.unravel_index(np.argmax(np.abs(profile_out[layer])), profile_out[layer].shape)
        spikes.append(Spike(int(layer), int(token), int(row), float(profile_out[layer, token, row])))
    return spikes


def creates_persistent_activation(spike, resid_mid, resid, settings):
    """Does the spike create a massive residual value (not cancel one) that later layers keep?"""
    before = abs(float(resid_mid[spike.layer, spike.token, spike.row]))
    after = abs(float(resid[spike.layer, spike.token, spike.row]))
    if after <= before:
        return False  # the layer shrinks an activation that already existed: a late-layer canceller
    typical = float(np.median(np.abs(resid[spike.layer, spike.token])))
    if after < settings.spike_ratio * typical:
        return False  # not massive next to the other channels of its token
    later = resid[spike.layer + 1: spike.layer + 1 + settings.persist_layers, spike.token, spike.row]
    if len(later) == 0:
        return False  # the last layer: nothing can persist
    return bool(np.all(np.abs(later) >= settings.persist_fraction * after))


def contributing_columns(spike, down_in, weight_row, settings):
    """Columns m whose x[t, m] * W[j, m] supplies at least min_contribution of the spike, largest first."""
    return [m for m, _ in _contributors(spike, down_in[spike.layer, spike.token], weight_row, settings)]


def _contributors(spike, x, weight_row, settings):
    """[(column m, its share x[m] * W[j, m] in the spike's direction)] at or above min_contribution, largest first."""
    aligned = x * weight_row * np.sign(spike.output)
    order = np.argsort(-aligned)
    return [(int(m), float(aligned[m])) for m in order if aligned[m] >= settings.min_contribution * abs(spike.output)]


def scan(model, tokens, settings, progress=False):
    """Find the super weights of `model` with prompt `tokens`: (list[SuperWeight], report dict)."""
    found = []  # SuperWeight, in the order found
    passes = 0
    while True:
        worlds = Worlds(found)
        recorder = Recorder()
        label = f"scan pass {passes + 1} ({len(worlds.list)} worlds)" if progress else None
        logits = forward(model, tokens, worlds.list, observers=[recorder], progress=label)
        passes += 1
        new = []
        if passes <= settings.max_iter:
            # look for spikes in the world with everything found so far removed
            new = _candidates(model, recorder, worlds.all_removed, found, settings, iteration=passes)
        if not new:
            break
        found.extend(new)
    _verify(found, worlds, recorder, mean_nll(logits, tokens), settings)
    report = {
        "passes": passes,
        "nll_intact": float(mean_nll(logits[:1], tokens)[0]),
        "nll_all_removed": float(mean_nll(logits[worlds.all_removed][None], tokens)[0]) if found else None,
        "profile": layer_profile(recorder, 0),
        # the same with every found weight zeroed (scan --plot draws both)
        "profile_removed": layer_profile(recorder, worlds.all_removed) if found else None,
    }
    return found, report


class Worlds:
    """The worlds of one pass and where each is: intact (0), all found removed, each alone, each spike's set."""

    def __init__(self, found):
        self.list = [World("intact")]
        self.index = {}
        self.all_removed = self._add("all", found)
        groups = {}
        for sw in found:
            groups.setdefault((sw.layer, sw.row), []).append(sw)  # one spike: possibly several experts
        for sw in found:
            self.index[("alone", _key(sw))] = self._add(("alone", _key(sw)), [sw])
        for spike, members in groups.items():
            self.index[("set", spike)] = self._add(("set", spike), members)

    def _add(self, name, removed):
        """Index of a world without `removed`, reusing an existing world with the same edits."""
        edits = tuple(Edit(sw.tensor, sw.row, sw.col, 0.0, sw.expert) for sw in removed)
        for i, world in enumerate(self.list):
            if set(world.edits) == set(edits):
                return i
        self.list.append(World(str(name), edits))
        return len(self.list) - 1


def _key(sw):
    return (sw.layer, sw.expert, sw.row, sw.col)


def _candidates(model, recorder, world, found, settings, iteration):
    down_out = recorder.world("down_out", world)
    resid_mid, resid = recorder.world("resid_mid", world), recorder.world("resid", world)
    intact_mid, intact_resid = recorder.world("resid_mid", 0), recorder.world("resid", 0)
    known = {_key(sw) for sw in found}
    new = []
    for spike in find_spikes(down_out, settings.spike_ratio):
        if not creates_persistent_activation(spike, resid_mid, resid, settings):
            continue
        if cancels(spike, intact_mid, intact_resid):
            continue  # in the real model this layer shrinks an activation; it only looks creative once others are gone
        # every down projection that fed the spike's token: the dense MLP's, or each routed expert's
        picks = []
        for expert, gate, x in recorder.down_inputs(spike.layer, world, spike.token):
            tensor = down_proj_matrix(model, spike.layer, expert)
            weights = tensor.read()
            sigma = float(np.sqrt(np.mean(np.square(weights, dtype=np.float64))))
            for col, share in _contributors(spike, gate * x, weights[spike.row], settings):
                value = float(weights[spike.row, col])
                if (spike.layer, expert, spike.row, col) in known or abs(value) < settings.min_weight_sigma * sigma:
                    continue  # a large input through an ordinary weight: the input is super, not the weight
                known.add((spike.layer, expert, spike.row, col))
                picks.append((share, SuperWeight(
                    layer=spike.layer, row=spike.row, col=col, expert=expert, tensor=tensor.name,
                    gguf_tensor=model.arch.gguf_name(tensor.name), value=value, dtype=tensor.dtype,
                    rank=1 + int(np.count_nonzero(np.abs(weights) > abs(value))), token=spike.token,
                    input_activation=float(x[col]), output_activation=spike.output,
                    contribution=gate * float(x[col]) * value,
                    super_activation=float(intact_resid[spike.layer, spike.token, spike.row]), iteration=iteration,
                    router_weight=None if expert is None else gate,
                    tensor_index=stored_index(model, tensor, expert, spike.row, col))))
            del weights
        new.extend(sw for _, sw in sorted(picks, key=lambda pick: -pick[0]))  # largest contribution first
    return new


def down_proj_matrix(model, layer, expert=None):
    """TensorInfo of the 2-D down projection of `layer` (of one expert, for a mixture).

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
    """Fill each SuperWeight's verification from the worlds of the last pass."""
    resid = recorder.data["resid"]

    def activation(sw, w):
        return abs(float(resid[sw.layer][w, sw.token, sw.row]))

    def matters(sw, w):
        """Does world w lose the super activation or the prompt's likelihood?"""
        return (activation(sw, w) < settings.verify_activation_drop * activation(sw, 0)
                or nll[w] - nll[0] > settings.verify_nll_rise)

    for sw in found:
        alone, together = worlds.index[("alone", _key(sw))], worlds.index[("set", (sw.layer, sw.row))]
        sw.verification = {
            "nll_intact": float(nll[0]),
            "nll_removed": float(nll[alone]),
            "nll_set_removed": float(nll[together]),
            "super_activation_intact": activation(sw, 0),
            "super_activation_removed": activation(sw, alone),
            "super_activation_set_removed": activation(sw, together),
            # alone, or with the other weights that feed the same spike (two weights in one row)
            "verified": bool(matters(sw, alone) or matters(sw, together)),
        }


def layer_profile(recorder, world):
    """Per layer: the largest |down_proj input|, |output| and |residual| with channel and token.

    A mixture layer's input is the largest over its experts (the entry names the
    expert); its output is the router-weighted sum of the experts' down projections.
    """
    rows = []
    for layer in sorted(recorder.data["down_out"]):
        entry = {"layer": layer}
        for point, key in (("down_in", "down_proj_input"), ("down_out", "down_proj_output"), ("resid", "residual")):
            if point == "down_in" and layer not in recorder.data["down_in"]:
                entry[key] = _expert_input_peak(recorder.experts.get(layer, {}), world)
                continue
            x = recorder.data[point][layer][world]
            token, channel = np.unravel_index(np.argmax(np.abs(x)), x.shape)
            entry[key] = {"value": float(x[token, channel]), "channel": int(channel), "token": int(token)}
        rows.append(entry)
    return rows


def _expert_input_peak(experts, world):
    """The largest |down_proj input| over a mixture layer's experts, in one world, naming the expert."""
    best = None
    for expert, entry in sorted(experts.items()):
        mine = np.flatnonzero(entry["routed"].world == world)  # the rows of this world routed here
        if mine.size == 0:
            continue
        x = entry["down_in"][mine]
        row, channel = np.unravel_index(np.argmax(np.abs(x)), x.shape)
        if best is None or abs(float(x[row, channel])) > abs(best["value"]):
            best = {"value": float(x[row, channel]), "channel": int(channel),
                    "token": int(entry["routed"].token[mine[row]]), "expert": int(expert)}
    return best

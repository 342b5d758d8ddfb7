"""Super experts of a mixture (Su et al. 2025, arXiv 2507.23279): found by the paper's criterion, verified by removal.

The criterion, per layer and routed expert: a = the largest |output| of the expert's own
down projection (before its router weight) over every token the prompts route to it.
An expert is a super expert when its a exceeds both the 99.5th percentile of all
experts' a (numpy's linear interpolation) and 0.1 x the largest a. Experts the prompts
route no token to have no a and are left out of the distribution; a shared expert
(Qwen2-MoE) is always on, not routed, and is not a candidate. With fewer than 201
experts observed the percentile lies between the two largest, so the largest always
passes it: in a small model the criterion names a candidate, and removal decides.

Verification: worlds of the scan's pass (forking.py), each with experts removed as
forward.DropExpert removes them (the router never picks them; the top-k weights are
then computed as the family computes them):
  - each super expert removed alone;
  - all of them removed together (when there are several);
  - a control: as many other experts removed, one from each super expert's layer,
    drawn (seed CONTROL_SEED) among the experts the prompts route tokens to that are
    not super experts (among the layer's other experts when the prompts route to none).
A world that would leave a layer fewer experts than each token is routed to is left
out (its numbers are null): a super expert that cannot be removed alone is not verified.
The prompt NLL is the mean over the prompts of each prompt's mean NLL; the super
activation is |residual[token, channel]| after the expert's layer at the token and
channel of its a, in the prompt where a was seen. A super expert is verified when
removing it alone collapses a massive super activation (to below verify_activation_drop
of it; massive: spike_ratio x the median |residual| of its token) or raises the NLL by
more than verify_nll_rise, and it does more than the control: a higher NLL or a smaller
super activation than with the control's experts removed.
Cost: the removal worlds are computed after the scan's pass, from the first super
expert's layer on: one more partial read of the weights (the report's `passes`).
"""

from dataclasses import asdict, dataclass, field

import numpy as np

from swtool.arch.base import RESID
from swtool.arch.moe import SHARED
from swtool.errors import SwtoolError
from swtool.forward import DropExpert
from swtool.table import plural

PERCENTILE = 99.5  # the paper's: above this percentile of all experts' maxima ...
RATIO_TO_LARGEST = 0.1  # ... and above this fraction of the largest
CONTROL_SEED = 0
INTACT = frozenset()


@dataclass
class SuperExpert:
    layer: int
    expert: int
    max_output: float  # the largest |down_proj output| of the expert, before its router weight
    value: float  # that output, signed
    token: int  # where: position in the prompt ...
    channel: int  # ... output channel (the residual channel it writes to) ...
    prompt: int  # ... and which prompt (0-based, in the scan's order)
    percentile: float  # share of all observed experts' maxima at or below this one, in %
    ratio: float  # max_output / the largest expert's
    tensor: str  # Hugging Face name of its down projection (stacked tensors: slice `expert`)
    gguf_tensor: str  # llama.cpp's (blk.N.ffn_down_exps.weight: slice `expert`)
    # row `channel` of its down projection, what audit checks: its largest |w| (col, value, where the
    # file stores it) and the RMS of its other weights
    down_proj_row: dict = field(default_factory=dict)
    verification: dict = field(default_factory=dict)

    def to_json(self):
        return asdict(self)


def removal(experts):
    """The world key (forking.py) of the model without these (layer, expert) pairs."""
    return frozenset((layer, DropExpert(layer, expert)) for layer, expert in experts)


def expert_maxima(recorders):
    """{(layer, expert): (max |y|, token, channel, y, prompt)} over every prompt's intact world: the
    largest down_proj output of each routed expert that saw a token (detect.Recorder.expert_peaks)."""
    maxima = {}
    for p, recorder in enumerate(recorders):
        for layer, by_key in recorder.expert_peaks.items():
            for expert, peak in by_key.get(INTACT, {}).items():
                if expert == SHARED:
                    continue
                if (layer, expert) not in maxima or peak[0] > maxima[layer, expert][0]:
                    maxima[layer, expert] = (*peak, p)
    return maxima


def criterion(maxima):
    """(the super experts [(layer, expert)], largest a first; the percentile threshold; the largest a)."""
    if not maxima:
        return [], None, None
    values = np.array([peak[0] for peak in maxima.values()], dtype=np.float64)
    threshold, largest = float(np.percentile(values, PERCENTILE)), float(values.max())
    chosen = [at for at, peak in maxima.items() if peak[0] > threshold and peak[0] > RATIO_TO_LARGEST * largest]
    return sorted(chosen, key=lambda at: (-maxima[at][0], at)), threshold, largest


def routed_experts(recorders):
    """{layer: the experts (not a shared one) some prompt routes a token to in the intact model}."""
    routed = {}
    for recorder in recorders:
        for layer, by_key in recorder.experts.items():
            routed.setdefault(layer, set()).update(e for e in by_key.get(INTACT, {}) if e != SHARED)
    return routed


def removable(experts, moe):
    """Can these (layer, expert) pairs all be removed: does every layer keep num_experts_per_tok experts?"""
    layers = [layer for layer, _ in experts]
    return all(moe.n_experts - layers.count(layer) >= moe.top_k for layer in set(layers))


def control_experts(chosen, routed, moe, seed=CONTROL_SEED):
    """One other expert per super expert, from its layer: [(layer, expert)] (see the module docstring);
    fewer where a layer would be left with fewer experts than a token is routed to."""
    rng, super_set, control = np.random.default_rng(seed), set(chosen), []
    n_experts = moe.n_experts
    for layer, _ in chosen:
        if not removable(control + [(layer, -1)], moe):
            continue
        taken = super_set | set(control)
        pool = sorted(e for e in routed.get(layer, ()) if (layer, e) not in taken)
        pool = pool or sorted(e for e in range(n_experts) if (layer, e) not in taken)
        if pool:
            control.append((layer, int(rng.choice(pool))))
    return control


def down_proj_row(model, layer, expert, row):
    """{row, col, value, rms_others, tensor_index}: the largest |w| of row `row` of the expert's down
    projection, where the file stores it, and the RMS of the row's other weights (what audit reads back)."""
    from swtool.detect import down_proj_matrix, stored_index

    matrix = down_proj_matrix(model, layer, expert)
    weights = matrix.read(rows=[row])[0]
    col = int(np.argmax(np.abs(weights)))
    return {"row": row, "col": col, "value": float(weights[col]), "rms_others": others_rms(weights, col),
            "tensor_index": stored_index(model, matrix, expert, row, col)}


def others_rms(weights, col):
    """The RMS of a row's weights but the one at `col`: a large weight there would hide what the rest do."""
    rest = np.delete(weights, col)
    return float(np.sqrt(np.mean(np.square(rest, dtype=np.float64)))) if rest.size else 0.0


def plan(model, recorders):
    """(SuperExperts without verification, control [(layer, expert)], {name: world key}, criterion numbers)."""
    maxima = expert_maxima(recorders)
    chosen, threshold, largest = criterion(maxima)
    values = np.array([peak[0] for peak in maxima.values()])
    found = []
    for layer, expert in chosen:
        peak, token, channel, value, prompt = maxima[layer, expert]
        tensor = model.arch.down_proj_name(layer, expert)
        found.append(SuperExpert(layer, expert, peak, value, token, channel, prompt,
                                 percentile=float(100.0 * np.mean(values <= peak)), ratio=peak / largest,
                                 tensor=tensor, gguf_tensor=model.arch.gguf_name(tensor),
                                 down_proj_row=down_proj_row(model, layer, expert, channel)))
    moe = model.arch.moe
    control = control_experts(chosen, routed_experts(recorders), moe)
    # a world that would leave a layer fewer experts than a token is routed to cannot be run: left out
    candidates = {("alone", layer, expert): [(layer, expert)] for layer, expert in chosen}
    candidates.update({"all": chosen} if found else {})
    candidates.update({"control": control} if control else {})
    worlds = {"intact": INTACT}
    worlds.update({name: removal(pairs) for name, pairs in candidates.items() if removable(pairs, moe)})
    numbers = {"experts_observed": len(maxima), "threshold": threshold, "largest": largest}
    return found, control, worlds, numbers


def verify(found, control, worlds, recorders, nll, numbers, settings):
    """Fill each SuperExpert's verification; the catalog's `super_experts` section.
    `nll`: per prompt {world key: the prompt's mean NLL}."""
    def mean_nll(key):
        return None if key is None else float(np.mean([by_key[key] for by_key in nll]))

    def activation(se, key):
        return None if key is None else abs(float(recorders[se.prompt].at(RESID, se.layer, key)[se.token, se.channel]))

    for se in found:
        removed, intact, ctrl = worlds.get(("alone", se.layer, se.expert)), worlds["intact"], worlds.get("control")
        resid = recorders[se.prompt].at(RESID, se.layer, INTACT)[se.token]
        massive = activation(se, intact) >= settings.spike_ratio * float(np.median(np.abs(resid)))
        v = {"nll_intact": mean_nll(intact), "nll_removed": mean_nll(removed), "nll_control": mean_nll(ctrl),
             "super_activation_intact": activation(se, intact), "super_activation_removed": activation(se, removed),
             "super_activation_control": activation(se, ctrl), "massive": bool(massive)}
        tests, beyond_control = [], False
        if removed is not None:  # None: removing it would leave a layer too few experts (every one routed)
            tests = [name for name, passed in (
                ("activation", massive and v["super_activation_removed"]
                 < settings.verify_activation_drop * v["super_activation_intact"]),
                ("NLL", v["nll_removed"] - v["nll_intact"] > settings.verify_nll_rise)) if passed]
            beyond_control = ctrl is None or (v["nll_removed"] > v["nll_control"]
                                              or v["super_activation_removed"] < v["super_activation_control"])
        v["verified"] = bool(tests) and beyond_control
        v["verified_by"] = tests if beyond_control else []
        se.verification = v
    section = {"criterion": {"percentile": PERCENTILE, "ratio_to_largest": RATIO_TO_LARGEST}, **numbers,
               "control_seed": CONTROL_SEED,
               "control": [{"layer": layer, "expert": expert} for layer, expert in control],
               "nll_intact": mean_nll(worlds["intact"]),
               "nll_all_removed": mean_nll(worlds.get("all")),
               "nll_control": mean_nll(worlds.get("control")),
               "experts": [se.to_json() for se in found]}
    return section


def format_super_experts(section, n_prompts=1):
    """The scan table's lines about super experts (catalog section `super_experts`)."""
    from swtool.table import format_table

    experts = section["experts"]
    head = (f"super experts (Su et al. 2025: max |down_proj output| above the {section['criterion']['percentile']:g}th "
            f"percentile of {plural(section['experts_observed'], 'expert')}' maxima and "
            f"{section['criterion']['ratio_to_largest']:g} x the largest)")
    if not experts:
        return [head + ": none"]
    rows = []
    for se in experts:
        v = se["verification"]
        rows.append([se["layer"], se["expert"], f"{se['value']:.4g}", f"{se['percentile']:.1f}", f"{se['ratio']:.3g}",
                     _number(v["super_activation_intact"]), _number(v["super_activation_removed"]),
                     _number(v["super_activation_control"]), _rise(v["nll_removed"], v["nll_intact"]),
                     _rise(v["nll_control"], v["nll_intact"]), ",".join(v["verified_by"]) if v["verified"] else "no"])
    header = ["layer", "expert", "max out", "pct", "x largest", "SA", "SA -e", "SA ctrl", "NLL -e", "NLL ctrl",
              "verified by"]
    control = ", ".join(f"{c['layer']}:{c['expert']}" for c in section["control"]) or "none available"
    over = f", mean over {n_prompts} prompts" if n_prompts > 1 else ""
    which = "the super expert" if len(experts) == 1 else f"all {len(experts)}"
    notes = ["SA: super activation |residual[token, channel]| after the layer; -e: with the expert removed (the",
             f"router never picks it); ctrl: with as many other experts removed (layer:expert {control});",
             f"NLL: change of the prompt's mean NLL{over}; with {which} removed {_number(section['nll_intact'], '.3f')}"
             f" -> {_number(section['nll_all_removed'], '.3f')} (control {_number(section['nll_control'], '.3f')})"]
    if any(value is None for se in experts for value in se["verification"].values()) or None in (
            section["nll_all_removed"], section["nll_control"]):
        notes.append("-: not measured, removing that many experts would leave a layer fewer than a token is routed to")
    if section["experts_observed"] <= 200:
        notes.append("with at most 200 experts observed the largest always passes the percentile: removal decides")
    return [head + ":", format_table(header, rows)] + notes


def _number(value, spec=".4g"):
    return "-" if value is None else format(value, spec)


def _rise(value, base):
    return "-" if value is None or base is None else f"{value - base:+.3f}"


def parse_expert(text, option="--drop-expert"):
    """'L:E' as typed on the command line -> (layer, expert); a one-line error otherwise."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdecimal() for p in parts):
        raise SwtoolError(f"{option} {text!r}: expected LAYER:EXPERT, two non-negative integers like 2:92")
    return int(parts[0]), int(parts[1])


def drop_expert_edits(model, experts, option="--drop-expert"):
    """DropExpert edits removing these (layer, expert) pairs, checked against the model: a mixture, a sparse
    layer, an expert it has, and at least num_experts_per_tok experts left in each layer."""
    moe = model.arch.moe
    if experts and moe is None:
        raise SwtoolError(f"{option}: {model.path} is a {model.arch.model_type} model, not a mixture of experts")
    per_layer = {}
    for layer, expert in experts:
        where = f"{option} {layer}:{expert}"
        if layer >= model.arch.n_layers:
            raise SwtoolError(f"{where}: the model has {plural(model.arch.n_layers, 'layer')}")
        if not moe.is_sparse(layer):
            raise SwtoolError(f"{where}: layer {layer} is a dense MLP, it has no experts")
        if expert >= moe.n_experts:
            raise SwtoolError(f"{where}: layer {layer} has {plural(moe.n_experts, 'expert')} (0-based)")
        per_layer.setdefault(layer, set()).add(expert)
    for layer, removed in per_layer.items():
        if moe.n_experts - len(removed) < moe.top_k:
            raise SwtoolError(f"{option}: removing {plural(len(removed), 'expert')} of layer {layer} leaves fewer "
                              f"than the {moe.top_k} each token is routed to")
    return tuple(DropExpert(layer, expert) for layer in sorted(per_layer) for expert in sorted(per_layer[layer]))

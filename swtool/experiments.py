"""The paper's experiments (Yu et al. 2024, section 3) as worlds of one `swtool eval` pass.

  - removed:  the super weights zeroed;
  - control:  the N largest-magnitude weights *other* than the super weights zeroed
              (the paper zeroes the top fraction of |w| of every matrix except norms,
              embeddings and the LM head; here a global top N over those same matrices);
  - restored: the super weights zeroed, but the intact model's super activation
              written back at the down_proj output, channel `row`, at the token of
              each chunk where the intact model's |value| there is largest
              (the paper's `removeSW_restoreSA`, which restores at the argmax token);
  - sweep:    the super weights multiplied by each of a list of scales;
  - stop words: the mean next-token probability of stop words, per world.

All worlds share one pass: an edit of W[j, m] only changes output channel j of
its linear (forward.py), so the weights are still read once.
"""

from dataclasses import dataclass

import numpy as np

from swtool.checkpoint.transposed import TransposedTensor
from swtool.arch.base import DOWN_OUT
from swtool.errors import SwtoolError
from swtool.experts import drop_expert_edits
from swtool.forward import DropExpert, Edit, ScaleElements, World
from swtool.table import plural

# Words whose probability the paper reports rising when the super weights go (its Figure 5).
STOP_WORDS = ("the", "a", "an", "and", "or", "but", "of", "to", "in", "on", "at", "for", "with", "from",
              "by", "as", "is", "was", "are", "were", "be", "it", "that", "this", ".", ",", ";", ":")
SCHEMA_ID = "swtool.eval/1"  # what `swtool eval --json` prints: swtool/schema/eval.schema.json
NOT_CONTROL = ("embed", "lm_head", "norm", "wte", "wpe")  # name parts of tensors the paper's control skips
CONTROL_CHUNK_BYTES = 64 * 1024 * 1024  # the control's top-N pre-pass decodes this much of a matrix at a time


def stop_word_ids(tokenizer, words=STOP_WORDS):
    """{token text: id} of every stop word that is one token, bare ("the") and after a space (" the")."""
    found = {}
    for word in words:
        for text in (word, " " + word) if word.isalpha() else (word,):
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            if len(ids) == 1:
                found[text] = ids[0]
    if not found:
        raise SwtoolError("none of the stop words is a single token of this tokenizer")
    return found


def super_weight_edits(super_weights, factor):
    """Edits multiplying each super weight (catalog entries) by `factor`."""
    return tuple(Edit(sw["tensor"], sw["row"], sw["col"], float(factor), sw.get("expert")) for sw in super_weights)


def control_matrices(model):
    """Names of the 2-D weights the paper's control may zero: no norms, embeddings or LM head."""
    names = []
    for name, shape in model.arch.tensor_shapes().items():
        if len(shape) == 2 and name.endswith("weight") and not any(part in name for part in NOT_CONTROL):
            names.append(name)
    return names


def control_edits(model, super_weights, n, progress=False):
    """Edits zeroing the n largest-|w| weights of control_matrices() other than the super weights.

    A streaming pre-pass: one matrix (in row chunks) at a time, keeping a running top n,
    so the model is never loaded whole. Ties break by tensor order, then flat index.
    """
    from swtool.progress import progress_bar

    if n < 1:
        raise SwtoolError(f"--control-top must be at least 1, got {n}")
    exclude = {(sw["tensor"], sw["row"], sw["col"]) for sw in super_weights}
    names = control_matrices(model)
    best_abs, best_tensor, best_flat = np.empty(0), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    for t, name in enumerate(progress_bar(names, progress, desc=f"control: top {plural(n, 'weight')}",
                                          unit="tensor", leave=False)):
        info = model.checkpoint.tensor(name)
        if model.arch.stored_transposed(name):
            info = TransposedTensor(info)  # GPT-2's Conv1D: read as W [out, in], so rows/cols mean what edits mean
        n_rows, n_cols = info.shape
        step = max(1, CONTROL_CHUNK_BYTES // (4 * n_cols))
        for start in range(0, n_rows, step):
            block = np.abs(info.read(rows=slice(start, min(n_rows, start + step)))).reshape(-1)
            flat = np.arange(start * n_cols, start * n_cols + block.size)
            for tensor, row, col in exclude:
                if tensor == name and start <= row < start + step:
                    block[(row - start) * n_cols + col] = -1.0  # never chosen
            k = min(n, block.size)
            top = np.argpartition(-block, k - 1)[:k]
            best_abs = np.concatenate([best_abs, block[top]])
            best_tensor = np.concatenate([best_tensor, np.full(k, t)])
            best_flat = np.concatenate([best_flat, flat[top]])
            order = np.lexsort((best_flat, best_tensor, -best_abs))[:n]
            best_abs, best_tensor, best_flat = best_abs[order], best_tensor[order], best_flat[order]
    if len(best_abs) < n or best_abs.min() < 0:
        raise SwtoolError(f"--control-top {n}: the model has fewer other weights than that")
    edits = []
    for t, flat in zip(best_tensor, best_flat):
        shape = model.checkpoint.tensor(names[t]).shape
        n_cols = shape[0] if model.arch.stored_transposed(names[t]) else shape[1]
        row, col = divmod(int(flat), n_cols)
        edits.append(Edit(names[t], row, col, 0.0))
    return edits


@dataclass
class RestoreActivation:
    """Activation transform: write the source world's super activation back into the target world.

    At the down_proj output of each layer in `channels` ({layer: [row, ...]}), for each
    chunk, the token where the source world's |value| in that channel is largest (real
    positions only) gets the source's value in the target world's row of that chunk.
    """

    channels: dict
    source: int
    target: int
    valid: np.ndarray  # [B, ctx] real positions of this pass's chunks

    def __call__(self, point, layer, x, ctx):
        if point != DOWN_OUT or layer not in self.channels:
            return None
        source, target = x[ctx.rows_of_world(self.source)], x[ctx.rows_of_world(self.target)]  # views [B, T, C]
        chunk = np.arange(len(self.valid))
        for channel in self.channels[layer]:
            magnitude = np.where(self.valid, np.abs(source[:, :, channel]), -1.0)
            token = np.argmax(magnitude, axis=1)  # the paper's argmax token, per chunk
            target[chunk, token, channel] = source[chunk, token, channel]
        return None  # changed in place


class ExperimentReport:
    """The worlds of a super-weight report and where each one is in the plan."""

    def __init__(self, super_weights):
        if not super_weights:
            raise SwtoolError("the catalog lists no super weights to experiment with")
        self.super_weights = super_weights
        self.worlds = [World("original")]
        self.index = {"original": 0}
        self.hook_factories = []
        self.add("removed", super_weight_edits(super_weights, 0.0))

    def add(self, name, edits):
        """Index of the world with these edits, reusing an identical world (scale 1 is the original)."""
        edits = tuple(edit for edit in edits if edit.factor != 1.0)  # x1 changes nothing
        for i, world in enumerate(self.worlds):
            if set(world.edits) == set(edits):
                self.index.setdefault(name, i)
                return i
        self.worlds.append(World(name, tuple(edits)))
        self.index[name] = len(self.worlds) - 1
        return self.index[name]

    def add_control(self, edits):
        self.add("control", edits)

    def add_restore(self):
        """A world without the super weights whose super activation is written back from the original."""
        channels = {}
        for sw in self.super_weights:
            channels.setdefault(sw["layer"], set()).add(sw["row"])
        channels = {layer: sorted(rows) for layer, rows in channels.items()}
        # its own world even though its edits equal "removed": the hook tells them apart
        self.worlds.append(World("restored", super_weight_edits(self.super_weights, 0.0)))
        target = self.index["restored"] = len(self.worlds) - 1
        self.hook_factories.append(lambda part: [RestoreActivation(channels, 0, target, part.valid())])

    def add_sweep(self, scales):
        for scale in scales:
            self.add(f"scale {scale:g}", super_weight_edits(self.super_weights, scale))


def parse_scales(text):
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; a one-line error otherwise."""
    try:
        scales = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SwtoolError(f"--sweep {text!r}: expected comma-separated numbers, e.g. 0,0.5,1,1.5,2,3") from None
    if not scales or not all(np.isfinite(scales)):
        raise SwtoolError(f"--sweep {text!r}: expected comma-separated finite numbers, e.g. 0,0.5,1,1.5,2,3")
    return scales


def zero_edits(model, coordinates):
    """Edits zeroing the down_proj elements at `coordinates` (Coordinate), checked against the model."""
    edits = []
    for at in coordinates:
        layer, row, col = at.layer, at.row, at.col
        if layer >= model.arch.n_layers:
            raise SwtoolError(f"--zero {layer}:{row}:{col}: the model has {plural(model.arch.n_layers, 'layer')}")
        name = model.arch.down_proj_name(layer)
        shape = model.checkpoint.tensor(name).shape
        if model.arch.stored_transposed(name):
            shape = shape[::-1]
        if row >= shape[0] or col >= shape[1]:
            raise SwtoolError(f"--zero {layer}:{row}:{col}: {name} is {shape[0]} x {shape[1]} ([out, in])")
        edits.append(Edit(name, row, col, 0.0))
    return edits


@dataclass
class EvalOptions:
    """What `swtool eval` was asked to change or compare (see build_plan)."""

    zero: tuple = ()  # (layer, row, col) to zero in every world
    super_weights: list | None = None  # the catalog's entries, if a catalog was given
    ablate: bool = False  # evaluate with the super weights zeroed
    scale_super: float | None = None  # ... or multiplied by this
    control_top: int | None = None
    restore_activation: bool = False
    sweep: tuple = ()
    drop_experts: tuple = ()  # (layer, expert) removed from the router's choice in every world

    def experiments(self):
        return self.control_top is not None or self.restore_activation or bool(self.sweep)


def build_plan(model, options, progress=False):
    """(Plan, ExperimentReport or None) for `swtool eval`.

    Without a catalog, or with --ablate / --scale-super: one world, the model with
    those weights changed. With a catalog otherwise: a report, the original model
    next to the super weights removed and any experiments asked for.
    """
    from swtool.ablate import locate

    sws = options.super_weights
    changes_super = options.ablate or options.scale_super is not None
    if sws is None and (changes_super or options.experiments()):
        raise SwtoolError("--ablate, --scale-super, --control-top, --restore-activation and --sweep "
                          "need --catalog (the super weights they act on)")
    if options.ablate and options.scale_super is not None:
        raise SwtoolError("--ablate is --scale-super 0; give one of them")
    if changes_super and options.experiments():
        raise SwtoolError("--ablate/--scale-super evaluate one changed model; the experiments "
                          "(--control-top, --restore-activation, --sweep) compare against the original: "
                          "use one or the other")
    for sw in sws or ():
        locate(model.checkpoint, sw)  # the catalog must describe this checkpoint
    plan, report = _plan(model, options, sws, changes_super, progress)
    drops = drop_expert_edits(model, options.drop_experts)  # a world edit, in every world
    plan.worlds = [World(world.name, world.edits + drops) for world in plan.worlds]
    return plan, report


def _plan(model, options, sws, changes_super, progress):
    """build_plan's worlds and transforms, before --drop-expert adds its removed experts to every world."""
    from swtool.evaluate import Plan

    edits = list(zero_edits(model, options.zero))
    if changes_super:
        edits += super_weight_edits(sws, 0.0 if options.ablate else options.scale_super)
    transforms = [ScaleElements(edits)] if edits else []
    if sws is None or changes_super:
        return Plan([World("model")], transforms), None
    report = ExperimentReport(sws)
    if options.control_top is not None:
        report.add_control(control_edits(model, sws, options.control_top, progress))
    if options.restore_activation:
        report.add_restore()
    if options.sweep:
        report.add_sweep(options.sweep)
    return Plan(report.worlds, transforms, report.hook_factories), report


def describe_eval(model, text_path, n_tokens, chunks, plan, report, scores, tokenizer, stop_ids, options, kld=None):
    """The JSON-ready result of `swtool eval`: one entry per world, plus what was scored and changed.
    `kld`: (the reference's name, its WorldScore, a KldStats per world) with --kld-reference."""
    stop = np.array(list(stop_ids.values()), dtype=np.int64)
    original = scores[0].perplexity if report is not None else None
    everywhere = sum(len(t.edits) for t in plan.transforms)  # --zero, --ablate, --scale-super: in every world
    worlds = []
    for world, score in zip(plan.worlds, scores):
        edited = sum(not isinstance(edit, DropExpert) for edit in world.edits)
        entry = {"name": world.name, "weights_edited": everywhere + edited, "nll": score.nll,
                 "perplexity": score.perplexity, "predictions": score.count,
                 "stop_word_probability": float(score.mean_probability(stop).sum()),
                 "top_tokens": [{"id": int(t), "text": tokenizer.decode([int(t)], skip_special_tokens=False),
                                 "probability": float(score.mean_probability([t])[0])} for t in score.top_tokens(5)],
                 "peak_down_proj_output": [float(v) for v in score.peak_down_out]}
        if original is not None:
            entry["perplexity_ratio"] = score.perplexity / original
        if kld is not None:
            entry["kld"] = kld[2][len(worlds)].to_json()
        worlds.append(entry)
    result = {
        "schema": SCHEMA_ID,
        "model": str(model.path),
        "text": str(text_path),
        "tokens": n_tokens,
        "ctx": chunks.ctx,
        "chunks": len(chunks.tokens),
        "scored": ("predictions from position ctx/2 on in each chunk" if chunks.first_scored
                   else "every prediction in each chunk"),
        "zeroed": [[c.layer, c.row, c.col] for c in options.zero],
        "stop_words": {text: int(i) for text, i in stop_ids.items()},
        "worlds": worlds,
    }
    if options.drop_experts:
        result["experts_dropped"] = [[drop.layer, drop.expert] for drop in drop_expert_edits(model, options.drop_experts)]
    if report is not None:
        result["super_weights"] = [{key: sw.get(key) for key in ("layer", "row", "col", "expert", "tensor", "value")}
                                   for sw in report.super_weights]
        result["compare"] = {name: i for name, i in report.index.items()}
        if options.control_top is not None:
            control = [e for e in plan.worlds[report.index["control"]].edits if isinstance(e, Edit)]
            result["control"] = [{"tensor": e.tensor, "row": e.row, "col": e.col} for e in control]
        if options.sweep:
            result["sweep"] = [{"scale": s, "perplexity": scores[report.index[f"scale {s:g}"]].perplexity}
                               for s in options.sweep]
    elif options.ablate or options.scale_super is not None:
        result["super_weights_scaled_by"] = 0.0 if options.ablate else options.scale_super
    if kld is not None:
        name, score, _ = kld
        result["kld_reference"] = {"model": str(name), "perplexity": score.perplexity, "predictions": score.count}
    return result


def format_eval(result):
    """The human table of an evaluation."""
    from swtool.table import format_table, plural

    lines = [f"{result['model']}: {result['text']}, {plural(result['tokens'], 'token')} in "
             f"{plural(result['chunks'], 'chunk')} of {result['ctx']}; "
             f"{plural(result['worlds'][0]['predictions'], 'prediction')} scored ({result['scored']})"]
    if result["zeroed"]:
        lines.append("zeroed in every world: " + ", ".join(":".join(map(str, c)) for c in result["zeroed"]))
    if result.get("experts_dropped"):
        lines.append("experts removed in every world (the router never picks them), layer:expert: "
                     + ", ".join(f"{layer}:{expert}" for layer, expert in result["experts_dropped"]))
    if "super_weights_scaled_by" in result:
        lines.append(f"the catalog's super weights multiplied by {result['super_weights_scaled_by']:g}")
    compare = "perplexity_ratio" in result["worlds"][0]
    kld = "kld_reference" in result
    header = ["world", "weights", "perplexity", "NLL"] + (["x original"] if compare else []) + (
        ["KLD", "KLD 99%", "same top"] if kld else []) + ["stop words", "top next token"]
    rows = []
    for w in result["worlds"]:
        top = w["top_tokens"][0]
        rows.append([w["name"], w["weights_edited"], f"{w['perplexity']:.6g}", f"{w['nll']:.4f}"]
                    + ([f"{w['perplexity_ratio']:.4g}"] if compare else [])
                    + ([f"{w['kld']['mean']:.4g}", f"{w['kld']['p99']:.4g}", f"{100 * w['kld']['same_top']:.2f} %"]
                       if kld else [])
                    + [f"{w['stop_word_probability']:.4f}", f"{top['text']!r} {top['probability']:.3f}"])
    lines.append(format_table(header, rows))
    shown = ", ".join(repr(t) for t in list(result["stop_words"])[:6])
    lines.append("weights: elements edited in that world; stop words: mean next-token probability of "
                 f"{plural(len(result['stop_words']), 'stop-word token')} ({shown}, ...)")
    if kld:
        reference = result["kld_reference"]
        lines.append(f"KLD: KL divergence of each world's next-token distributions from {reference['model']}'s "
                     f"(perplexity {reference['perplexity']:.6g}) at the same predictions (nats), mean and 99th "
                     "percentile; same top: predictions whose most likely token is the reference's")
    if compare:
        by_name = {w["name"]: w for w in result["worlds"]}
        original, removed = by_name["original"], by_name["removed"]
        before, after = original["stop_word_probability"], removed["stop_word_probability"]
        lines.append(f"stop-word shift, super weights removed: {before:.4f} -> {after:.4f} (x{after / before:.3g})")
    return "\n".join(lines)

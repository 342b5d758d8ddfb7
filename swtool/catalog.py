"""The catalog: a versioned JSON record of a model's super weights and how they were found.

Schema `swtool.catalog/2` lives in swtool/schema/catalog.schema.json; every
catalog is validated against it when read, so ablate/audit/export never act on
a malformed one. Version 2 adds the scan's prompts (detection.prompts) and, per
super weight, in how many prompts it was found and verified (found_in,
verified_in, per_prompt) and which test verified it (verification.verified_by);
catalogs of version 1, which have one prompt and none of these, are still read.
`renormalised_spikes` (added within version 2, absent from older catalogs) lists the weights of
down_proj spikes that a post-FFN norm caps (detect.RenormalisedSpike): not super weights, so no
command that acts on super weights reads it.
A mixture's catalog may also have `super_experts` (experts.py), an optional section.
"""

import hashlib
import json
from dataclasses import asdict

from swtool import __version__
from swtool.atomic import write_text_atomic
from swtool.coordinate import Coordinate
from swtool.errors import SwtoolError
from swtool.inputfile import open_regular
from swtool.table import format_table, plural

SCHEMA_ID = "swtool.catalog/2"
READABLE = ("swtool.catalog/1", SCHEMA_ID)  # the versions read_catalog accepts


def schema():
    from swtool import schemas

    return schemas.load("catalog")


def sha256_file(path, chunk=16 * 1024 * 1024):
    digest = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def config_sha256(config):
    """The hash a catalog records of the config it was made from (and beside-catalogs are matched by)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def build_catalog(model, prompts, tokens, settings, super_weights, reports, with_hashes=False):
    """The catalog dict of one scan of `prompts` (texts; `tokens`: their token ids; `reports`: scan_prompts's
    per-prompt reports; `super_weights`: detect.merge_prompts's list). `detection.prompt`, `tokens`
    and the NLLs are the first prompt's, as in a catalog of version 1; `detection.prompts` has them all.
    A scan of one prompt may also be given as detect.scan has it: prompt, tokens, found, report."""
    from swtool.detect import merge_prompts, merge_renormalised
    from swtool.known import fingerprint_of

    if isinstance(prompts, str):
        prompts, tokens, reports = [prompts], [tokens], [reports]
        super_weights = merge_prompts([(super_weights, reports[0])])

    files = []
    for path in model.checkpoint.files:
        entry = {"name": path.name, "size": path.stat().st_size}
        if with_hashes:
            entry["sha256"] = sha256_file(path)
        files.append(entry)
    architectures = model.checkpoint.config.get("architectures") or [model.arch.model_type]
    catalog = {
        "schema": SCHEMA_ID,
        "tool": {"name": "swtool", "version": __version__},
        "model": {
            "path": str(model.path),
            "architecture": architectures[0],
            "model_type": model.arch.model_type,
            "num_layers": model.arch.n_layers,
            "config_sha256": config_sha256(model.checkpoint.config),
            "fingerprint": fingerprint_of(model.checkpoint.config),
            "files": files,
        },
        "detection": {
            "prompt": prompts[0],
            "tokens": [int(t) for t in tokens[0]],
            "settings": {k: v for k, v in asdict(settings).items() if k != "prompt"},
            "passes": reports[0]["passes"],
            "nll_intact": reports[0]["nll_intact"],
            "nll_all_removed": reports[0]["nll_all_removed"],
            "prompts": [{"prompt": text, "tokens": [int(t) for t in ids], "nll_intact": report["nll_intact"],
                         "nll_all_removed": report["nll_all_removed"]}
                        for text, ids, report in zip(prompts, tokens, reports)],
        },
        "super_weights": [sw.to_json() for sw in super_weights],
        "renormalised_spikes": [spike.to_json() for spike in merge_renormalised(reports)],
        "profile": reports[0]["profile"],
    }
    if reports[0].get("super_experts") is not None:  # a mixture's (experts.py), over every prompt
        catalog["super_experts"] = reports[0]["super_experts"]
    return catalog


def scan_catalog(model, prompt=None, settings=None, progress=False, with_hashes=False, tokens=None,
                 linear_observer=None):
    """(catalog, the scan's report) of `model`: the one way a command turns a model into its super weights.

    `prompt`: one prompt, or a list of prompts scanned in the same read of the weights
    (detect.scan_prompts); the paper's (tokenizer.DEFAULT_PROMPT) when None. `tokens`: the
    prompts' ids, when the caller has them already (default_prompts). `settings` default to
    scan's. The report is the first prompt's, with every prompt's under "prompts".
    `linear_observer`: sees every linear's input of the intact model (detect.scan_prompts)."""
    from swtool.detect import Settings, merge_prompts, scan_prompts
    from swtool.tokenizer import DEFAULT_PROMPT, encode, load_tokenizer

    prompts = [DEFAULT_PROMPT] if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
    settings = settings or Settings(prompt=prompts[0])
    if tokens is None:
        tokenizer = load_tokenizer(model.directory) if len(prompts) > 1 else None
        tokens = [encode(model.directory, text, tokenizer) for text in prompts]
    results = scan_prompts(model, tokens, settings, progress=progress, linear_observer=linear_observer)
    reports = [report for _, report in results]
    catalog = build_catalog(model, prompts, tokens, settings, merge_prompts(results), reports, with_hashes)
    return catalog, {**reports[0], "prompts": reports}


def default_prompts(model):
    """(prompts, their token ids, note): scan's default prompts for `model` (tokenizer.DEFAULT_PROMPTS), or,
    where its RoPE frequencies change with the length past a limit some of them cross (dynamic NTK, longrope),
    those that stay within it, with a note saying what was left out: prompts of other lengths past the limit
    cannot share one padded pass (forking.ForkingPass). When none fits, the paper's prompt alone, which a pass
    of one prompt scans at any length. The ids go to scan_catalog, which then need not tokenize again."""
    from swtool.arch.rope import length_limit
    from swtool.tokenizer import DEFAULT_PROMPTS, encode, load_tokenizer

    tokenizer = load_tokenizer(model.directory)
    tokens = {text: encode(model.directory, text, tokenizer) for text in DEFAULT_PROMPTS}
    limit = length_limit(model.checkpoint.config)
    fitting = [text for text in DEFAULT_PROMPTS if limit is None or len(tokens[text]) <= limit]
    if len(fitting) == len(DEFAULT_PROMPTS):
        return fitting, [tokens[text] for text in fitting], None
    kept = fitting or [DEFAULT_PROMPTS[0]]
    return kept, [tokens[text] for text in kept], (
        f"{plural(len(DEFAULT_PROMPTS) - len(kept), 'default prompt')} left out: longer than the "
        f"{int(limit)} tokens past which this model's RoPE frequencies depend on the length")


def super_weights_for(model, catalog=None, prompt=None, progress=False):
    """(catalog dict, where it came from): the catalog file `catalog`, checked against `model`
    (another model's is a one-line error), or else a scan of `model`."""
    if catalog:
        return read_catalog_for(catalog, model), f"catalog {catalog}"
    scanned, _ = scan_catalog(model, prompt, progress=progress)
    return scanned, "scanned with the default prompt" if prompt is None else "scanned"


def validate(catalog, source="catalog"):
    """Raise SwtoolError with the first schema violation, naming where it is."""
    from swtool import schemas

    schemas.validate("catalog", catalog, source)


def write_catalog(catalog, path):
    text = to_json(catalog)
    validate(json.loads(text), str(path))  # what is written, as a reader will see it
    write_text_atomic(path, text)


def to_json(catalog):
    """The catalog as standard JSON: activations that were NaN or Inf (a model with non-finite
    weights, see finite.py) are written as null, since JSON has no NaN."""
    from swtool.jsonfile import strict_json

    return strict_json(catalog) + "\n"


def read_catalog(path):
    """A catalog file, validated against its schema and checked for entries that contradict themselves."""
    from swtool.jsonfile import read_json

    catalog = read_json(path)
    validate(catalog, str(path))
    problem = entry_problem(catalog)
    if problem:
        raise SwtoolError(f"{path}: invalid catalog: {problem}")
    return catalog


def entry_problem(catalog):
    """The first super-weight entry whose fields disagree with each other or with the model's layer
    count, as a phrase, or None. Every command reads an entry's element through these fields (audit by
    layer/row/col, ablate by tensor_index), so they must name one element."""
    n_layers, seen = catalog["model"]["num_layers"], set()
    for i, sw in enumerate(catalog["super_weights"]):
        layer, row, col, expert = sw["layer"], sw["row"], sw["col"], sw.get("expert")
        where = f"super_weights/{i} [{layer}, {row}, {col}]"
        if layer >= n_layers:
            return f"{where}: layer {layer} of a model with {plural(n_layers, 'layer')}"
        if f".{layer}." not in sw["tensor"] or not sw["gguf_tensor"].startswith(f"blk.{layer}."):
            return f"{where}: tensor {sw['tensor']!r} / {sw['gguf_tensor']!r} is not in layer {layer}"
        index = sw.get("tensor_index")
        if index is not None:
            stacked = [expert, row, col] if expert is not None else None
            if len(index) == 3 and index != stacked:
                return f"{where}: tensor_index {index} is not [expert, row, col] = {stacked}"
            if len(index) == 2 and index not in ([row, col], [col, row]):
                return f"{where}: tensor_index {index} is neither [row, col] nor [col, row]"
        key = Coordinate.of(sw)
        if key in seen:
            return f"{where}: listed twice"
        seen.add(key)
    return None


def mismatch(catalog, model, strict=False):
    """Why `catalog` is not a catalog of `model` (one phrase), or None if it fits.

    Layer count and family always; with `strict`, also the config's hash or, failing that, its
    fingerprint (known.fingerprint_of): how a catalog found beside a model is told from one of
    another model in the same folder."""
    from swtool.known import SAME_FAMILY, fingerprint_of

    recorded = catalog["model"]
    if recorded["num_layers"] != model.arch.n_layers:
        return (f"the catalog is for a model with {plural(recorded['num_layers'], 'layer')}; "
                f"this one has {model.arch.n_layers}")
    theirs, ours = recorded["model_type"], model.arch.model_type
    # a GGUF read from its header alone is named by llama.cpp's architecture, not a config model_type
    if model.arch.runs and SAME_FAMILY.get(theirs, theirs) != SAME_FAMILY.get(ours, ours):
        return f"the catalog is for a {theirs} model; this one is {ours}"
    if strict and recorded["config_sha256"] != config_sha256(model.checkpoint.config):
        # a GGUF's config is rebuilt from its metadata: the same model, another hash; the shape tells
        if recorded.get("fingerprint") != fingerprint_of(model.checkpoint.config):
            return "the catalog was made from another config.json"
    return None


def read_catalog_for(path, model):
    """read_catalog, then a one-line error unless it is a catalog of `model`."""
    catalog = read_catalog(path)
    problem = mismatch(catalog, model)
    if problem:
        raise SwtoolError(f"{path}: {problem}")
    return catalog


BESIDE_LIMIT = 64 * 1024 * 1024  # a catalog larger than this is not read while looking around a model
MODEL_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json"}


def catalogs_beside(model):
    """[(path, catalog, mismatch or None)] of the swtool catalogs in the model's folder, sorted by name.

    Only regular files are opened (a FIFO named *.json must not block), and a file that is
    not a valid catalog is passed over: looking around a model never fails the command."""
    import stat

    checkpoint = model.checkpoint
    directory = checkpoint.path.parent if getattr(checkpoint, "format", None) == "gguf" else checkpoint.directory
    found = []
    for candidate in sorted(directory.glob("*.json")):
        try:
            status = candidate.stat()
            if not stat.S_ISREG(status.st_mode) or status.st_size > BESIDE_LIMIT:
                continue
            if candidate.name in MODEL_FILES or candidate.name.endswith(".index.json"):
                continue
            catalog = read_catalog(candidate)
        except (OSError, SwtoolError):
            continue
        found.append((candidate, catalog, mismatch(catalog, model, strict=True)))
    return found


def format_scan(catalog, wide=False):
    """The human table of a scan: compact (about 100 columns), or with `wide` every measurement of
    the first prompt that found each weight. Tensors are named as the input names them: llama.cpp's
    names for a GGUF file, Hugging Face's for safetensors."""
    model, detection = catalog["model"], catalog["detection"]
    prompts = detection.get("prompts") or [{"prompt": detection["prompt"], "tokens": detection["tokens"],
                                            "nll_intact": detection["nll_intact"],
                                            "nll_all_removed": detection.get("nll_all_removed")}]
    n = len(prompts)
    lengths = sorted(len(p["tokens"]) for p in prompts)
    said = (f"prompt of {plural(lengths[0], 'token')}" if n == 1 else
            f"{n} prompts of {lengths[0]}-{lengths[-1]} tokens" if lengths[0] != lengths[-1] else
            f"{n} prompts of {plural(lengths[0], 'token')}")
    lines = [f"{model['path']}: {model['architecture']}, {plural(model['num_layers'], 'layer')}, "
             f"{said}, {plural(detection['passes'], 'pass', 'passes')} over the weights"]
    if catalog.get("nonfinite_weights"):
        from swtool.finite import describe_nonfinite

        lines.append(f"WARNING: {describe_nonfinite(catalog['nonfinite_weights'])}; activations after them are not "
                     f"finite, so what follows is not a verdict on this model")
    gguf = any(f["name"].endswith(".gguf") for f in model["files"])
    if catalog["super_weights"]:
        lines += _super_weight_lines(catalog, prompts, gguf, wide)
    else:
        lines.append("no super weight found: no down_proj output spike creates a persistent massive activation")
    if catalog.get("renormalised_spikes"):
        lines += _renormalised_lines(catalog["renormalised_spikes"], n, gguf, wide)
    return "\n".join(lines + super_expert_lines(catalog, n))


def _super_weight_lines(catalog, prompts, gguf, wide):
    """The table of the super weights, its legend and the prompts' NLL with them removed."""
    sws, detection, n = catalog["super_weights"], catalog["detection"], len(prompts)
    lines = []
    mixture = any(sw.get("expert") is not None for sw in sws)  # name the expert only where there are experts
    rows = []
    for sw in sws:
        v = sw["verification"]
        tensor = sw["gguf_tensor"] if gguf else sw["tensor"]
        found = f"{sw.get('found_in', 1)}/{n}"
        verified = f"{sw.get('verified_in', int(v['verified']))}/{n} {verified_by(sw)}"  # 4/5 NLL,set; 2/5 weak (NLL)
        start = [sw["layer"], sw["row"], sw["col"]] + [sw.get("expert")] * mixture + [tensor, f"{sw['value']:.4g}"]
        if wide:
            rows.append(start + [sw["dtype"], sw["rank"], sw["token"], f"{sw['input_activation']:.4g}",
                                 f"{sw['output_activation']:.4g}", f"{v['super_activation_intact']:.4g}",
                                 f"{v['super_activation_removed']:.4g}", f"{v['super_activation_set_removed']:.4g}",
                                 f"{v['nll_intact']:.3f}", f"{v['nll_removed']:.3f}", f"{v['nll_set_removed']:.3f}",
                                 found, verified])
        else:
            rows.append(start + [found, nll_effect(sw), verified])
    header = ["layer", "row", "col"] + ["expert"] * mixture + ["tensor", "value"]
    if wide:
        header += ["dtype", "rank", "token", "input", "output", "SA", "SA -w", "SA -row", "NLL", "NLL -w", "NLL -row"]
    header += ["found"] + ([] if wide else ["NLL -w"]) + ["verified by"]
    lines.append(format_table(header, rows))
    if mixture:
        lines.append("expert: the mixture expert holding the weight; ffn_down_exps stacks experts, "
                     "the weight is its element [expert, row, col]")
    if wide:
        lines.append("input/output: down_proj activations at [token, col] / [token, row]; SA: super activation "
                     "|residual[token, row]| after the layer;\nNLL: the prompt's mean negative log-likelihood; "
                     "-w: with this weight zeroed; -row: with every super weight of this row and layer zeroed"
                     + ("; in the first prompt that found it" if n > 1 else ""))
    else:
        lines.append("NLL -w: change of the prompt's mean NLL with the weight zeroed alone"
                     + (", lowest..highest over prompts" if n > 1 else ""))
    lines.append("found: in how many prompts; verified by: in how many, and which test passed: activation (zeroing\n"
                 "it alone collapses the super activation), NLL (it raises the prompt's NLL), set (only zeroing its\n"
                 "row's set does); " + ("weak: verified in half the prompts or fewer" if n > 1 else "weak: none"))
    removed = "the super weight" if len(sws) == 1 else f"all {len(sws)}"
    if n == 1:
        lines.append(f"prompt NLL with {removed} removed: {detection['nll_intact']:.3f} -> "
                     f"{detection['nll_all_removed']:.3f}")
    else:
        lines.append(f"prompt NLL, intact -> with {removed} removed:")
        for i, prompt in enumerate(prompts):
            after = prompt.get("nll_all_removed")
            lines.append(f"  {i + 1}. {prompt['nll_intact']:.3f} -> " + ("-" if after is None else f"{after:.3f}")
                         + f"  {prompt['prompt']!r}")
    return lines


def _renormalised_lines(spikes, n, gguf, wide=False):
    """The table of the renormalised spikes (detect.RenormalisedSpike): listed as weak, not super weights;
    `wide` adds the weight's dtype and rank, the token, the down_proj input and the residual."""
    mixture = any(spike.get("expert") is not None for spike in spikes)
    norms = sorted({spike["norm"].split(".")[-2] for spike in spikes if spike.get("norm")}) or ["output norm"]
    rows = []
    for spike in spikes:
        row = [spike["layer"], spike["row"], spike["col"]] + [spike.get("expert")] * mixture + [
            spike["gguf_tensor"] if gguf else spike["tensor"], f"{spike['value']:.4g}"]
        if wide:
            row += [spike.get("dtype", "-"), spike.get("rank", "-"), spike["token"],
                    _number(spike.get("input_activation"))]
        row += [f"{spike.get('found_in', 1)}/{n}", _number(spike["output_activation"]), _number(spike["after_norm"])]
        rows.append(row + [_number(spike.get("residual"))] * wide + [f"weak: {spike['reason']}"])
    header = (["layer", "row", "col"] + ["expert"] * mixture + ["tensor", "value"]
              + ["dtype", "rank", "token", "input"] * wide + ["found", "before norm", "after norm"]
              + ["residual"] * wide + ["verified by"])
    return [f"down_proj output spikes that {', '.join(norms)} caps (not super weights):",
            format_table(header, rows),
            "before norm: the down_proj output at [token, row]; after norm: what the norm adds to the residual there"
            + (";\ninput: the down_proj input at [token, col]; residual: the residual at [token, row] after the layer"
               if wide else "") + ("," if n > 1 else ""),
            ("in the first prompt that found it. " if n > 1 else "") + "weak: renormalised: the norm rescales the "
            "spike, so it creates no\nmassive activation: not a super weight; ablate, audit and export leave it alone"]


def _number(value):
    return "-" if value is None else f"{value:.4g}"


def super_expert_lines(catalog, n_prompts):
    """The table's lines about a mixture's super experts (none for a catalog without the section)."""
    if catalog.get("super_experts") is None:
        return []
    from swtool.experts import format_super_experts

    return format_super_experts(catalog["super_experts"], n_prompts)


def nll_effect(sw):
    """The change of the prompt's NLL with the weight zeroed alone: '+4.86', or over the prompts that
    found it '-0.38..+1.44' (lowest..highest)."""
    entries = [e["verification"] for e in (sw.get("per_prompt") or [sw]) if e is not None]
    rises = sorted(e["nll_removed"] - e["nll_intact"] for e in entries
                   if e.get("nll_removed") is not None and e.get("nll_intact") is not None)
    if not rises:
        return "-"
    return f"{rises[0]:+.2f}" if rises[0] == rises[-1] else f"{rises[0]:+.2f}..{rises[-1]:+.2f}"


def verified_by(sw):
    """'activation,NLL', 'set', ... for a verified weight; 'weak', with the tests of the prompts that
    did verify it, for one that is not (a version-1 catalog says only 'yes' or 'weak')."""
    v = sw["verification"]
    tests = v.get("verified_by")
    if tests is None:
        return "yes" if v["verified"] else "weak"
    if v["verified"]:
        return ",".join(tests)
    return f"weak ({','.join(tests)})" if tests else "weak"

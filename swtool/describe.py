"""`swtool inspect`: what a checkpoint is, from its headers alone (no tensor data is read).

Architecture and shape, tensor count and parameters, bytes per dtype, files and
shards, and what is known about its super weights: a swtool catalog beside it,
published coordinates that match it (known.py), `swtool.*` metadata in a GGUF
(gguf_keys.py) or in a safetensors header.
"""

from collections import Counter
from math import prod

from swtool.errors import SwtoolError

SCHEMA_ID = "swtool.inspect/1"  # what `swtool inspect --json` prints: swtool/schema/inspect.schema.json


def describe_model(spec, download=False):
    """A dict describing MODEL `spec` (JSON-ready)."""
    from swtool import gguf_keys, known
    from swtool.checkpoint import gguf_vocab
    from swtool.audit import model_id
    from swtool.model import load_model

    model = load_model(spec, download=download, header_only=True)
    checkpoint, config = model.checkpoint, model.checkpoint.config
    is_gguf = getattr(checkpoint, "format", None) == "gguf"
    counts, sizes, params = Counter(), Counter(), 0
    for name in checkpoint.names():
        info = checkpoint.tensor(name)
        counts[info.dtype] += 1
        sizes[info.dtype] += info.nbytes
        params += prod(info.shape)
    info = {
        "schema": SCHEMA_ID,
        "path": str(spec),
        "format": "gguf" if is_gguf else "safetensors",
        "architecture": (config.get("architectures") or [model.arch.model_type])[0],
        "model_type": model.arch.model_type,
        "layers": model.arch.n_layers,
        "hidden_size": model.arch.hidden_size,
        "intermediate_size": config.get("intermediate_size"),
        "attention_heads": config.get("num_attention_heads"),
        "kv_heads": config.get("num_key_value_heads", config.get("num_attention_heads")),
        "vocab_size": model.arch.vocab_size,
        "tensors": len(checkpoint.names()),
        "parameters": params,
        "dtypes": {dtype: {"tensors": counts[dtype], "bytes": sizes[dtype]} for dtype in sorted(counts)},
        "files": [{"name": path.name, "bytes": path.stat().st_size} for path in checkpoint.files],
        "directory": None if is_gguf else str(checkpoint.directory),
    }
    if is_gguf:
        meta = checkpoint.metadata
        info["gguf"] = {"version": checkpoint.gguf.version, "metadata_keys": len(meta),
                        "llama_cpp_architecture": meta.get("general.architecture"),
                        "name": meta.get("general.name"), "file_type": meta.get("general.file_type"),
                        "tokenizer": meta.get("tokenizer.ggml.model"), "pre_tokenizer": meta.get("tokenizer.ggml.pre")}
        if "tokenizer.ggml.tokens" in meta:  # a broken vocabulary scan would refuse, inspect refuses too;
            gguf_vocab.check(meta, checkpoint.path)  # none at all is described as none
        recorded = gguf_keys.read_super_weights(meta, checkpoint.path)
        info["swtool_metadata"] = {key: list(value) if gguf_keys.is_array(value) else value
                                   for key, value in meta.items() if key.startswith(gguf_keys.PREFIX)}
        info["recorded_super_weights"] = recorded
    else:
        header = {}
        for file in checkpoint.files.values():
            header.update({k: v for k, v in file.metadata.items() if k.startswith(gguf_keys.PREFIX)})
        info["swtool_metadata"] = header
        info["recorded_super_weights"] = None
    info["catalogs"], info["other_catalogs"] = catalogs_of(model)
    try:
        match = known.identify(config, model_id(spec, model))
    except SwtoolError as e:
        info["known"] = {"error": str(e)}
    else:
        info["known"] = None if match is None else known_info(match)
    return info


def known_info(match):
    """The JSON of a known.Match: `experts` (parallel to super_weights) only for an entry with
    expert coordinates, `none_found` only for an entry that says a census found none."""
    from swtool import known

    entry = {"id": match.model.id, "name": match.model.name, "matched_by": match.how,
             "differences": {k: list(v) for k, v in match.differences.items()},
             "super_weights": [[sw["layer"], sw["row"], sw["col"]] for sw in match.model.super_weights]}
    if any(sw.get("expert") is not None for sw in match.model.super_weights):
        entry["experts"] = [sw.get("expert") for sw in match.model.super_weights]
    if match.model.none_found is not None:
        entry["none_found"] = known.none_found_words(match.model)
    return entry


def catalogs_of(model):
    """(catalogs of this model beside it, other catalogs there with why they do not fit), for the JSON."""
    from swtool.catalog import catalogs_beside

    matching, others = [], []
    for path, found, problem in catalogs_beside(model):
        entry = {"file": path.name, "super_weights": len(found["super_weights"])}
        if "ablation" in found:
            entry["ablation"] = True
        if problem:
            others.append({**entry, "mismatch": problem})
        else:
            matching.append(entry)
    return matching, others


def format_description(info):
    """The human summary of `describe_model`."""
    from swtool.table import plural

    lines = [f"{info['path']}: {info['architecture']} ({info['model_type']}), {info['format']}"]
    lines.append(f"  shape       {plural(info['layers'], 'layer')}, hidden {info['hidden_size']}, intermediate "
                 f"{info['intermediate_size']}, heads {info['attention_heads']}/{info['kv_heads']}, "
                 f"vocabulary {info['vocab_size']}")
    lines.append(f"  tensors     {info['tensors']}, {info['parameters'] / 1e6:.1f}M parameters")
    dtypes = ", ".join(f"{d} {v['tensors']} ({_size(v['bytes'])})" for d, v in info["dtypes"].items())
    lines.append(f"  dtypes      {dtypes}")
    files = ", ".join(f"{f['name']} {_size(f['bytes'])}" for f in info["files"])
    lines.append(f"  files       {len(info['files'])}: {files}")
    if "gguf" in info:
        g = info["gguf"]
        lines.append(f"  gguf        version {g['version']}, {plural(g['metadata_keys'], 'metadata key')}, llama.cpp arch "
                     f"{g['llama_cpp_architecture']}, tokenizer {g['tokenizer']}/{g['pre_tokenizer']}")
    recorded = info["recorded_super_weights"]
    if recorded:
        shown = ", ".join(f"{sw['layer']} [{sw['row']}, {sw['col']}]" for sw in recorded)
        lines.append(f"  swtool.*    {plural(len(info['swtool_metadata']), 'key')}; super weights {shown}")
    else:
        lines.append(f"  swtool.*    {plural(len(info['swtool_metadata']), 'metadata key')}".replace(" 0 ", " no "))
    catalogs = ", ".join(f"{c['file']} ({plural(c['super_weights'], 'super weight')}"
                         f"{', an ablation record' if c.get('ablation') else ''})" for c in info["catalogs"])
    lines.append(f"  catalog     {catalogs or 'none beside it'}")
    for other in info["other_catalogs"]:
        lines.append(f"  not its own {other['file']}: {other['mismatch']}")
    known = info["known"]
    if known is None:
        lines.append("  known       no model in swtool catalog known matches (by id or config fingerprint)")
    elif "error" in known:
        lines.append(f"  known       {known['error']}")
    else:
        experts = known.get("experts") or [None] * len(known["super_weights"])
        coords = ", ".join(f"{layer} [{row}, {col}]" + ("" if expert is None else f" expert {expert}")
                           for (layer, row, col), expert in zip(known["super_weights"], experts))
        if "none_found" in known:
            coords = f"no published super weight ({known['none_found']})"
        lines.append(f"  known       {known['name']} ({known['id']}, matched by {known['matched_by']}): {coords}")
    return "\n".join(lines)


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"

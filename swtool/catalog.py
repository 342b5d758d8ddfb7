"""The catalog: a versioned JSON record of a model's super weights and how they were found.

Schema `swtool.catalog/1` lives in swtool/schema/catalog.schema.json; every
catalog is validated against it when read, so ablate/audit/export never act on
a malformed one.
"""

import hashlib
import json
from dataclasses import asdict
from importlib import resources

from swtool import __version__
from swtool.atomic import write_text_atomic
from swtool.errors import SwtoolError

SCHEMA_ID = "swtool.catalog/1"


def schema():
    return json.loads(resources.files("swtool").joinpath("schema/catalog.schema.json").read_text())


def sha256_file(path, chunk=16 * 1024 * 1024):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def build_catalog(model, prompt, tokens, settings, super_weights, report, with_hashes=False):
    """The catalog dict of one scan."""
    config_bytes = json.dumps(model.checkpoint.config, sort_keys=True).encode()
    files = []
    for path in model.checkpoint.files:
        entry = {"name": path.name, "size": path.stat().st_size}
        if with_hashes:
            entry["sha256"] = sha256_file(path)
        files.append(entry)
    architectures = model.checkpoint.config.get("architectures") or [model.arch.model_type]
    return {
        "schema": SCHEMA_ID,
        "tool": {"name": "swtool", "version": __version__},
        "model": {
            "path": str(model.path),
            "architecture": architectures[0],
            "model_type": model.arch.model_type,
            "num_layers": model.arch.n_layers,
            "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
            "files": files,
        },
        "detection": {
            "prompt": prompt,
            "tokens": [int(t) for t in tokens],
            "settings": {k: v for k, v in asdict(settings).items() if k != "prompt"},
            "passes": report["passes"],
            "nll_intact": report["nll_intact"],
            "nll_all_removed": report["nll_all_removed"],
        },
        "super_weights": [sw.to_json() for sw in super_weights],
        "profile": report["profile"],
    }


def validate(catalog, source="catalog"):
    """Raise SwtoolError with the first schema violation, naming where it is."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    error = next(iter(sorted(validator.iter_errors(catalog), key=lambda e: list(e.path))), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise SwtoolError(f"{source}: invalid catalog at {where}: {error.message}")


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
    from swtool.jsonfile import read_json

    catalog = read_json(path)
    validate(catalog, str(path))
    return catalog


def parse_coordinate(text, option="--zero"):
    """'L:ROW:COL' (0-based layer, down_proj row = output channel, col = input channel) -> (L, ROW, COL)."""
    parts = text.split(":")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise SwtoolError(f"{option} {text!r}: expected LAYER:ROW:COL, three non-negative integers like 2:507:90")
    return tuple(int(p) for p in parts)

"""The JSON Schemas of swtool's JSON outputs, and validation against them: the one place they are loaded.

Each output names its schema in its first key, `"schema": "swtool.<name>/<version>"`; the schema is
swtool/schema/<name>.schema.json (JSON Schema Draft 2020-12), whose `$id` is that same string. The
versioning rule and what each schema describes: docs/json.md. The id itself is written where the
output is built (catalog.SCHEMA_ID, audit.SCHEMA_ID ...); tests/test_json_schemas.py checks that
every command's output carries its schema file's `$id` and validates against it.
"""

import json
from functools import lru_cache
from importlib import resources

from swtool.errors import SwtoolError

# command (as typed, a group's subcommand after a space) -> the schema of what its --json prints
COMMAND_SCHEMAS = {
    "scan": "catalog",
    "eval": "eval",
    "quantsim": "quantsim",
    "ablate": "ablate",
    "audit": "audit",
    "inspect": "inspect",
    "export": "export",
    "quantize": "export",  # the same report as export
    "sweep": "sweep",
    "imatrix": "imatrix",
    "catalog known": "known",
}


def names():
    """Every schema swtool ships, by name (catalog, audit, ...)."""
    folder = resources.files("swtool").joinpath("schema")
    return sorted(entry.name.removesuffix(".schema.json") for entry in folder.iterdir()
                  if entry.name.endswith(".schema.json"))


@lru_cache(maxsize=None)
def _text(name):
    return resources.files("swtool").joinpath(f"schema/{name}.schema.json").read_text()


def load(name):
    """The schema `name` as a dict (a fresh copy: callers may change it)."""
    return json.loads(_text(name))


def schema_id(name):
    """The `$id` of schema `name`, e.g. "swtool.audit/1": the `schema` value its outputs carry."""
    return load(name)["$id"]


def errors(name, value):
    """The schema violations of `value` against schema `name`, outermost path first."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load(name))
    return sorted(validator.iter_errors(value), key=lambda e: list(e.path))  # siblings hold keys of one type


def validate(name, value, source, what=None):
    """Raise SwtoolError naming `source` and where the first violation is, unless `value` is valid."""
    found = errors(name, value)
    if found:
        error = found[0]
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise SwtoolError(f"{source}: invalid {what or name} at {where}: {error.message}")

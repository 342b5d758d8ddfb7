"""Every --json output names its schema first and validates against swtool/schema/<name>.schema.json.

  - each command runs with --json on the tiny Llama of fixtures/bad_files.py (the `good` fixture: safetensors,
    GGUF, its catalog) in the cases that give different shapes: scan (the catalog), eval alone, with --zero,
    comparing (--catalog with --sweep, --control-top, --restore-activation) and with --ablate; quantsim's
    weight and activation tables; ablate -o, --in-place and --restore; audit intact, unverified (a self-scan),
    ablated, and of GGUFs with their recorded handling; inspect of safetensors and GGUF; export, a dry run,
    quantize of a file that records its super weights and of one that must be scanned; sweep (llama.cpp);
    catalog known;
  - each schema is a valid Draft 2020-12 schema whose $id is the `schema` its outputs carry, and an output
    with a required key missing, a key of the wrong type, an unknown key or another schema id is rejected,
    so the validation above cannot pass vacuously;
  - every command with a --json option has a schema (swtool.schemas.COMMAND_SCHEMAS), found by walking
    click's command tree, and docs/json.md names every schema id.
"""

import copy
import json
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import click
import jsonschema
import pytest

from fixtures.cli_run import swtool_in_process
from swtool import schemas

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    schema: str
    argv: object  # (Outputs) -> the command line without --json
    code: int = 0


CASES = {}


def case(name, schema, code=0):
    def register(argv):
        CASES[name] = Case(schema, argv, code)
        return argv

    return register


@case("scan safetensors", "catalog")
def _(o):
    return ["scan", o.good.model, "--no-progress"]


@case("scan gguf", "catalog")
def _(o):
    return ["scan", o.good.gguf, "--no-progress", "--check-finite"]


@case("eval", "eval")
def _(o):
    return ["eval", o.good.model, "--text", o.good.text, "--ctx", 64, "--no-progress"]


@case("eval --zero", "eval")
def _(o):
    return ["eval", o.good.model, "--text", o.good.text, "--ctx", 64, "--zero", "1:2:3", "--score-second-half",
            "--no-progress"]


@case("eval --kld-reference", "eval")
def _(o):
    return ["eval", o.good.sharded, "--text", o.good.text, "--ctx", 64, "--kld-reference", o.good.model, "--no-progress"]


@case("eval compare", "eval")
def _(o):
    return ["eval", o.good.model, "--text", o.good.text, "--ctx", 64, "--catalog", o.good.catalog, "--sweep", "0,1,2",
            "--control-top", 2, "--restore-activation", "--no-progress"]


@case("eval --ablate", "eval")
def _(o):
    return ["eval", o.good.model, "--text", o.good.text, "--ctx", 64, "--catalog", o.good.catalog, "--ablate",
            "--no-progress"]


@case("quantsim weights", "quantsim")
def _(o):
    return ["quantsim", o.good.model, "--text", o.good.text, "--ctx", 64, "--catalog", o.good.catalog,
            "--block-sizes", "32,tensor", "--no-progress"]


@case("quantsim activations", "quantsim")
def _(o):
    return ["quantsim", o.good.model, "--text", o.good.text, "--ctx", 64, "--catalog", o.good.catalog,
            "--activations", "int8", "--no-weights", "--no-progress"]


@case("ablate -o", "ablate")
def _(o):
    return ["ablate", o.good.model, "--catalog", o.good.catalog, "-o", o.root / "ablated"]


@case("ablate --in-place", "ablate")
def _(o):
    shutil.copytree(o.good.model, o.root / "in-place")
    return ["ablate", o.root / "in-place", "--catalog", o.good.catalog, "--in-place"]


@case("ablate --restore", "ablate")
def _(o):
    o("ablate --in-place")
    return ["ablate", o.root / "in-place", "--restore"]


@case("audit intact", "audit")
def _(o):
    return ["audit", o.good.model, "--catalog", o.good.catalog]


@case("audit unverified", "audit", code=3)
def _(o):
    return ["audit", o.good.model, "--no-progress"]


@case("audit ablated", "audit", code=1)
def _(o):
    o("ablate -o")
    return ["audit", o.root / "ablated"]


@case("audit gguf keep", "audit")
def _(o):
    o("export keep")
    return ["audit", o.root / "keep.gguf"]


@case("audit gguf none", "audit")
def _(o):
    o("quantize recorded")
    return ["audit", o.root / "requantized.gguf"]


@case("inspect safetensors", "inspect")
def _(o):
    return ["inspect", o.good.model]


@case("inspect gguf", "inspect")
def _(o):
    return ["inspect", o.good.gguf]


@case("inspect gguf recorded", "inspect")
def _(o):
    o("export keep")
    return ["inspect", o.root / "keep.gguf"]


@case("export keep", "export")
def _(o):
    return ["export", o.exportable, "--type", "q4_0", "--catalog", o.good.catalog, "-o", o.root / "keep.gguf",
            "--no-progress"]


@case("export dry run", "export")
def _(o):
    return ["export", o.exportable, "--type", "q8_0", "--no-scan", "--dry-run", "-o", o.root / "never.gguf",
            "--no-progress"]


@case("quantize recorded", "export")
def _(o):
    o("export keep")
    return ["quantize", o.root / "keep.gguf", "--type", "q4_1", "--sw-handling", "none", "--allow-requantize",
            "-o", o.root / "requantized.gguf", "--no-progress"]


@case("quantize scanned isolate", "export")
def _(o):
    return ["quantize", o.good.gguf, "--type", "q8_0", "--sw-handling", "isolate", "-o", o.root / "isolated.gguf",
            "--no-progress"]


@case("imatrix text", "imatrix")
def _(o):
    return ["imatrix", o.good.model, "--text", o.good.text, "--ctx", 16, "-o", o.root / "imatrix.gguf", "--no-progress"]


@case("imatrix random dat", "imatrix")
def _(o):
    return ["imatrix", o.good.model, "--random-tokens", 40, "--ctx", 16, "-o", o.root / "imatrix.dat", "--no-progress"]


@case("catalog known", "known")
def _(o):
    return ["catalog", "known"]


class Outputs:
    """Each case's parsed --json output, run once (a case may need another's files first)."""

    def __init__(self, good, root):
        self.good, self.root, self.done = good, root, {}
        self.exportable = root / "exportable"
        shutil.copytree(good.model, self.exportable)
        path = self.exportable / "tokenizer.json"  # llama.cpp refuses a byte-level BPE without merges
        data = json.loads(path.read_text())
        data["model"]["vocab"]["Ġt"] = 258
        data["model"]["merges"] = [["Ġ", "t"]]
        path.write_text(json.dumps(data))

    def __call__(self, name):
        if name not in self.done:
            argv = [*CASES[name].argv(self), "--json"]
            result = swtool_in_process(*argv)
            assert result.returncode == CASES[name].code, result.stdout + result.stderr
            self.done[name] = json.loads(result.stdout)
        return copy.deepcopy(self.done[name])


@pytest.fixture(scope="module")
def outputs(good, tmp_path_factory):
    return Outputs(good, tmp_path_factory.mktemp("json-outputs"))


def assert_valid(name, data):
    problems = [f"{'/'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in schemas.errors(name, data)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", list(CASES))
def test_each_output_names_its_schema_first_and_is_valid(outputs, name):
    data = outputs(name)
    schema = CASES[name].schema
    assert list(data)[0] == "schema" and data["schema"] == schemas.schema_id(schema)
    assert_valid(schema, data)


def test_the_cases_give_the_shapes_they_are_meant_to(outputs):
    """Each case reaches the variant of its output it stands for (else it would test a shape twice)."""
    assert "super_weights" not in outputs("eval") and outputs("eval --zero")["zeroed"] == [[1, 2, 3]]
    compare = outputs("eval compare")
    assert {"compare", "control", "sweep", "super_weights"} <= set(compare) and "restored" in compare["compare"]
    assert outputs("eval --ablate")["super_weights_scaled_by"] == 0.0
    assert "activations" not in outputs("quantsim weights") and "weights" not in outputs("quantsim activations")
    assert [outputs(f"ablate {flag}")["action"] for flag in ("-o", "--in-place", "--restore")] == [
        "copy", "in-place", "restore"]
    assert outputs("ablate --restore")["patches"] == outputs("ablate --in-place")["patches"]
    verdicts = {name: outputs(f"audit {name}")["verdict"] for name in ("intact", "unverified", "ablated", "gguf keep")}
    assert verdicts == {"intact": "intact", "unverified": "unverified", "ablated": "damaged", "gguf keep": "intact"}
    assert outputs("audit gguf keep")["handling"] == "keep:Q8_0" and outputs("audit gguf none")["handling"] == "none"
    assert outputs("inspect gguf recorded")["recorded_super_weights"] and "gguf" not in outputs("inspect safetensors")
    sources = {name: outputs(name)["super_weights_from"] for name in
               ("export keep", "export dry run", "quantize recorded", "quantize scanned isolate")}
    assert sources == {"export keep": "catalog", "export dry run": "none", "quantize recorded": "gguf metadata",
                       "quantize scanned isolate": "scan"}
    assert outputs("export dry run")["file_bytes"] is None and outputs("export dry run")["super_weights"] == []
    (sw,) = outputs("quantize scanned isolate")["super_weights"]
    assert sw["reordered"] and outputs("quantize scanned isolate")["handling"] == "isolate"
    assert (outputs("imatrix text")["format"], outputs("imatrix text")["source"]["kind"]) == ("gguf", "text")
    assert (outputs("imatrix random dat")["format"], outputs("imatrix random dat")["source"]["kind"]) == (
        "dat", "random-tokens")
    kept = outputs("export keep")
    assert kept["file_bytes"] == (outputs.root / "keep.gguf").stat().st_size
    assert sum(t["bytes"] for t in kept["tensors"]) == kept["tensor_bytes"] == sum(
        t["bytes"] for t in kept["types"].values())


# --- sweep: llama.cpp scores its files ----------------------------------------------------------------------

def sweep_output(row_count=1):
    """A Sweep's to_json as the command prints it, without llama.cpp (its version is all to_json asks of it)."""
    from swtool.kld import KldStats
    from swtool.sweep import Row, Sweep

    kld = KldStats(63, 0.01, 0.002, 0.005, 0.02, 0.1, 0.3, 0.95)
    rows = [Row("q4_0", "keep:q8_0", 1000 + i, 900, 4000, 12.5, 63, {"blk.1.ffn_down.weight": "Q8_0"}, {}, 0.5, kld)
            for i in range(row_count)]
    result = Sweep("model", "text.txt", 64, 1, 1, "catalog.json", 11.0, 63, rows, [("f16", "keep:q8_0")], None)
    with mock.patch.dict(sys.modules, {"llama_cpp": types.SimpleNamespace(__version__="0.0-test")}):
        return json.loads(json.dumps(result.to_json()))


def test_sweep_output_shape_is_valid():
    data = sweep_output(2)
    assert list(data)[0] == "schema" and data["schema"] == schemas.schema_id("sweep")
    assert_valid("sweep", data)


@pytest.mark.llama_cpp
def test_sweep_json_is_valid(outputs):
    result = swtool_in_process("sweep", outputs.exportable, "--text", outputs.good.text, "--types", "q8_0",
                               "--handlings", "none,keep:f16", "--ctx", 64, "--windows", 1, "--no-progress", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert list(data)[0] == "schema" and [row["handling"] for row in data["rows"]] == ["none", "keep:f16"]
    assert_valid("sweep", data)


# --- the schemas themselves ----------------------------------------------------------------------------------

# per schema, the case whose output the mutations start from
SAMPLE = {"catalog": "scan safetensors", "eval": "eval compare", "quantsim": "quantsim weights", "ablate": "ablate -o",
          "audit": "audit gguf keep", "inspect": "inspect gguf recorded", "export": "export keep", "known": "catalog known",
          "imatrix": "imatrix text"}


def sample(outputs, name):
    return sweep_output() if name == "sweep" else outputs(SAMPLE[name])


def test_every_command_with_json_has_a_schema():
    from swtool.cli import main

    def walk(group, prefix=()):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from walk(command, (*prefix, name))
            elif any("--json" in param.opts for param in command.params):
                yield " ".join((*prefix, name))

    with_json = set(walk(main))
    assert with_json == set(schemas.COMMAND_SCHEMAS), "a command's --json output needs a schema (swtool/schemas.py)"
    assert set(schemas.COMMAND_SCHEMAS.values()) == set(schemas.names()) == set(SAMPLE) | {"sweep"}
    assert {CASES[name].schema for name in CASES} | {"sweep"} == set(schemas.names())


@pytest.mark.parametrize("name", schemas.names())
def test_schema_is_valid_draft_2020_12_with_its_id(name):
    schema = schemas.load(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    prefix, version = schema["$id"].split("/")
    assert prefix == f"swtool.{name}" and version.isdigit()
    assert schema["required"][0] == "schema"
    if name == "catalog":  # also an input: every version read_catalog reads validates, the newest is written
        from swtool.catalog import READABLE, SCHEMA_ID

        assert schema["properties"]["schema"]["enum"] == list(READABLE) and READABLE[-1] == SCHEMA_ID == schema["$id"]
    else:
        assert schema["properties"]["schema"] == {"const": schema["$id"]}
    assert (ROOT / "swtool" / "schema" / f"{name}.schema.json").is_file()  # shipped: pyproject's schema/*.json


def wrong_type(declared):
    """A value the property schema `declared` (with a type or a const) refuses."""
    check = jsonschema.Draft202012Validator({key: declared[key] for key in ("type", "const") if key in declared})
    return next(value for value in (["a list"], {"an": "object"}, "a string", 1.5, True) if not check.is_valid(value))


@pytest.mark.parametrize("name", schemas.names())
def test_mutated_outputs_are_rejected(outputs, name):
    data = sample(outputs, name)
    schema = schemas.load(name)
    assert_valid(name, data)
    mutated = 0
    for key in schema["required"]:
        missing = {k: v for k, v in data.items() if k != key}
        assert schemas.errors(name, missing), f"{name} without {key!r} passes"
        declared = schema["properties"].get(key, {})
        if "type" in declared or "const" in declared:
            assert schemas.errors(name, {**data, key: wrong_type(declared)}), f"{name} with a wrong {key!r} passes"
            mutated += 1
    assert mutated >= 3
    assert schemas.errors(name, {**data, "schema": data["schema"].rsplit("/", 1)[0] + "/999"})
    if schema.get("additionalProperties") is False:
        assert schemas.errors(name, {**data, "an_undocumented_key": 1})


def test_nested_mutations_are_rejected(outputs):
    """Inside arrays and objects too: a finding's status, a world's perplexity, a patch's bytes, a tensor's type."""
    audit = outputs("audit gguf keep")
    audit["findings"][0]["status"] = "fine"
    evaluated = outputs("eval compare")
    del evaluated["worlds"][1]["perplexity"]
    ablated = outputs("ablate -o")
    ablated["patches"][0]["new_bytes"] = "not hex"
    exported = outputs("export keep")
    exported["tensors"][0]["bytes"] = "many"
    catalog = outputs("scan safetensors")
    catalog["super_weights"][0]["layer"] = -1
    for name, data in [("audit", audit), ("eval", evaluated), ("ablate", ablated), ("export", exported),
                       ("catalog", catalog)]:
        assert schemas.errors(name, data), name
    copied = outputs("ablate -o")
    copied["files"] = None  # a copy lists its files
    assert schemas.errors("ablate", copied)


def test_validate_names_the_source_and_where():
    from swtool.errors import SwtoolError

    data = sweep_output()
    data["rows"][0]["perplexity"] = "high"
    with pytest.raises(SwtoolError, match=r"^out\.json: invalid sweep at rows/0/perplexity: 'high' is not of type"):
        schemas.validate("sweep", data, "out.json")


def test_docs_name_every_schema():
    text = (ROOT / "docs" / "json.md").read_text()
    for name in schemas.names():
        assert f"`{schemas.schema_id(name)}`" in text and f"swtool/schema/{name}.schema.json" in text

"""Property tests for the JSON inputs beside the weights: index, config, tokenizer files, catalog,
journal. A field replaced by an arbitrary JSON value (structure-aware: the keys the file really has)
gives a SwtoolError with one message, or a correct result; never another exception, never a hang
(an alarm per example), never a changed input (sha256 before and after).

Counts are sized for CI; FUZZ_EXAMPLES=N multiplies them (make fuzz)."""

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, strategies as st

from fixtures.cli_run import digests, swtool_in_process
from fixtures.fuzzing import bounded, fuzz_settings
from swtool.errors import SwtoolError

PROMPT = "Hello, world."

scalars = (st.none() | st.booleans() | st.integers(-2 ** 64, 2 ** 64) | st.floats(allow_nan=True)
           | st.text(max_size=8) | st.sampled_from(["BF16", "F32", "model.safetensors", "../x", "llama", ""]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def paths_of(value, prefix=()):
    """Every key path into a JSON value (dict keys and list indexes), the value itself first."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths_of(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            yield from paths_of(item, prefix + (index,))


def replaced(document, path, value):
    if not path:
        return value
    document = json.loads(json.dumps(document))
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return document


def fuzz(examples, original, write, act, data_files):
    """Over `examples` examples: replace a field of `original`, write it (write(doc)), run act();
    every outcome is a SwtoolError or a result, and the files in `data_files` keep their bytes."""
    paths = list(paths_of(original))
    before = digests(*data_files)
    counts = {"accepted": 0, "rejected": 0}

    @fuzz_settings(examples)
    @given(path=st.sampled_from(paths), value=json_values, raw=st.booleans())
    def run(path, value, raw):
        document = replaced(original, path, value)
        write(json.dumps(document, allow_nan=True) if raw else json.dumps(document, allow_nan=True, indent=1))
        try:
            with bounded():
                act()
            counts["accepted"] += 1
        except SwtoolError as e:
            assert str(e) and "\n" not in str(e), repr(e)
            counts["rejected"] += 1
        assert digests(*data_files) == before

    run()
    assert counts["rejected"] > 0, counts  # a fuzzer whose every input passes tests nothing
    return counts


@pytest.fixture()
def model(good, tmp_path):
    return shutil.copytree(good.model, tmp_path / "model")


def test_config(model):
    from swtool.model import load_model

    original = json.loads((model / "config.json").read_text())
    fuzz(150, original, (model / "config.json").write_text, lambda: load_model(model),
         [model / "model.safetensors"])


def test_index(good, tmp_path):
    from swtool.model import load_model

    sharded = shutil.copytree(good.sharded, tmp_path / "sharded")
    index = sharded / "model.safetensors.index.json"
    shards = sorted(sharded.glob("model-*.safetensors"))
    fuzz(150, json.loads(index.read_text()), index.write_text, lambda: load_model(sharded), shards)


def test_tokenizer_files(model):
    from swtool.tokenizer import encode

    def act():
        ids = encode(model, PROMPT)
        assert ids and all(isinstance(i, int) for i in ids)

    config = model / "tokenizer_config.json"
    if not config.exists():
        config.write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>"}))
    fuzz(100, json.loads(config.read_text()), config.write_text, act, [model / "model.safetensors"])
    tokenizer = model / "tokenizer.json"
    fuzz(100, json.loads(tokenizer.read_text()), tokenizer.write_text, act, [model / "model.safetensors"])


def test_catalog(good, model, tmp_path):
    from swtool.ablate import CatalogMismatch, plan_patches
    from swtool.audit import audit
    from swtool.catalog import read_catalog
    from swtool.checkpoint import open_checkpoint

    catalog = tmp_path / "catalog.json"

    def act():
        audit(str(model), catalog=str(catalog))
        try:
            plan_patches(open_checkpoint(model), read_catalog(catalog)["super_weights"], 0.0)
        except CatalogMismatch as e:
            raise SwtoolError(str(e)) from None

    fuzz(150, json.loads(good.catalog.read_text()), catalog.write_text, act, [model])


def test_journal(good, model):
    from swtool.ablate import JOURNAL_NAME, restore_in_place

    shard = model / "model.safetensors"
    pristine = np.frombuffer(shard.read_bytes(), np.uint8)
    assert swtool_in_process("ablate", model, "--catalog", good.catalog, "--in-place").returncode == 0
    journal_path = model / JOURNAL_NAME
    original = json.loads(journal_path.read_text())
    ablated_bytes = shard.read_bytes()
    ablated = np.frombuffer(ablated_bytes, np.uint8)

    def write(text):
        shard.write_bytes(ablated_bytes)
        journal_path.write_text(text)

    def act():
        restore_in_place(model)
        now = np.frombuffer(shard.read_bytes(), np.uint8)  # what an accepted journal wrote: only original
        assert len(now) == len(pristine)                      # bytes, only in place
        assert ((now == pristine) | (now == ablated)).all()

    fuzz(150, original, write, act, [])

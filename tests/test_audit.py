"""`swtool audit`, `swtool inspect` and `swtool catalog known` on the real SmolLM2 (safetensors and GGUF).

Damaged copies are made here by patching bytes in a copy of the safetensors file
(offsets from the header parsed with json, bf16 bytes from torch), or by writing a
GGUF with a weight changed (fixtures/hf_to_gguf.py): nothing in them comes from swtool.
"""

import json
import math
import os
import shutil
import struct

import gguf
import pytest
import torch
from safetensors import safe_open

from fixtures.hf_to_gguf import vocabulary_fields, write_gguf
from swtool import gguf_keys, known
from swtool.checkpoint.gguf_file import read_gguf
from swtool.errors import SwtoolError
# swtool_in_process: audit, inspect, scan, ablate, export and catalog run in this process (click's runner,
# the same command group and output), not as a `python -m swtool` process each; test_cli.py runs every
# command as a real process
from fixtures.cli_run import one_line_error, swtool, swtool_in_process
from fixtures.gguf_cache import gguf_reader
# keys, tensor types and single tensors of SmolLM2's GGUFs without gguf-py's seconds of decoding the vocabulary
# element by element (fixtures/gguf_compare.py, held to gguf-py's GGUFReader in test_gguf_converter.py)
from fixtures.gguf_compare import dequantized, read_contents

pytestmark = pytest.mark.real

SW = [(2, 507, 90), (2, 507, 430), (11, 507, 1229), (11, 507, 1487)]  # SmolLM2's, checked in test_smollm2.py


def audit_json(*args, code):
    result = swtool_in_process("audit", *args, "--json", "--no-progress")
    assert result.returncode == code, result.stdout + result.stderr
    return json.loads(result.stdout)


def down_proj(layer):
    return f"model.layers.{layer}.mlp.down_proj.weight"


def torch_value(directory, layer, row, col):
    """The weight as the safetensors library reads it, through torch."""
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return f.get_slice(down_proj(layer))[row:row + 1, col:col + 1].to(torch.float32).item()


def patched_copy(source, destination, values):
    """Copy a single-file bf16 checkpoint and overwrite the bf16 bytes of {(layer, row, col): new value}."""
    shutil.copytree(source, destination)
    path = destination / "model.safetensors"
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        for (layer, row, col), value in values.items():
            entry = header[down_proj(layer)]
            assert entry["dtype"] == "BF16"
            offset = 8 + length + entry["data_offsets"][0] + (row * entry["shape"][1] + col) * 2
            f.seek(offset)
            f.write(torch.tensor([value]).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return destination


@pytest.fixture(scope="module")
def catalog(smollm2_catalog):
    path = smollm2_catalog
    assert [(sw["layer"], sw["row"], sw["col"]) for sw in json.loads(path.read_text())["super_weights"]] == SW
    return path


@pytest.fixture(scope="module")
def damaged(smollm2, tmp_path_factory):
    """[2, 507, 90] zeroed and [11, 507, 1229] quartered; the others untouched."""
    quarter = torch_value(smollm2, 11, 507, 1229) / 4
    return patched_copy(smollm2, tmp_path_factory.mktemp("damaged") / "smollm2",
                        {(2, 507, 90): 0.0, (11, 507, 1229): quarter})


@pytest.fixture(scope="module")
def original_gguf(smollm2):
    from fixtures import smollm2 as builder

    return builder.fetch_gguf()


def by_coordinate(report):
    return {(f["layer"], f["row"], f["col"]): f for f in report["findings"]}


# --- safetensors ----------------------------------------------------------------------

def test_intact_checkpoint_reads_two_bytes_per_weight(smollm2, catalog):
    report = audit_json(smollm2, "--catalog", catalog, code=0)
    assert report["ok"] and report["format"] == "safetensors"
    assert report["bytes_read"] == 2 * len(SW)  # one bf16 element each, nothing else
    for (layer, row, col), finding in by_coordinate(report).items():
        assert finding["status"] == "intact" and finding["dtype"] == "BF16"
        assert finding["value"] == finding["expected"] == torch_value(smollm2, layer, row, col)


def test_ablated_copy_is_caught(smollm2, catalog, damaged):
    report = audit_json(damaged, "--catalog", catalog, code=1)
    found = by_coordinate(report)
    assert found[(2, 507, 90)]["status"] == "zeroed" and found[(2, 507, 90)]["value"] == 0.0
    quartered = found[(11, 507, 1229)]
    assert quartered["status"] == "changed"
    assert quartered["relative_change"] == pytest.approx(0.75, abs=0.01)
    assert found[(2, 507, 430)]["status"] == found[(11, 507, 1487)]["status"] == "intact"
    table = swtool_in_process("audit", damaged, "--catalog", catalog)
    assert table.returncode == 1
    assert "1 changed, 2 intact, 1 zeroed: 2 missing or damaged" in table.stdout
    assert "read 8 bytes of weights in" in table.stdout


def test_a_catalog_of_another_model_reports_missing_weights(smollm2, catalog, tmp_path):
    data = json.loads(catalog.read_text())
    data["super_weights"][1].update(row=9999, tensor_index=[9999, 430])
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    found = by_coordinate(audit_json(smollm2, "--catalog", other, code=1))
    assert found[(2, 9999, 430)]["status"] == "missing" and "outside" in found[(2, 9999, 430)]["note"]
    assert not found[(2, 9999, 430)]["present"]
    assert found[(11, 507, 1229)]["present"] and found[(11, 507, 1229)]["status"] == "intact"
    # a layer the catalog's own model does not have: the catalog contradicts itself, bad input
    data["super_weights"][0].update(layer=31, tensor=down_proj(31), gguf_tensor="blk.31.ffn_down.weight")
    other.write_text(json.dumps(data))
    assert "super_weights/0 [31, 507, 90]: layer 31 of a model with 30 layers" in \
        one_line_error(swtool_in_process("audit", smollm2, "--catalog", other))


def test_a_nan_super_weight_gives_strict_json(smollm2, catalog, tmp_path):
    """A NaN or Inf weight is reported as "not finite" in JSON that strict parsers accept
    (Python's json would write bare NaN, which jq and JavaScript reject)."""
    poisoned = patched_copy(smollm2, tmp_path / "poisoned", {(2, 507, 90): float("nan"), (11, 507, 1229): float("-inf")})
    result = swtool_in_process("audit", poisoned, "--catalog", catalog, "--json", "--no-progress")
    assert result.returncode == 1, result.stderr

    def refuse(word):
        raise AssertionError(f"audit --json wrote {word}, which is not JSON")

    report = json.loads(result.stdout, parse_constant=refuse)
    found = by_coordinate(report)
    for coordinate in [(2, 507, 90), (11, 507, 1229)]:
        assert found[coordinate]["status"] == "not finite"
        assert found[coordinate]["value"] is None
    assert found[(2, 507, 430)]["status"] == "intact"


def test_tolerance_decides_what_changed_means(damaged, catalog):
    report = audit_json(damaged, "--catalog", catalog, "--tolerance", "0.8", code=1)  # the zeroed one still fails
    assert by_coordinate(report)[(11, 507, 1229)]["status"] == "intact"


def test_reference_flags_the_weights_that_moved(smollm2, damaged, catalog, original_gguf):
    report = audit_json(damaged, "--reference", smollm2, "--catalog", catalog, code=1)
    found = by_coordinate(report)
    assert found[(2, 507, 90)]["expected"] == torch_value(smollm2, 2, 507, 90)
    assert [found[c]["status"] for c in SW] == ["zeroed", "intact", "changed", "intact"]
    # the Q4_1 GGUF against the bf16 checkpoint made from it: only bf16 rounding apart
    report = audit_json(original_gguf, "--reference", smollm2, "--catalog", catalog, code=0)
    for finding in report["findings"]:
        assert finding["relative_change"] <= 2 ** -8


def test_without_an_option_a_known_model_is_held_to_the_known_table(smollm2, damaged):
    report = audit_json(smollm2, code=0)
    assert report["expectations"].startswith("the known coordinates of HuggingFaceTB/SmolLM2-135M-Instruct")
    assert sorted(by_coordinate(report)) == sorted(SW) and report["verdict"] == "intact"
    found = by_coordinate(audit_json(damaged, code=1))
    assert found[(2, 507, 90)]["status"] == "zeroed" and found[(11, 507, 1229)]["status"] == "not outlier"
    # the damaged copy against a scan of the reference: the zeroed weight is reported, not just missed
    report = audit_json(damaged, "--reference", smollm2, code=1)
    assert report["expectations"] == "a scan of the reference"
    assert by_coordinate(report)[(2, 507, 90)]["status"] == "zeroed"


def test_known_coordinates_match_by_fingerprint(smollm2, damaged):
    report = audit_json(smollm2, "--known", code=0)
    assert report["known_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "matched by fingerprint" in report["expectations"]
    for finding in report["findings"]:
        assert finding["expected"] is None and finding["row_ratio"] > 5 and finding["row_rank"] <= 2
    found = by_coordinate(audit_json(damaged, "--known", code=1))
    assert found[(2, 507, 90)]["status"] == "zeroed"
    assert found[(11, 507, 1229)]["status"] == "not outlier" and found[(11, 507, 1229)]["row_ratio"] < 5


# --- GGUF -----------------------------------------------------------------------------

def test_gguf_weight_is_decoded_from_its_block_alone(original_gguf, catalog):
    report = audit_json(original_gguf, "--catalog", catalog, code=0)
    assert report["bytes_read"] == 20 * len(SW)  # one Q4_1 block (32 weights) each
    for (layer, row, col), finding in by_coordinate(report).items():
        whole = dequantized(original_gguf, f"blk.{layer}.ffn_down.weight")  # as gguf-py dequantizes it
        assert finding["value"] == whole[row, col]
        assert finding["dtype"] == "Q4_1" and finding["block"] == {"index": col // 32, "size": 32}
        assert finding["gguf_tensor"] == f"blk.{layer}.ffn_down.weight"


@pytest.fixture(scope="module")
def recorded_ggufs(smollm2, catalog, original_gguf, tmp_path_factory):
    """Q8_0 GGUFs of SmolLM2 carrying swtool.* metadata: one faithful, one with [11, 507, 1487] zeroed."""
    out = tmp_path_factory.mktemp("recorded")
    entries = json.loads(catalog.read_text())["super_weights"]
    extra = gguf_keys.metadata_fields(entries, prompt="Apple Inc. is a worldwide tech company.")
    vocabulary = vocabulary_fields(original_gguf)

    def zero_one(name, value):
        if name == down_proj(11):
            value = value.copy()
            value[507, 1487] = 0.0
        return value

    return (write_gguf(smollm2, out / "kept.gguf", "q8_0", vocabulary, extra=extra),
            write_gguf(smollm2, out / "lost.gguf", "q8_0", vocabulary, extra=extra, edit=zero_one), entries)


def test_swtool_metadata_round_trips_through_gguf_reader(recorded_ggufs):
    kept, _, entries = recorded_ggufs
    reader = gguf_reader(kept)
    assert reader.fields[gguf_keys.FORMAT_VERSION_KEY].contents() == gguf_keys.FORMAT_VERSION
    assert reader.fields[gguf_keys.ROW].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]
    assert reader.fields[gguf_keys.VALUE].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32]
    assert reader.fields[gguf_keys.VALUE].contents() == [sw["value"] for sw in entries]  # bf16 values: exact
    assert reader.fields[gguf_keys.TENSOR].contents() == [sw["gguf_tensor"] for sw in entries]
    recorded = gguf_keys.read_super_weights(read_gguf(kept).metadata, kept)
    assert [(sw["layer"], sw["row"], sw["col"], sw["value"]) for sw in recorded] == \
        [(sw["layer"], sw["row"], sw["col"], sw["value"]) for sw in entries]


def test_gguf_metadata_is_what_the_audit_checks(recorded_ggufs):
    kept, lost, entries = recorded_ggufs
    report = audit_json(kept, code=0)
    assert report["expectations"] == "the GGUF's swtool.* metadata"
    for finding, entry in zip(report["findings"], entries):
        assert finding["dtype"] == "Q8_0" and finding["recorded"] == entry["value"]
        assert finding["relative_change"] < 0.01
    found = by_coordinate(audit_json(lost, code=1))
    assert found[(11, 507, 1487)]["status"] == "zeroed"
    assert [found[c]["status"] for c in SW[:3]] == ["intact"] * 3


def test_inconsistent_swtool_metadata_is_bad_input(smollm2, tmp_path):
    T = gguf.GGUFValueType
    bad = [(gguf_keys.FORMAT_VERSION_KEY, 1, T.UINT32, None), (gguf_keys.LAYER, [2, 11], T.ARRAY, T.UINT32),
           (gguf_keys.ROW, [507], T.ARRAY, T.UINT32), (gguf_keys.COL, [90, 1229], T.ARRAY, T.UINT32),
           (gguf_keys.VALUE, [1.0, 2.0], T.ARRAY, T.FLOAT32), (gguf_keys.TENSOR, ["a", "b"], T.ARRAY, T.STRING)]
    path = write_gguf(smollm2, tmp_path / "bad.gguf", "q8_0", extra=bad)
    assert "arrays differ in length" in one_line_error(swtool_in_process("audit", path))


# --- inspect --------------------------------------------------------------------------

def test_inspect_safetensors(smollm2, damaged, catalog):
    shutil.copy(catalog, damaged / "catalog.json")
    info = json.loads(swtool_in_process("inspect", damaged, "--json").stdout)
    with safe_open(str(smollm2 / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert info["tensors"] == len(names) == 272
    assert info["dtypes"] == {"BF16": {"tensors": 272, "bytes": info["parameters"] * 2}}
    assert info["files"] == [{"name": "model.safetensors", "bytes": (smollm2 / "model.safetensors").stat().st_size}]
    assert (info["layers"], info["hidden_size"], info["kv_heads"]) == (30, 576, 3)
    assert info["catalogs"] == [{"file": "catalog.json", "super_weights": 4}]
    assert info["known"]["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info["known"]["super_weights"] == [list(c) for c in SW]
    text = swtool_in_process("inspect", damaged).stdout
    assert "catalog     catalog.json (4 super weights)" in text


def test_inspect_gguf(original_gguf, recorded_ggufs):
    info = json.loads(swtool_in_process("inspect", original_gguf, "--json").stdout)
    contents = read_contents(original_gguf)
    kinds = {}
    for name, (_, type_name, _) in contents.tensors.items():
        kinds.setdefault(type_name, [0, 0])
        kinds[type_name][0] += 1
        kinds[type_name][1] += contents.where[name][1]
    assert {k: [v["tensors"], v["bytes"]] for k, v in info["dtypes"].items()} == kinds
    assert info["gguf"]["pre_tokenizer"] == "smollm" and info["swtool_metadata"] == {}
    kept, _, entries = recorded_ggufs
    info = json.loads(swtool_in_process("inspect", kept, "--json").stdout)
    assert info["swtool_metadata"][gguf_keys.PROMPT] == "Apple Inc. is a worldwide tech company."
    assert [(sw["layer"], sw["row"], sw["col"]) for sw in info["recorded_super_weights"]] == SW


# --- the known table ------------------------------------------------------------------

# Coordinates as anchors.md §1 lists them from the paper's code and Table 2 (not read from swtool)
PUBLISHED = {
    "huggyllama/llama-7b": [(2, 3968, 7003)],
    "huggyllama/llama-13b": [(2, 2231, 2278), (2, 2231, 6939)],
    "huggyllama/llama-30b": [(3, 5633, 12817), (3, 5633, 17439), (10, 5633, 14386)],
    "meta-llama/Llama-2-7b-hf": [(1, 2533, 7890)],
    "meta-llama/Llama-2-13b-hf": [(3, 4743, 7678)],
    "mistralai/Mistral-7B-v0.1": [(1, 2070, 7310)],
    "allenai/OLMo-1B-0724-hf": [(1, 1764, 1710), (2, 1764, 8041)],
    "allenai/OLMo-7B-0724-hf": [(1, 269, 7467), (2, 269, 8275), (7, 269, 453), (24, 269, 2300)],
    "microsoft/Phi-3-mini-4k-instruct": [(2, 525, 808), (2, 1693, 808), (2, 1113, 808),
                                         (4, 525, 2723), (4, 1113, 2723), (4, 1693, 2723)],
    "meta-llama/Meta-Llama-3-8B": [(1, 788, 2427), (1, 1384, 2427), (1, 4062, 2427)],
}

# config.json of published models as the Hub has them (abridged to the keys that matter)
LLAMA_30B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 6656, "intermediate_size": 17920,
             "max_sequence_length": 2048, "model_type": "llama", "num_attention_heads": 52,
             "num_hidden_layers": 60, "rms_norm_eps": 1e-06, "vocab_size": 32000}
LLAMA3_FINETUNE = {"_name_or_path": "some/fine-tune", "hidden_size": 4096, "intermediate_size": 14336,
                   "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 32,
                   "num_hidden_layers": 32, "num_key_value_heads": 8, "rope_theta": 500000.0, "vocab_size": 128258}
OLMO_1B_0724 = {"hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "olmo",
                "num_attention_heads": 16, "num_hidden_layers": 16, "num_key_value_heads": 16, "vocab_size": 50304}
PHI3_MINI = {"_name_or_path": "microsoft/Phi-3-mini-4k-instruct", "hidden_size": 3072, "intermediate_size": 8192,
             "max_position_embeddings": 4096, "model_type": "phi3", "num_attention_heads": 32,
             "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32064}


def test_the_table_holds_the_published_coordinates():
    data, models = known.load()
    table = {m.id: [(sw["layer"], sw["row"], sw["col"]) for sw in m.super_weights] for m in models}
    for model_id, coordinates in PUBLISHED.items():
        assert table[model_id] == coordinates, model_id
    olmo = next(m for m in models if m.id == "allenai/OLMo-1B-0724-hf")
    assert olmo.super_weights[1]["disputed"] and "layer 1" in olmo.super_weights[1]["conflict"]
    for model in models:
        for sw in model.super_weights:
            assert sw["sources"] and all(source in data["sources"] for source in sw["sources"])
    listed = swtool_in_process("catalog", "known")
    assert listed.returncode == 0
    assert ["Llama-7B", "huggyllama/llama-7b", "2", "3968", "7003", "-", "repo+T2"] in \
        [line.split() for line in listed.stdout.splitlines()]
    assert json.loads(swtool_in_process("catalog", "known", "--json").stdout) == data


def test_models_are_matched_by_id_and_fingerprint():
    assert known.identify(LLAMA_30B).model.id == "huggyllama/llama-30b"  # no max_position_embeddings: 2048
    match = known.identify(LLAMA3_FINETUNE)
    assert match.model.id == "meta-llama/Meta-Llama-3-8B" and match.differences == {"vocab_size": (128256, 128258)}
    assert known.identify(OLMO_1B_0724).model.id == "allenai/OLMo-1B-0724-hf"
    assert known.identify(PHI3_MINI).how == "id"
    assert known.identify({**LLAMA_30B, "max_sequence_length": 4096, "hidden_size": 4096, "intermediate_size": 11008,
                           "num_attention_heads": 32, "num_hidden_layers": 32}).model.id == "meta-llama/Llama-2-7b-hf"
    gguf_mistral = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                    "max_position_embeddings": 32768}  # llama.cpp converts Mistral as llama
    assert known.identify(gguf_mistral).model.id == "mistralai/Mistral-7B-v0.1"
    assert known.identify({**OLMO_1B_0724, "hidden_size": 1024}) is None
    llama_7b_or_2 = {**LLAMA_30B, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                     "num_hidden_layers": 32, "max_sequence_length": 3000}
    with pytest.raises(SwtoolError, match="several known models"):
        known.identify(llama_7b_or_2)
    with pytest.raises(SwtoolError, match="shape differs"):
        known.identify(LLAMA_30B, model_id="meta-llama/Meta-Llama-3-8B")


# --- bad input ------------------------------------------------------------------------

def test_bad_input_is_one_line(smollm2, catalog, tmp_path, tiny_factory):
    assert "no such file" in one_line_error(swtool_in_process("audit", tmp_path / "nothing", "--catalog", catalog))
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    assert "not valid JSON" in one_line_error(swtool_in_process("audit", smollm2, "--catalog", junk))
    assert "not both" in one_line_error(swtool_in_process("audit", smollm2, "--catalog", catalog, "--known"))
    assert "not a known model" in one_line_error(swtool_in_process("audit", smollm2, "--known-id", "acme/nothing"))
    tiny, _ = tiny_factory("llama", "bfloat16")
    assert "matches no model" in one_line_error(swtool_in_process("audit", tiny, "--known"))
    assert "no such file" in one_line_error(swtool_in_process("inspect", tmp_path / "nothing"))


# --- GGUF exports written by swtool export ------------------------------------------------

@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_audit_of_swtool_export(smollm2, catalog, smollm2_export, qtype):
    """An export keeps its super weights: the audit reads them from their blocks and from
    the swtool.* keys; the block values are checked here with gguf-py's own dequantizer."""
    out = smollm2_export(qtype)  # with the catalog, the default handling
    report = audit_json(out, "--catalog", catalog, code=0)
    assert report["format"] == "gguf"
    for (layer, row, col), finding in by_coordinate(report).items():
        assert finding["status"] == "intact"
        values = dequantized(out, f"blk.{layer}.ffn_down.weight")  # [out, in], as gguf-py dequantizes it
        assert finding["value"] == pytest.approx(float(values[row, col]), abs=1e-6)
        assert finding["value"] == pytest.approx(torch_value(smollm2, layer, row, col), rel=0.01)
        assert finding["recorded"] == torch_value(smollm2, layer, row, col)  # exact float32 in swtool.* keys


def test_audit_catches_a_super_weight_zeroed_in_an_export(smollm2, catalog, damaged, tmp_path):
    out = tmp_path / "damaged-q8_0.gguf"
    exported = swtool_in_process("export", damaged, "-o", out, "--type", "q8_0", "--no-progress")
    assert exported.returncode == 0, exported.stderr
    found = by_coordinate(audit_json(out, "--catalog", catalog, code=1))
    assert found[(2, 507, 90)]["status"] == "zeroed"
    assert found[(2, 507, 430)]["status"] == "intact"


# --- no wrong verdict: what the audit compares with, and what it cannot tell -----------------

def linked_copy(source, destination):
    """A copy of a model directory whose files are hard links (nothing in it is written to)."""
    shutil.copytree(source, destination, copy_function=os.link)
    return destination


@pytest.fixture(scope="module")
def ablated(smollm2, catalog, tmp_path_factory):
    """`swtool ablate` with the scan's catalog: all four super weights zeroed, swtool-ablation.json beside."""
    out = tmp_path_factory.mktemp("ablated") / "smollm2"
    result = swtool_in_process("ablate", smollm2, "--catalog", catalog, "-o", out)
    assert result.returncode == 0, result.stderr
    return out


def test_a_fully_ablated_model_is_never_intact(ablated):
    report = audit_json(ablated, code=1)
    assert report["verdict"] == "damaged" and not report["ok"]
    for finding in report["findings"]:  # the known table's coordinates, and the record ablate wrote
        assert finding["value"] == 0.0 and finding["status"] == "ablated"
        assert "swtool-ablation.json" in finding["note"]
    table = swtool_in_process("audit", ablated, "--no-progress")
    assert table.returncode == 1 and "4 ablated: removed on purpose by swtool ablate, as recorded" in table.stdout
    bare = linked_copy(ablated, ablated.parent / "bare")
    (bare / "swtool-ablation.json").unlink()
    found = by_coordinate(audit_json(bare, code=1))
    assert [found[c]["status"] for c in SW] == ["zeroed"] * 4


def test_a_self_scan_of_an_unknown_broken_model_is_flagged_broken(ablated, tmp_path, monkeypatch):
    """With no reference at all (the known table matches nothing, no catalog beside it), the scan
    of the ablated model itself cannot say what changed, but its prompt NLL says it is broken."""
    from swtool import audit as audit_module

    bare = linked_copy(ablated, tmp_path / "bare")
    (bare / "swtool-ablation.json").unlink()
    monkeypatch.setattr(known, "identify", lambda config, model_id=None: None)
    report = audit_module.audit(str(bare))
    assert report.self_scan and report.expectations == "a scan of the model (no reference)"
    vocab = json.loads((bare / "config.json").read_text())["vocab_size"]
    assert report.broken["uniform"] == pytest.approx(math.log(vocab))
    assert report.broken["nll"] > math.log(vocab)
    assert report.verdict == "damaged" and report.exit_code == 1
    assert "BROKEN" in audit_module.format_audit(report)


def test_a_self_scan_gives_no_verdict(tiny_factory):
    from fixtures.tiny import Plant

    model, _ = tiny_factory("llama", "bfloat16", plants=(Plant(1, 41, 101),))
    report = audit_json(model, code=3)
    assert report["verdict"] == "unverified" and not report["ok"]
    assert report["expectations"] == "a scan of the model (no reference)"
    assert [(f["layer"], f["row"], f["col"]) for f in report["findings"]] == [(1, 41, 101)]
    assert [f["status"] for f in report["findings"]] == ["unverified"]
    table = swtool_in_process("audit", model, "--no-progress")
    assert table.returncode == 3
    assert "unverified (no reference)" in table.stdout and "all intact" not in table.stdout


def test_a_catalog_of_this_model_beside_it_is_the_reference(tiny_factory, tmp_path):
    from fixtures.tiny import Plant

    model, _ = tiny_factory("llama", "bfloat16", plants=(Plant(1, 41, 101),))
    copy = linked_copy(model, tmp_path / "model")
    assert swtool_in_process("scan", copy, "-o", copy / "mine.json", "--no-progress").returncode == 0
    report = audit_json(copy, code=0)
    assert report["expectations"] == "the catalog beside it, mine.json" and report["verdict"] == "intact"
    # a catalog of another model in the same folder is not taken for this one's
    other = json.loads((copy / "mine.json").read_text())
    other["model"]["config_sha256"] = "0" * 64
    other["model"]["fingerprint"]["hidden_size"] = 32
    (copy / "mine.json").write_text(json.dumps(other))
    assert audit_json(copy, code=3)["expectations"] == "a scan of the model (no reference)"


def test_a_catalog_of_another_model_is_bad_input(smollm2, tiny_factory, tmp_path):
    from fixtures.tiny import Plant

    tiny, _ = tiny_factory("llama", "bfloat16", plants=(Plant(1, 41, 101),))
    foreign = tmp_path / "tiny.json"
    assert swtool_in_process("scan", tiny, "-o", foreign, "--no-progress").returncode == 0
    message = one_line_error(swtool_in_process("audit", smollm2, "--catalog", foreign))
    assert "the catalog is for a model with 4 layers; this one has 30" in message and str(foreign) in message
    # inspect lists only the catalogs of the model, and says why the others are not
    beside = linked_copy(smollm2, tmp_path / "smollm2")
    shutil.copy(foreign, beside / "tiny.json")
    info = json.loads(swtool_in_process("inspect", beside, "--json").stdout)
    assert info["catalogs"] == []
    assert info["other_catalogs"] == [{"file": "tiny.json", "super_weights": 1,
                                       "mismatch": "the catalog is for a model with 4 layers; this one has 30"}]


def test_a_fifo_beside_the_model_does_not_block(smollm2, tmp_path):
    beside = linked_copy(smollm2, tmp_path / "smollm2")
    os.mkfifo(beside / "waiting.json")
    result = swtool("inspect", beside, "--json", timeout=60)  # a real process: killed if it blocks
    assert result.returncode == 0 and json.loads(result.stdout)["catalogs"] == []


@pytest.mark.parametrize("handling, statuses, code", [("none", ["unprotected"] * 4, 1), ("keep", ["intact"] * 4, 0)])
def test_a_super_weight_left_at_two_bits_is_unprotected(smollm2_export, handling, statuses, code):
    out = smollm2_export("q2_k", handling)  # with the catalog
    contents = read_contents(out)
    stored = {name: gguf.GGMLQuantizationType[type_name] for name, (_, type_name, _) in contents.tensors.items()}
    report = audit_json(out, code=code)
    assert report["expectations"] == "the GGUF's swtool.* metadata"
    assert report["handling"] == contents.keys[gguf_keys.HANDLING][1]
    for (layer, row, col), finding in by_coordinate(report).items():
        qtype = stored[f"blk.{layer}.ffn_down.weight"]
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        assert finding["dtype"] == qtype.name and finding["bits"] == 8 * type_size / block_size
        assert (finding["bits"] < 4) == (handling == "none")
    assert [by_coordinate(report)[c]["status"] for c in SW] == statuses
    if handling == "none":
        table = swtool_in_process("audit", out).stdout
        assert "4 unprotected: not protected: stored at fewer than 4 bits per weight" in table
        assert "stored as Q2_K (2.62 bits per weight) with handling none" in table


def test_the_checkpoints_catalog_beside_its_gguf_is_the_gguf_s_own(original_gguf, catalog, tmp_path):
    """A GGUF's config is rebuilt from its metadata, so its hash differs from config.json's: the
    catalog's fingerprint (the shape keys) tells it is the same model."""
    (tmp_path / "smollm2.gguf").symlink_to(original_gguf)
    shutil.copy(catalog, tmp_path / "smollm2.json")
    info = json.loads(swtool_in_process("inspect", tmp_path / "smollm2.gguf", "--json").stdout)
    assert info["catalogs"] == [{"file": "smollm2.json", "super_weights": 4}] and info["other_catalogs"] == []
    shrunk = json.loads(catalog.read_text())
    shrunk["model"]["fingerprint"]["hidden_size"] = 512
    (tmp_path / "smollm2.json").write_text(json.dumps(shrunk))
    info = json.loads(swtool_in_process("inspect", tmp_path / "smollm2.gguf", "--json").stdout)
    assert info["catalogs"] == [] and info["other_catalogs"][0]["mismatch"] == "the catalog was made from another config.json"

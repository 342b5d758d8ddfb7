"""The known table's entries since the Super Weight paper (issue 19): Llama-3.2-1B, Qwen3-30B-A3B's
per-expert super weights, and the Qwen2.5 models in which a published census found none.

The coordinates are written here from the issue's text, not read from swtool. Expert coordinates
are audited on a tiny Qwen3-MoE with a planted weight, in both of transformers' layouts and as a
GGUF; the stored values are read with safetensors and gguf-py, not swtool.
"""

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from fixtures.tiny import Plant, stacked_copy
from swtool import known, schemas
from swtool.cli import main

# issue 19: "Llama-3.2-1B layers[1].mlp.down_proj[400|698|1159|2029, 1417]", and Qwen3-30B-A3B's
# "layer 1 expert 68 [940, 711], layer 2 expert 92 [940, 59], layer 3 expert 82 [940, 423]"
PUBLISHED = {
    "meta-llama/Llama-3.2-1B": [(1, 400, 1417, None), (1, 698, 1417, None), (1, 1159, 1417, None),
                                (1, 2029, 1417, None)],
    "Qwen/Qwen3-30B-A3B": [(1, 940, 711, 68), (2, 940, 59, 92), (3, 940, 423, 82)],
}
# census_master.csv (Georgakopoulos-Soares-lab/superweights): candidate layer, row and R_cand_eps1.0
CENSUS_NONE = {
    "Qwen/Qwen2.5-0.5B": (21, 62, 0.005556031100779856),
    "Qwen/Qwen2.5-1.5B": (26, 408, 0.006480525715832325),
    "Qwen/Qwen2.5-3B": (30, 318, 0.03175519925651747),
    "Qwen/Qwen2.5-7B": (26, 458, 0.0073805601611145735),
}
# the models' config.json as published (abridged); experts and their size, which the fingerprint leaves out
QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
                 "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                 "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                 "max_position_embeddings": 40960, "vocab_size": 151936}
LLAMA_32_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
               "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
               "max_position_embeddings": 131072, "tie_word_embeddings": True, "rope_theta": 500000.0}
QWEN25_05B_INSTRUCT = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                       "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                       "max_position_embeddings": 32768, "_name_or_path": "someone/qwen-fine-tune"}
EXPERTS = {"Qwen/Qwen3-30B-A3B": (QWEN3_30B_A3B["num_experts"], QWEN3_30B_A3B["moe_intermediate_size"])}

PLANT = Plant(1, 41, 101, expert=2)  # a tiny Qwen3-MoE's super weight: layer 1, expert 2, [41, 101]
TINY_ID = "swtool-tests/tiny-qwen3-moe"
SHIPPED = known.load


def invoke(*args):
    """The CLI in this process (so a monkeypatched known table applies): (exit code, stdout, stderr)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def audit_json(*args, code):
    exit_code, stdout, stderr = invoke("audit", *args, "--json", "--no-progress")
    assert exit_code == code, stdout + stderr
    report = json.loads(stdout)
    assert not schemas.errors("audit", report)
    return report


def with_entries(monkeypatch, *entries):
    """The shipped known table with more models (replacing any added before), as swtool.known.load returns it."""
    def load():
        data, _ = SHIPPED()
        data = {**data, "models": data["models"] + list(entries)}
        return data, [known.KnownModel.of(m) for m in data["models"]]

    monkeypatch.setattr(known, "load", load)


# --- the entries ----------------------------------------------------------------------------------

def test_the_new_entries_are_listed_with_their_sources():
    data, models = known.load()
    by_id = {m.id: m for m in models}
    for model_id, coordinates in PUBLISHED.items():
        model = by_id[model_id]
        assert [(sw["layer"], sw["row"], sw["col"], sw.get("expert")) for sw in model.super_weights] == coordinates
        assert model.none_found is None and model.notes
    for model_id, (layer, row, change) in CENSUS_NONE.items():
        model = by_id[model_id]
        assert model.super_weights == [] and model.none_found["sources"] == ["census"]
        assert model.none_found["candidate"] == {"layer": layer, "row": row}
        assert model.none_found["loss_change"] == pytest.approx(change, rel=1e-3)
        assert f"layer {layer} row {row}, raises the loss by {change * 100:.2g} %" in model.none_found["detail"]
    for model in models:
        for sw in model.super_weights:
            assert all(source in data["sources"] for source in sw["sources"])
        for source in (model.none_found or {}).get("sources", ()):
            assert source in data["sources"]
    assert "2507.23279" in data["sources"]["SE"] and "census_master.csv" in data["sources"]["census"]

    code, table, _ = invoke("catalog", "known")
    assert code == 0
    rows = [line.split() for line in table.splitlines()]
    assert ["Llama-7B", "huggyllama/llama-7b", "2", "3968", "7003", "-", "repo+T2"] in rows
    assert ["Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B", "1", "940", "711", "68", "SE"] in rows
    assert ["Llama-3.2-1B", "meta-llama/Llama-3.2-1B", "1", "2029", "1417", "-", "issue19"] in rows
    assert ["Qwen2.5-3B", "Qwen/Qwen2.5-3B", "none", "-", "-", "-", "census", "(none", "found)"] in rows
    assert "Qwen2.5-0.5B: None found (census: its candidate, layer 21 row 62, raises the loss by 0.56 %" in table
    code, listed, _ = invoke("catalog", "known", "--json")
    assert code == 0 and json.loads(listed) == data


def test_every_coordinate_lies_inside_the_shape_its_fingerprint_gives():
    """A transcription slip (row and col swapped, a wrong layer) would put most coordinates outside."""
    for model in known.load()[1]:
        shape = model.fingerprint
        experts, expert_ff = EXPERTS.get(model.id, (0, None))
        for sw in model.super_weights:
            assert sw["layer"] < shape["num_hidden_layers"] and sw["row"] < shape["hidden_size"], model.id
            if sw.get("expert") is None:
                assert sw["col"] < shape["intermediate_size"], model.id
            else:
                assert sw["expert"] < experts and sw["col"] < expert_ff, model.id


def test_the_data_file_meets_its_schema_and_the_schema_refuses_half_entries():
    data, _ = known.load()
    assert not schemas.errors("known", data)
    entry = next(m for m in data["models"] if m["id"] == "Qwen/Qwen2.5-0.5B")
    coordinate = {"layer": 1, "row": 2, "col": 3, "sources": ["census"]}
    bad = {
        "none found and coordinates": {**entry, "super_weights": [coordinate]},
        "neither": {k: v for k, v in entry.items() if k != "none_found"},
        "a negative expert": {**entry, "super_weights": [{**coordinate, "expert": -1}], "none_found": None},
        "none found without its sources": {**entry, "none_found": {"detail": "none"}},
    }
    for what, model in bad.items():
        model = {k: v for k, v in model.items() if v is not None}
        assert schemas.errors("known", {**data, "models": [model]}), what


def test_the_new_models_are_matched_by_their_published_configs():
    match = known.identify(QWEN3_30B_A3B)
    assert (match.model.id, match.how, match.differences) == ("Qwen/Qwen3-30B-A3B", "fingerprint", {})
    match = known.identify(LLAMA_32_1B)
    assert (match.model.id, match.differences) == ("meta-llama/Llama-3.2-1B", {})
    assert known.identify(QWEN25_05B_INSTRUCT).model.id == "Qwen/Qwen2.5-0.5B"
    assert known.by_id("qwen/qwen3-30b-a3b").id == "Qwen/Qwen3-30B-A3B"


# --- audit: expert coordinates ---------------------------------------------------------------------

def element_offset(path, tensor, index):
    """(byte offset, dtype) of tensor[index] in a safetensors file, from its header parsed here."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    entry = json.loads(raw[8:8 + n])[tensor]
    size = {"BF16": 2, "F16": 2, "F32": 4}[entry["dtype"]]
    return 8 + n + entry["data_offsets"][0] + int(np.ravel_multi_index(index, entry["shape"])) * size, entry["dtype"]


def zeroed_copy(directory, destination, tensor, index):
    """A copy of a model directory with tensor[index] overwritten by +0.0."""
    import shutil

    shutil.copytree(directory, destination)
    for path in sorted(destination.glob("*.safetensors")):
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        if tensor in json.loads(raw[8:8 + n]):
            offset, dtype = element_offset(path, tensor, index)
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(bytes({"BF16": 2, "F16": 2, "F32": 4}[dtype]))
            return destination
    raise KeyError(tensor)


def stored(directory, tensor, index):
    from safetensors import safe_open

    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if tensor in f.keys():
                return f.get_tensor(tensor)[index].float().item()
    raise KeyError(tensor)


@pytest.fixture(scope="module")
def moe(tiny_factory):
    directory, _ = tiny_factory("qwen3-moe", "bfloat16", plants=(PLANT,))
    return directory


def tiny_entry(directory, expert=PLANT.expert):
    config = json.loads((directory / "config.json").read_text())
    return {"name": "tiny Qwen3-MoE", "id": TINY_ID, "fingerprint": known.fingerprint_of(config),
            "super_weights": [{"layer": PLANT.layer, "expert": expert, "row": PLANT.row, "col": PLANT.col,
                               "sources": ["SE"]}]}


# the tensor holding the planted weight in each layout, and its index there
LAYOUTS = {
    "per-expert": (f"model.layers.1.mlp.experts.{PLANT.expert}.down_proj.weight", (PLANT.row, PLANT.col)),
    "stacked": ("model.layers.1.mlp.experts.down_proj", (PLANT.expert, PLANT.row, PLANT.col)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_an_expert_coordinate_is_read_in_its_expert(layout, moe, tmp_path, monkeypatch):
    directory = moe if layout == "per-expert" else stacked_copy(moe, tmp_path / "stacked")
    tensor, index = LAYOUTS[layout]
    assert stored(directory, tensor, index) == PLANT.value  # 4.0: exact in bf16
    with_entries(monkeypatch, tiny_entry(directory))

    report = audit_json(directory, "--known-id", TINY_ID, code=0)
    (finding,) = report["findings"]
    assert report["expectations"] == f"the known coordinates of {TINY_ID} (named)"
    assert (finding["layer"], finding["expert"], finding["row"], finding["col"]) == \
        (PLANT.layer, PLANT.expert, PLANT.row, PLANT.col)
    assert (finding["tensor"], finding["value"], finding["status"]) == (tensor, PLANT.value, "intact")
    assert finding["row_rank"] == 1

    report = audit_json(directory, "--known", code=0)  # the same entry, matched by config
    assert report["expectations"] == f"the known coordinates of {TINY_ID} (matched by fingerprint)"

    damaged = zeroed_copy(directory, tmp_path / "zeroed", tensor, index)
    (finding,) = audit_json(damaged, "--known-id", TINY_ID, code=1)["findings"]
    assert (finding["value"], finding["status"]) == (0.0, "zeroed")

    # the same [row, col] in another expert is an ordinary weight: the expert is what is read
    with_entries(monkeypatch, tiny_entry(directory, expert=1))
    (finding,) = audit_json(directory, "--known-id", TINY_ID, code=1)["findings"]
    assert finding["expert"] == 1 and finding["status"] == "not outlier"
    other = ("model.layers.1.mlp.experts.1.down_proj.weight", (PLANT.row, PLANT.col)) if layout == "per-expert" \
        else ("model.layers.1.mlp.experts.down_proj", (1, PLANT.row, PLANT.col))
    assert finding["tensor"] == other[0] and finding["value"] == stored(directory, *other)


@pytest.mark.real
def test_an_expert_coordinate_is_read_in_a_gguf(tmp_path, monkeypatch):
    """llama.cpp stacks the experts (blk.1.ffn_down_exps.weight, [expert, row, col]); the value is
    checked against gguf-py's reading of the whole tensor. SmolLM2's vocabulary: export needs merges."""
    import shutil

    import gguf

    from fixtures.converted import BPE_FILES, SMOLLM2_DIR, bpe_config
    from fixtures.tiny import build_tiny

    moe = tmp_path / "moe"
    # every layer sparse, as in Qwen3-30B-A3B: swtool reads no dense layer in a qwen3moe GGUF
    build_tiny(moe, "qwen3-moe", "bfloat16", plants=(PLANT,), mlp_only_layers=[], **bpe_config())
    for name in BPE_FILES:
        shutil.copy(SMOLLM2_DIR / name, moe / name)
    out = tmp_path / "moe-f32.gguf"
    code, _, stderr = invoke("export", moe, "-o", out, "--type", "f32", "--no-progress")
    assert code == 0, stderr
    with_entries(monkeypatch, tiny_entry(moe))
    (finding,) = audit_json(out, "--known-id", TINY_ID, code=0)["findings"]
    assert (finding["gguf_tensor"], finding["expert"], finding["status"]) == ("blk.1.ffn_down_exps.weight", 2, "intact")
    tensor = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "blk.1.ffn_down_exps.weight")
    values = np.asarray(tensor.data).reshape([int(n) for n in reversed(tensor.shape)])
    assert finding["value"] == float(values[PLANT.expert, PLANT.row, PLANT.col]) == PLANT.value


def test_expert_coordinates_on_a_model_without_experts_are_bad_input(tiny_factory):
    dense, _ = tiny_factory("llama", "bfloat16")
    code, _, stderr = invoke("audit", dense, "--known-id", "Qwen/Qwen3-30B-A3B", "--no-progress")
    assert code == 2 and "in mixture experts" in stderr and "this model has no experts" in stderr


# --- audit: models in which a census found none ---------------------------------------------------------

def test_a_census_none_entry_gives_no_verdict_and_says_why(tiny_factory):
    directory, _ = tiny_factory("qwen2", "bfloat16", plants=(Plant(1, 41, 101),))
    report = audit_json(directory, "--known-id", "Qwen/Qwen2.5-0.5B", code=3)
    assert report["verdict"] == "unverified" and not report["ok"] and report["findings"] == []
    assert report["known_model"] == "Qwen/Qwen2.5-0.5B" and report["bytes_read"] == 0
    assert report["known_none"].startswith("census: its candidate, layer 21 row 62, raises the loss by 0.56 %")
    assert report["expectations"] == "the known table's entry for Qwen/Qwen2.5-0.5B (named): no published super weight"

    code, table, _ = invoke("audit", directory, "--known-id", "Qwen2.5-0.5B", "--no-progress")
    assert code == 3, table
    lines = table.splitlines()
    assert lines[1] == ("no published super weight to check (census: its candidate, layer 21 row 62, raises the "
                        "loss by 0.56 % when ablated: no catastrophic super weight found)")
    assert lines[2].startswith("no verdict: nothing published to compare with")
    assert "intact" not in table and "the scan found none" not in table


def test_a_census_none_entry_matched_by_config(tiny_factory, monkeypatch):
    """--known holds the model to the entry it matches: no verdict. Without an option the entry is
    noted and passed over: the audit goes on to the next source, here a scan of the model itself."""
    directory, _ = tiny_factory("qwen2", "bfloat16", plants=(Plant(1, 41, 101),))
    config = json.loads((directory / "config.json").read_text())
    census = next(m for m in known.load()[0]["models"] if m["id"] == "Qwen/Qwen2.5-1.5B")
    with_entries(monkeypatch, {**census, "name": "tiny Qwen2", "id": "swtool-tests/tiny-qwen2", "aliases": [],
                               "fingerprint": known.fingerprint_of(config)})

    report = audit_json(directory, "--known", code=3)
    assert report["known_none"].startswith("census: its candidate, layer 26 row 408")
    assert report["expectations"].endswith("(matched by fingerprint): no published super weight")

    report = audit_json(directory, code=3)
    assert report["self_scan"] and report["known_model"] is None and report["known_none"] is None
    assert [(f["layer"], f["row"], f["col"], f["status"]) for f in report["findings"]] == [(1, 41, 101, "unverified")]
    assert report["notes"] == ["known table not used: swtool-tests/tiny-qwen2 has no published super weight "
                               f"({known.none_found_words(known.KnownModel.of(census))})"]


def test_inspect_shows_experts_and_census_none(moe, tiny_factory, monkeypatch):
    qwen2, _ = tiny_factory("qwen2", "bfloat16", plants=(Plant(1, 41, 101),))
    census = next(m for m in known.load()[0]["models"] if m["id"] == "Qwen/Qwen2.5-3B")
    none_entry = {**census, "id": "swtool-tests/tiny-qwen2", "aliases": [],
                  "fingerprint": known.fingerprint_of(json.loads((qwen2 / "config.json").read_text()))}
    with_entries(monkeypatch, tiny_entry(moe), none_entry)

    code, stdout, _ = invoke("inspect", moe, "--json")
    info = json.loads(stdout)
    assert code == 0 and not schemas.errors("inspect", info)
    assert info["known"]["super_weights"] == [[PLANT.layer, PLANT.row, PLANT.col]]
    assert info["known"]["experts"] == [PLANT.expert] and "none_found" not in info["known"]
    code, stdout, _ = invoke("inspect", moe)
    assert f"matched by fingerprint): 1 [41, 101] expert {PLANT.expert}\n" in stdout

    code, stdout, _ = invoke("inspect", qwen2, "--json")
    info = json.loads(stdout)
    assert code == 0 and not schemas.errors("inspect", info)
    assert info["known"]["super_weights"] == [] and info["known"]["none_found"].startswith("census: its candidate")
    code, stdout, _ = invoke("inspect", qwen2)
    assert "no published super weight (census: its candidate, layer 30 row 318" in stdout

"""Mixtures in GGUF files beyond the converter harness (test_gguf_converter.py): a super weight in
one expert's down projection, recorded and protected by `swtool export`, and the experts written
alike from either checkpoint layout.

llama.cpp stacks a layer's experts into blk.N.ffn_down_exps [experts, hidden, ff]: an expert's
super weight is its element [expert, row, col], recorded in swtool.super_weights.expert.
"""

import json
import shutil

import numpy as np
import pytest

from fixtures.cli_run import one_line_error, swtool_in_process  # test_cli.py runs each command as a process
from fixtures.gguf_compare import dequantized, read_contents
from fixtures.converted import BPE_FILES, SMOLLM2_DIR, bpe_config
from fixtures.tiny import Plant, build_tiny, stacked_copy

pytestmark = pytest.mark.real

PLANT = Plant(layer=1, row=3, col=5, expert=1)
HOLDER = f"blk.{PLANT.layer}.ffn_down_exps.weight"


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    """A tiny OLMoE with the planted expert super weight and SmolLM2's vocabulary (export needs merges)."""
    directory = tmp_path_factory.mktemp("olmoe")
    build_tiny(directory, "olmoe", plants=(PLANT,), **bpe_config())
    for name in BPE_FILES:
        shutil.copy(SMOLLM2_DIR / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def catalog(olmoe, tmp_path_factory):
    path = tmp_path_factory.mktemp("moe-catalog") / "catalog.json"
    result = swtool_in_process("scan", olmoe, "-o", path, "--no-progress")
    assert result.returncode == 0, result.stderr
    return path


def gguf_tensors(path):
    """{name: (shape, type name, sha256 of its bytes)} (fixtures/gguf_compare.py, held to gguf-py's reading
    without its seconds of decoding SmolLM2's vocabulary element by element)."""
    return read_contents(path).tensors


def gguf_fields(path):
    """{key: (value, its GGUF value type names)}, as gguf_tensors reads them."""
    return {name: (value, types) for name, (types, value) in read_contents(path).keys.items()}


def planted_entry(catalog):
    entries = json.loads(catalog.read_text())["super_weights"]
    return next(sw for sw in entries if (sw["layer"], sw["row"], sw["col"]) == (PLANT.layer, PLANT.row, PLANT.col))


def test_scan_names_the_experts_element_in_llama_cpp_terms(catalog):
    sw = planted_entry(catalog)
    assert sw["expert"] == PLANT.expert
    assert sw["tensor"] == f"model.layers.{PLANT.layer}.mlp.experts.{PLANT.expert}.down_proj.weight"
    assert sw["gguf_tensor"] == HOLDER


def test_export_records_and_keeps_an_experts_super_weight(olmoe, catalog, tmp_path):
    import gguf
    from safetensors.numpy import load_file

    out = tmp_path / "olmoe-q4_0.gguf"
    result = swtool_in_process("export", olmoe, "-o", out, "--type", "q4_0", "--catalog", catalog, "--no-progress")
    assert result.returncode == 0, result.stderr
    entries = json.loads(catalog.read_text())["super_weights"]
    T = gguf.GGUFValueType
    meta = gguf_fields(out)
    assert meta["swtool.super_weights.expert"] == ([-1 if sw["expert"] is None else sw["expert"] for sw in entries],
                                                   (T.ARRAY.name, T.INT32.name))
    assert meta["swtool.super_weights.tensor"][0] == [sw["gguf_tensor"] for sw in entries]
    assert meta["swtool.super_weights.layer"][0] == [sw["layer"] for sw in entries]
    assert meta["swtool.super_weights.row"][0] == [sw["row"] for sw in entries]
    assert meta["swtool.super_weights.col"][0] == [sw["col"] for sw in entries]
    assert meta["swtool.export.handling"][0] == "keep:Q8_0"
    # keep: the stack that holds the super weight in q8_0, the other layers' stacks in the file's type
    tensors = gguf_tensors(out)
    holders = {sw["gguf_tensor"] for sw in entries}
    for layer in range(4):
        name = f"blk.{layer}.ffn_down_exps.weight"
        assert tensors[name][1] == ("Q8_0" if name in holders else "Q4_0"), name
    # the element itself: its q8_0 block as gguf-py quantizes the source row of that expert
    source = load_file(olmoe / "model.safetensors")[planted_entry(catalog)["tensor"]][PLANT.row]
    expected = gguf.quants.dequantize(gguf.quants.quantize(source[None], gguf.GGMLQuantizationType.Q8_0),
                                      gguf.GGMLQuantizationType.Q8_0)[0]
    assert tensors[HOLDER][1] == "Q8_0"
    stored = dequantized(out, HOLDER)  # [experts, hidden, ff], as gguf-py dequantizes it
    assert np.array_equal(stored[PLANT.expert, PLANT.row], expected)
    assert stored[PLANT.expert, PLANT.row, PLANT.col] == pytest.approx(planted_entry(catalog)["value"], rel=1e-2)


def test_audit_of_the_export_reads_the_experts_element(olmoe, catalog, tmp_path):
    out = tmp_path / "olmoe-f16.gguf"
    result = swtool_in_process("export", olmoe, "-o", out, "--type", "f16", "--catalog", catalog, "--no-progress")
    assert result.returncode == 0, result.stderr
    result = swtool_in_process("audit", out, "--json", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    findings = json.loads(result.stdout)["findings"]
    planted = next(f for f in findings if (f["layer"], f["row"], f["col"]) == (PLANT.layer, PLANT.row, PLANT.col))
    assert (planted["expert"], planted["gguf_tensor"], planted["status"]) == (PLANT.expert, HOLDER, "intact")
    assert planted["value"] == pytest.approx(planted_entry(catalog)["value"], rel=1e-3)  # f16 of the float32 value


def test_stacked_checkpoint_exports_as_its_per_expert_original(olmoe, tmp_path):
    """transformers 5's fused gate_up_proj is split into ffn_gate_exps and ffn_up_exps, per-expert
    tensors are stacked: both layouts of one model give the same tensors, byte for byte."""
    stacked = stacked_copy(olmoe, tmp_path / "stacked")
    files = {}
    for name, directory in (("per_expert", olmoe), ("stacked", stacked)):
        files[name] = tmp_path / f"{name}.gguf"
        result = swtool_in_process("export", directory, "-o", files[name], "--type", "f32", "--no-progress")
        assert result.returncode == 0, result.stderr
    ours, theirs = gguf_tensors(files["stacked"]), gguf_tensors(files["per_expert"])
    assert sorted(ours) == sorted(theirs)
    assert {"blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", HOLDER} <= set(ours)
    for name, tensor in theirs.items():
        assert ours[name] == tensor, name  # shape, type and the bytes' sha256


@pytest.mark.parametrize("family, dense, message", [
    ("qwen3-moe", dict(mlp_only_layers=[3]), "dense layers [3] (mlp_only_layers / decoder_sparse_step) cannot be "
                                             "exported: llama.cpp's qwen3moe loads a router and experts in every layer"),
    ("qwen2-moe", dict(decoder_sparse_step=2), "dense layers [0, 2] (mlp_only_layers / decoder_sparse_step) cannot "
                                               "be exported: llama.cpp's qwen2moe loads a router and experts"),
])
def test_export_refuses_dense_layers_llama_cpp_cannot_load(tmp_path, family, dense, message):
    """llama.cpp's qwen2moe/qwen3moe require blk.N.ffn_gate_inp in every layer (a file with a dense
    layer fails to load: "tensor 'blk.3.ffn_gate_inp.weight' not found"), and its converter cannot map
    a dense layer's mlp.down_proj; with a vocabulary the rest of the export could write."""
    model_dir = tmp_path / "model"
    build_tiny(model_dir, family, **dense, **bpe_config())
    for name in BPE_FILES:
        shutil.copy(SMOLLM2_DIR / name, model_dir / name)
    out = tmp_path / "out.gguf"
    for extra in ((), ("--dry-run",)):
        error = one_line_error(swtool_in_process("export", model_dir, "-o", out, "--type", "f32", "--no-progress", *extra))
        assert message in error
        assert not out.exists()

"""export and quantize: protected by default, and llama-quantize's own option names.

  - without --catalog, export (and quantize of a GGUF without a swtool.* record) scans the model:
    the planted super weight's tensor is kept at --keep-type and recorded; --no-scan opts out;
  - --pure, --output-tensor-type, --token-embedding-type and --leave-output-tensor choose what
    llama.cpp's own llama_model_quantize chooses with the same parameters (its tensor types);
  - --dry-run prints the plan of the real run and writes nothing; --tensor-type says what
    each pattern matched, and when it matched nothing; type names in any case.
"""

import json

import gguf
import pytest

from fixtures.cli_run import swtool_in_process
from fixtures.llama_oracle import quantize as llama_quantize
from fixtures.tiny import Plant

pytestmark = pytest.mark.llama_cpp

T = gguf.GGMLQuantizationType
PLANT = Plant(layer=1, row=3, col=5)
HELD = f"blk.{PLANT.layer}.ffn_down.weight"
# rows of 256 values, so every K-quant lands where llama.cpp's rules put it; untied output
SHAPE = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from fixtures.tiny import build_tiny

    directory = tmp_path_factory.mktemp("planted")
    build_tiny(directory, "llama", "bfloat16", plants=[PLANT], **SHAPE)
    path = directory / "tokenizer.json"  # llama.cpp refuses a byte-level BPE without merges
    data = json.loads(path.read_text())
    data["model"]["vocab"]["Ġt"] = 258
    data["model"]["merges"] = [["Ġ", "t"]]
    path.write_text(json.dumps(data))
    return directory


def export(model, out, *options):
    result = swtool_in_process("export", model, "-o", out, "--no-progress", *options)
    assert result.returncode == 0, result.stderr
    return result.stdout


def types(path):
    return {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}


def metadata(path):
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if k.startswith("swtool.")}


def test_export_without_a_catalog_scans_keeps_and_records(model, tmp_path):
    stdout = export(model, tmp_path / "q4_0.gguf", "--type", "Q4_0", "--keep-type", "Q8_0")
    stored = types(tmp_path / "q4_0.gguf")
    assert stored[HELD] == T.Q8_0 and stored["blk.0.ffn_down.weight"] == T.Q4_0
    record = metadata(tmp_path / "q4_0.gguf")
    assert record["swtool.export.handling"] == "keep:Q8_0"
    assert (record["swtool.super_weights.layer"], record["swtool.super_weights.row"],
            record["swtool.super_weights.col"]) == ([PLANT.layer], [PLANT.row], [PLANT.col])
    assert "scanned the model" in stdout and "1 super weight found" in stdout


def test_no_scan_records_and_protects_nothing(model, tmp_path):
    stdout = export(model, tmp_path / "plain.gguf", "--type", "q4_0", "--no-scan")
    assert types(tmp_path / "plain.gguf")[HELD] == T.Q4_0
    assert metadata(tmp_path / "plain.gguf") == {}
    assert "neither recorded nor protected" in stdout


def test_quantize_of_a_file_without_a_record_scans_it(model, tmp_path):
    export(model, tmp_path / "f32.gguf", "--type", "f32", "--no-scan")
    result = swtool_in_process("quantize", tmp_path / "f32.gguf", "-o", tmp_path / "q4_0.gguf", "--type", "q4_0",
                               "--no-progress")
    assert result.returncode == 0, result.stderr
    assert types(tmp_path / "q4_0.gguf")[HELD] == T.Q8_0
    assert metadata(tmp_path / "q4_0.gguf")["swtool.super_weights.row"] == [PLANT.row]


# (swtool options, llama_model_quantize parameters) that mean the same
OPTIONS = {
    "pure": (["--pure"], dict(pure=True)),
    "output-tensor-type": (["--output-tensor-type", "q4_0"], dict(output_tensor_type=int(T.Q4_0))),
    "token-embedding-type": (["--token-embedding-type", "Q5_K"], dict(token_embedding_type=int(T.Q5_K))),
    "leave-output-tensor": (["--leave-output-tensor"], dict(quantize_output_tensor=False)),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_llama_quantize_options_choose_what_llama_quantize_chooses(model, tmp_path, option):
    ours_options, theirs_params = OPTIONS[option]
    export(model, tmp_path / "f32.gguf", "--type", "f32", "--no-scan")
    theirs = llama_quantize(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", "q4_k_m", **theirs_params)
    plain = llama_quantize(tmp_path / "f32.gguf", tmp_path / "plain.gguf", "q4_k_m")
    result = swtool_in_process("quantize", tmp_path / "f32.gguf", "-o", tmp_path / "ours.gguf", "--type", "q4_k_m",
                               "--no-scan", "--no-progress", *ours_options)  # the same input as llama.cpp's
    assert result.returncode == 0, result.stderr
    assert types(tmp_path / "ours.gguf") == types(theirs)
    assert types(theirs) != types(plain)  # the option changed something, in llama.cpp too


def test_leave_output_tensor_keeps_the_checkpoints_own_type(model, tmp_path):
    export(model, tmp_path / "left.gguf", "--type", "q4_0", "--no-scan", "--leave-output-tensor")
    assert types(tmp_path / "left.gguf")["output.weight"] == T.BF16  # the bf16 checkpoint's


def test_dry_run_prints_the_plan_of_the_real_run_and_writes_nothing(model, tmp_path):
    options = ["--type", "q4_k_m", "--tensor-type", r"attn_output=q8_0", "--tensor-type", "no_such_tensor=q8_0"]
    planned = export(model, tmp_path / "dry.gguf", "--dry-run", *options)
    assert not (tmp_path / "dry.gguf").exists()
    real = export(model, tmp_path / "real.gguf", *options)
    written = types(tmp_path / "real.gguf")
    rows = {}
    for line in planned.splitlines():  # the plan's table comes first; the super-weight table names tensors too
        if line.split() and line.split()[0] in written:
            rows.setdefault(line.split()[0], line.split()[2])
    assert rows == {name: qtype.name for name, qtype in written.items()}
    assert "--tensor-type no_such_tensor=q8_0 matched no tensor" in planned
    assert "--tensor-type attn_output=q8_0 matched 4 tensors" in planned
    assert [line for line in planned.splitlines() if line.startswith("note:")] == \
           [line for line in real.splitlines() if line.startswith("note:")]

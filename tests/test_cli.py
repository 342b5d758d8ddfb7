"""`swtool scan` end to end through the real entry point, and its one-line errors on bad input."""

import json
import shutil
import subprocess
import sys

import pytest

from swtool.catalog import read_catalog, validate
from swtool.errors import SwtoolError
from swtool.tokenizer import DEFAULT_PROMPTS
from fixtures.tiny import Plant
from fixtures.cli_run import swtool_in_process

PLANT = (Plant(1, 41, 101),)


def swtool(*args):
    return subprocess.run([sys.executable, "-m", "swtool", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def planted(tiny_factory, tmp_path):
    source, _ = tiny_factory("llama", "bfloat16", plants=PLANT)
    copy = tmp_path / "model"
    shutil.copytree(source, copy)
    return copy


def test_scan_prints_a_table_and_writes_a_valid_catalog(planted, tmp_path):
    out = tmp_path / "catalog.json"
    result = swtool("scan", planted, "-o", out)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split()[:5] == ["layer", "row", "col", "tensor", "value"]
    # the input's own names: Hugging Face's for safetensors (a GGUF input keeps llama.cpp's, test_scan_prompts.py)
    assert lines[3].split()[:4] == ["1", "41", "101", "model.layers.1.mlp.down_proj.weight"]
    assert "scan pass" not in result.stderr and "it/s" not in result.stderr  # no bar: stderr is no terminal
    catalog = read_catalog(out)
    assert catalog["schema"] == "swtool.catalog/2"
    (sw,) = catalog["super_weights"]
    assert (sw["layer"], sw["row"], sw["col"]) == (1, 41, 101)
    assert sw["tensor"] == "model.layers.1.mlp.down_proj.weight"
    # the default prompt set, the paper's prompt first (detection.prompt is the first prompt's)
    assert catalog["detection"]["prompt"] == "Apple Inc. is a worldwide tech company."
    assert [p["prompt"] for p in catalog["detection"]["prompts"]] == list(DEFAULT_PROMPTS)
    assert (sw["found_in"], sw["verified_in"]) == (len(DEFAULT_PROMPTS), len(DEFAULT_PROMPTS))
    assert catalog["detection"]["tokens"][0] == 256  # BOS from the tokenizer's post-processor
    assert len(catalog["profile"]) == 4
    assert not list(tmp_path.glob(".catalog.json.*"))  # no temporary left behind


def test_scan_json_goes_to_stdout_and_hashes_on_request(planted):
    result = swtool("scan", planted, "--json", "--hash", "--no-progress", "--prompt", "Hello there, world")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    catalog = json.loads(result.stdout)
    validate(catalog)
    assert catalog["detection"]["prompt"] == "Hello there, world"
    import hashlib

    expected = hashlib.sha256((planted / "model.safetensors").read_bytes()).hexdigest()
    assert catalog["model"]["files"] == [{"name": "model.safetensors",
                                          "size": (planted / "model.safetensors").stat().st_size,
                                          "sha256": expected}]


def one_line_error(result):
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# one bad input per command, with the options it requires: the tables of bad inputs in the other test
# files run in process (cli_run.swtool_in_process); here each command's real entry point runs too
BAD_INPUT = {
    "ablate": ["ablate", "{tmp}/model", "--catalog", "{tmp}/catalog.json", "-o", "{tmp}/out"],
    "audit": ["audit", "{tmp}/model"],
    "eval": ["eval", "{tmp}/model", "--text", "{tmp}/text.txt"],
    "export": ["export", "{tmp}/model", "-o", "{tmp}/out.gguf", "--type", "q8_0"],
    "inspect": ["inspect", "{tmp}/model"],
    "quantize": ["quantize", "{tmp}/model.gguf", "-o", "{tmp}/out.gguf", "--type", "q8_0"],
    "quantsim": ["quantsim", "{tmp}/model", "--text", "{tmp}/text.txt"],
    "scan": ["scan", "{tmp}/model"],
    "scan-usage": ["scan", "--no-progress"],  # a click usage error, turned into one line by the group
    "sweep": ["sweep", "{tmp}/model", "--text", "{tmp}/text.txt"],
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_a_real_process_gives_the_one_line_error_the_in_process_runner_sees(case, tmp_path):
    argv = [arg.format(tmp=tmp_path) for arg in BAD_INPUT[case]]
    real, here = swtool(*argv), swtool_in_process(*argv)
    line = one_line_error(real)
    assert line == one_line_error(here)
    assert "no such file" in line or "Missing argument 'MODEL'" in line, line
    assert list(tmp_path.iterdir()) == []


def test_truncated_shard(planted):
    shard = planted / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    line = one_line_error(swtool_in_process("scan", planted, "--no-progress"))
    assert "model.safetensors: truncated" in line


def test_corrupt_header(planted):
    shard = planted / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:12] = b"#!?x"
    shard.write_bytes(bytes(data))
    line = one_line_error(swtool_in_process("scan", planted, "--no-progress"))
    assert "corrupt header" in line


def test_missing_shard(tiny_factory, tmp_path):
    source, _ = tiny_factory("llama", "bfloat16", plants=PLANT, max_shard_size="40KB")
    shutil.copytree(source, tmp_path / "m")
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    line = one_line_error(swtool_in_process("scan", tmp_path / "m", "--no-progress"))
    assert f"missing shard {shards[1].name!r}" in line


def test_unknown_model_type_names_the_supported_families(planted):
    config = json.loads((planted / "config.json").read_text())
    config["model_type"] = "mamba"
    (planted / "config.json").write_text(json.dumps(config))
    line = one_line_error(swtool_in_process("scan", planted, "--no-progress"))
    assert "unsupported model_type 'mamba'" in line
    assert "llama" in line and "mistral" in line and "qwen2" in line


def test_missing_tensor_and_wrong_shape(planted):
    config = json.loads((planted / "config.json").read_text())
    config["num_hidden_layers"] = 5  # the checkpoint has 4
    (planted / "config.json").write_text(json.dumps(config))
    assert "missing tensor 'model.layers.4.input_layernorm.weight'" in one_line_error(
        swtool_in_process("scan", planted, "--no-progress"))
    config["num_hidden_layers"], config["hidden_size"] = 4, 32
    (planted / "config.json").write_text(json.dumps(config))
    assert "config.json implies" in one_line_error(swtool_in_process("scan", planted, "--no-progress"))


def test_a_line_break_in_a_path_is_printed_escaped(tmp_path):
    line = one_line_error(swtool_in_process("scan", tmp_path / "two\nlines", "--no-progress"))
    assert line == f"error: {tmp_path}/two\\nlines: no such file or directory"


def test_not_a_model(tmp_path):
    assert "no such file" in one_line_error(swtool_in_process("scan", tmp_path / "nothing", "--no-progress"))
    assert "no model.safetensors" in one_line_error(swtool_in_process("scan", tmp_path, "--no-progress"))


def test_source_files_are_not_modified_by_a_scan(planted, tmp_path):
    before = {p.name: p.read_bytes() for p in planted.iterdir()}
    assert swtool("scan", planted, "--no-progress", "-o", tmp_path / "c.json").returncode == 0
    assert {p.name: p.read_bytes() for p in planted.iterdir()} == before


def test_invalid_catalog_is_rejected_with_its_location(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"schema": "swtool.catalog/1", "tool": {"name": "swtool", "version": "0"},
                               "model": {}, "detection": {}, "super_weights": [{"layer": -1}], "profile": []}))
    with pytest.raises(SwtoolError, match="invalid catalog"):
        read_catalog(bad)


@pytest.mark.parametrize("argv", [["--help"], ["scan", "--help"], ["export", "--help"]])
def test_help_is_fast_and_does_not_import_numpy(argv):
    """--help runs the command line for real and prints its usage, without importing numpy or numba."""
    code = ("import sys\nfrom swtool.cli import main\ntry:\n    main(sys.argv[1:], prog_name='swtool')\nexcept SystemExit as e:\n"
            "    print(e.code, 'numpy' in sys.modules, 'numba' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert result.stderr.split() == ["0", "False", "False"], result.stderr
    command = " ".join(argv[:-1])
    assert result.stdout.startswith(f"Usage: swtool {command}".rstrip() + " [OPTIONS]")
    assert "--help" in result.stdout
    if not command:
        assert {"scan", "eval", "export", "quantize", "audit"} <= set(line.split()[0] for line in
                                                                       result.stdout.split("Commands:")[1].splitlines()
                                                                       if line.strip())


def test_the_console_script_flushes_everything_before_its_fast_exit(planted, tmp_path):
    """swtool.cli.run ends the process with os._exit once the command is done: stdout redirected to a
    file (block-buffered, not a pipe) must still be complete, and exit codes must be the command's."""
    out = tmp_path / "scan.json"
    with open(out, "w") as stdout:
        done = subprocess.run([sys.executable, "-m", "swtool", "scan", planted, "--json", "--no-progress"],
                              stdout=stdout, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["super_weights"][0]["tensor"] == "model.layers.1.mlp.down_proj.weight"
    bad = swtool("scan", tmp_path / "missing")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    assert swtool("--version").returncode == 0


def test_the_console_script_skips_interpreter_teardown_only_after_main_returns(monkeypatch, capsys):
    """run() calls os._exit with main's exit code; main() alone raises SystemExit as click does."""
    import os

    from swtool import cli

    import gc

    exits, thresholds = [], []
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setattr(gc, "set_threshold", lambda *t: thresholds.append(t))  # not for this pytest process
    monkeypatch.setattr(sys, "argv", ["swtool", "--version"])
    cli.run()
    monkeypatch.setattr(sys, "argv", ["swtool", "scan", "/nonexistent/model"])
    cli.run()
    assert exits == [0, 2]
    assert thresholds == [(10_000, 10, 10)] * 2  # the collector batches more in the command
    assert "error: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main()


def test_a_bf16_scan_does_not_import_the_quantizers(planted):
    """Start-up: swtool.quant (GGUF block quantizers, 40 ms of imports) is not needed to scan safetensors,
    nor tqdm without a progress bar."""
    code = ("import sys; from swtool.cli import main\n"
            f"main(['scan', {str(planted)!r}, '--no-progress'], standalone_mode=False)\n"
            "print('swtool.quant' in sys.modules, 'tqdm' in sys.modules, 'swtool.kernels' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-3:] == ["False", "False", "True"]


def test_h_is_help_and_debug_works_anywhere(tmp_path):
    for argv in (["-h"], ["scan", "-h"], ["audit", "-h"]):
        result = swtool(*argv)
        assert result.returncode == 0 and result.stdout.startswith("Usage: "), (argv, result.stderr)
        assert "  -h, --help " in result.stdout, argv
    missing = tmp_path / "nothing"
    for argv in (["--debug", "scan", missing], ["scan", missing, "--debug"], ["scan", "--debug", missing]):
        result = swtool(*argv)
        assert result.returncode == 2, argv
        lines = result.stderr.strip().splitlines()
        assert lines[0] == "Traceback (most recent call last):", (argv, result.stderr)
        assert lines[-1] == f"error: {missing}: no such file or directory", argv

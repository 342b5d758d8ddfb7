"""`swtool sweep` on SmolLM2, judged by llama.cpp, transformers and gguf-py.

One small sweep (f16 and q2_k; none, keep:q8_0 and control:q8_0; one window of 512 tokens)
runs through the real CLI with --out-dir, and each kept file is then scored again directly
by llama-cpp-python (fixtures/llama_oracle.py, an implementation separate from
swtool/llama_score.py) on tokens from transformers' tokenizer. Sizes are checked against
the files and llama.cpp's own count of bytes and parameters, stored types against gguf-py,
the source's perplexity against a transformers forward pass.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from fixtures import llama_oracle
from swtool.coordinate import Coordinate
from swtool.gguf_export import ProtectedWeight
from swtool.sweep import control_layers
from fixtures.cli_run import one_line_error, swtool_without, swtool_in_process
from fixtures.sweeps import HANDLINGS

pytestmark = [pytest.mark.real, pytest.mark.llama_cpp]  # swtool sweep scores each file in llama.cpp


@pytest.fixture(scope="module")
def prose(smollm2):
    return smollm2.parents[1] / "prose.txt"


@pytest.fixture(scope="module")
def swept(smollm2_sweep):
    """The sweep's JSON result, the directory holding its files, its stdout and what its plot draws
    (conftest's smollm2_sweep, fixtures/sweeps.py: f16 and q2_k x HANDLINGS on one window of prose.txt,
    shared with test_kld.py)."""
    return smollm2_sweep


@pytest.fixture(scope="module")
def first_window(smollm2_prose_logits):
    """The first 512 tokens of the text as transformers' tokenizer makes them."""
    return smollm2_prose_logits[0]


def rows_by_key(result):
    return {(row["type"], row["handling"]): row for row in result["rows"]}


def file_of(files, row):
    return files / f"smollm2-{row['type']}-{row['handling'].replace(':', '-')}.gguf"


def test_rows_and_skips(swept):
    result, files, stdout, _ = swept
    assert list(rows_by_key(result)) == [("f16", "none"), ("q2_k", "none"), ("q2_k", "keep:q8_0"),
                                         ("q2_k", "control:q8_0")]
    # keeping or spending q8_0 in an f16 file would write the plain f16 file again
    assert result["skipped_same_as_none"] == [{"type": "f16", "handling": "keep:q8_0"},
                                              {"type": "f16", "handling": "control:q8_0"}]
    assert sorted(p.name for p in files.iterdir()) == sorted(
        [file_of(files, row).name for row in result["rows"]] + ["smollm2.catalog.json"])
    table = stdout.splitlines()
    assert table[1].split()[:4] == ["type", "super", "weights", "stored"]
    assert [line.split()[:2] for line in table[3:8]] == [["source", "swtool"], ["f16", "none"], ["q2_k", "none"],
                                                          ["q2_k", "keep:q8_0"], ["q2_k", "control:q8_0"]]


def test_plot_draws_each_handlings_rows_and_the_source(swept):
    """One line per handling through its rows' (bits per weight, perplexity), in bits order; the
    source's perplexity as a flat line; and the file is a PNG."""
    result, files, stdout, lines = swept
    png = files.parent / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stdout.splitlines()[-1] == f"plot written to {png}"
    handlings = HANDLINGS.split(",")
    assert [label for label, _, _ in lines] == handlings + [f"source (swtool eval) {result['source']['perplexity']:.2f}"]
    for (label, ys, xs), handling in zip(lines, handlings):
        rows = sorted((row for row in result["rows"] if row["handling"] == handling),
                      key=lambda row: row["bits_per_weight"])
        assert xs == [row["bits_per_weight"] for row in rows]
        assert ys == [row["perplexity"] for row in rows]
    assert set(lines[-1][1]) == {result["source"]["perplexity"]}


def test_perplexities_are_llama_cpps_on_the_same_windows(swept, first_window, llama_logits):
    """Each file, loaded again and scored directly in llama-cpp-python, gives the sweep's number."""
    result, files, _, _ = swept
    for row in result["rows"]:
        # llama_oracle.window_logits of the file on the window, decoded once per run (conftest's llama_logits):
        # test_kld.py holds the same files' logits on the same window to the source's
        logits = llama_logits(file_of(files, row), [first_window])
        ppl, count = llama_oracle.perplexity_of_logits([first_window], logits)
        assert count == row["predictions"] == 511
        assert row["perplexity"] == pytest.approx(ppl, rel=1e-6), row


def test_sizes_are_the_files_and_llama_cpps_bits_per_weight(swept):
    import llama_cpp

    result, files, _, _ = swept
    for row in result["rows"]:
        path = file_of(files, row)
        assert row["file_bytes"] == path.stat().st_size
        llm = llama_oracle.load(path, n_ctx=64)
        size, params = llama_cpp.llama_model_size(llm.model), llama_cpp.llama_model_n_params(llm.model)
        del llm
        assert (row["tensor_bytes"], row["parameters"]) == (size, params)
        assert row["bits_per_weight"] == pytest.approx(8 * size / params, rel=1e-12)
    by_key = rows_by_key(result)
    assert by_key[("f16", "none")]["bits_per_weight"] == pytest.approx(16.0, abs=0.01)  # norms in F32 add a little


def test_stored_types_are_what_each_handling_asks_for(swept):
    """gguf-py reads the types: keep puts the super-weight tensors (layers 2 and 11) in Q8_0; the control
    puts the same bytes on layers 3 and 12 and leaves 2 and 11 in Q2_K; none has every ffn_down in Q2_K.
    (Through fixtures/gguf_compare.read_contents, held to gguf-py's GGUFReader by test_gguf_converter.py,
    without GGUFReader's seconds of decoding SmolLM2's vocabulary in each file.)"""
    from fixtures.gguf_compare import read_contents

    result, files, _, _ = swept
    by_key = rows_by_key(result)

    def down_types(handling):
        contents = read_contents(file_of(files, by_key[("q2_k", handling)]))
        return {name: kind for name, (_, kind, _) in contents.tensors.items() if name.endswith("ffn_down.weight")}

    none, keep, control = down_types("none"), down_types("keep:q8_0"), down_types("control:q8_0")
    assert set(none.values()) == {"Q2_K"}
    assert {n for n, t in keep.items() if t == "Q8_0"} == {"blk.2.ffn_down.weight", "blk.11.ffn_down.weight"}
    assert {n for n, t in control.items() if t == "Q8_0"} == {"blk.3.ffn_down.weight", "blk.12.ffn_down.weight"}
    assert by_key[("q2_k", "keep:q8_0")]["file_bytes"] == by_key[("q2_k", "control:q8_0")]["file_bytes"]
    assert by_key[("q2_k", "keep:q8_0")]["super_weight_tensors"] == {"blk.11.ffn_down.weight": "Q8_0",
                                                                       "blk.2.ffn_down.weight": "Q8_0"}


def test_files_are_what_swtool_export_writes(swept, smollm2, tmp_path):
    """The sweep writes with `swtool export`: the same options give the same bytes."""
    _, files, _, _ = swept
    out = tmp_path / "keep.gguf"
    result = swtool_in_process("export", smollm2, "-o", out, "--type", "q2_k", "--catalog",
                               files / "smollm2.catalog.json", "--keep-type", "q8_0", "--importance", "none",
                               "--no-progress")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == (files / "smollm2-q2_k-keep-q8_0.gguf").read_bytes()


def test_source_perplexity_is_transformers_and_f16_scores_as_the_source(swept, smollm2_prose_logits):
    import torch

    result, _, _, _ = swept
    first_window, float32_logits = smollm2_prose_logits  # transformers' float32 forward of the first window
    logits = torch.from_numpy(float32_logits).double()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(first_window[1:])).item()
    assert result["source"]["perplexity"] == pytest.approx(np.exp(nll), rel=1e-6)  # measured gap 8.8e-8
    assert result["source"]["predictions"] == 511
    f16 = rows_by_key(result)[("f16", "none")]["perplexity"]
    # llama.cpp on the f16 file against swtool on the bf16 source: measured gap 1.8e-6
    assert f16 == pytest.approx(result["source"]["perplexity"], rel=2e-5)


def test_keeping_the_super_weights_helps_at_2_bits_and_the_control_does_not(swept):
    """The paper's direction, where SmolLM2's numbers support it: at q2_k, keeping the two super-weight
    tensors in Q8_0 cuts perplexity by more than a third; the same bytes on two other ffn_down tensors
    do not come close. (At q3_k and above SmolLM2 shows no consistent effect; docs/gguf.md, sweep.)"""
    by_key = rows_by_key(swept[0])
    none = by_key[("q2_k", "none")]["perplexity"]
    keep = by_key[("q2_k", "keep:q8_0")]["perplexity"]
    control = by_key[("q2_k", "control:q8_0")]["perplexity"]
    assert keep < 0.65 * none, (keep, none)
    assert control > 0.9 * none, (control, none)


def test_temporary_files_are_removed(smollm2, prose, tmp_path, monkeypatch):
    """Without --out-dir the files go to a temporary directory that is gone at the end."""
    # in process, tmp_path the directory Python's tempfile hands out (what TMPDIR sets in a real process; the
    # signal tests below run sweep as one); one window of 64 tokens: the same files are written
    # and removed, only fewer predictions scored (63 = the window's tokens but the last)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = swtool_in_process("sweep", smollm2, "--text", prose, "--types", "q8_0", "--handlings", "none",
                               "--ctx", 64, "--windows", 1, "--no-progress", "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["rows"]
    assert row["type"] == "q8_0" and row["predictions"] == 63
    assert list(tmp_path.iterdir()) == []


def default_sigint():
    """In the child: SIGINT acted on as in a terminal, even when the tests run in a background job (which
    starts its processes with SIGINT ignored, so Python would never see the Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum, name", [(signal.SIGINT, "interrupted (SIGINT)"),
                                          (signal.SIGTERM, "terminated (SIGTERM)")])
def test_a_signal_removes_the_temporary_files(smollm2, prose, tmp_path, signum, name):
    """Ctrl-C or SIGTERM once a GGUF is on disk: exit 128 + signal, one line, and nothing left in the
    temporary directory."""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    # a window of 64 tokens: the source's pass before the first export is short, and the signal still comes
    # once a GGUF is on disk
    process = subprocess.Popen([sys.executable, "-m", "swtool", "sweep", str(smollm2), "--text", str(prose),
                                "--types", "q8_0,q4_0", "--handlings", "none", "--ctx", "64", "--windows", "1", "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=default_sigint)
    try:
        deadline = time.time() + 300
        while not any(p.suffix == ".gguf" or ".gguf" in p.name for p in tmp_path.glob("swtool-sweep-*/*")):
            assert process.poll() is None, process.communicate()
            assert time.time() < deadline, "no GGUF appeared"
            time.sleep(0.05)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, stderr
    assert stderr.strip().splitlines()[-1].startswith(f"error: {name}")
    assert list(tmp_path.iterdir()) == []


def test_bad_input_is_one_line(smollm2, prose, tmp_path):
    cases = [
        (("--types", "q4_0,q9_k"), "--type 'q9_k': expected one of"),
        (("--types", "q4_0,q4_0"), "a type is listed twice"),
        (("--types", ","), "give at least one type"),
        (("--handlings", "none,protect"), "expected none, keep[:TYPE], isolate or control[:TYPE]"),
        (("--handlings", "keep:q4_0"), "the type after keep: is one of"),
        (("--handlings", "none:f16"), "none takes no type"),
        (("--windows", "0"), "Invalid value for '--windows'"),
        (("--windows", "9"), "--windows 9:"),
        (("--ctx", "1"), "--ctx must be at least 2"),
        (("--catalog", tmp_path / "none.json"), "no such file"),
    ]
    for args, message in cases:
        line = one_line_error(swtool_in_process("sweep", smollm2, "--text", prose, "--no-progress", *args))
        assert message in line, (args, line)
    assert "no such file" in one_line_error(swtool_in_process("sweep", smollm2, "--text", tmp_path / "none.txt"))
    assert list(tmp_path.iterdir()) == []


def test_without_llama_cpp_python_it_fails_at_once_naming_the_extra(smollm2, prose, tmp_path):
    """llama-cpp-python is an optional extra: hidden from the import system here."""
    result = swtool_without("llama_cpp", "sweep", smollm2, "--text", prose, "--out-dir", tmp_path / "out")
    assert "pip install 'swtool[llama]'" in one_line_error(result)
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_fails_at_once(smollm2, prose, tmp_path):
    """matplotlib is an optional extra: hidden from the import system here, whether installed or not."""
    result = swtool_without("matplotlib", "sweep", smollm2, "--text", prose, "--plot", tmp_path / "p.png")
    assert "pip install 'swtool[plot]'" in one_line_error(result)
    assert "name the file .png, .svg or .pdf" in one_line_error(
        swtool_in_process("sweep", smollm2, "--text", prose, "--plot", tmp_path / "p.gif"))
    assert list(tmp_path.iterdir()) == []


def test_control_layers_are_the_next_free_ffn_down():
    def at(*layers):
        return [ProtectedWeight(Coordinate(layer, 0, 0), 1.0, f"blk.{layer}.ffn_down.weight") for layer in layers]

    assert control_layers(at(2, 2, 11, 11), 30) == [3, 12]  # SmolLM2
    assert control_layers(at(2, 3), 30) == [4, 5]  # never a tensor that holds a super weight, never twice
    assert control_layers(at(29), 30) == [28]  # the last layer: the one before


def test_importance_handlings_parse_alone_and_with_keep():
    from swtool.errors import SwtoolError
    from swtool.sweep import Handling, parse_handlings, same_as_none

    parsed = parse_handlings("none,importance:scan,keep+importance:random,isolate+importance:text,"
                             "importance:random:256,control:f16+importance:self:64")
    assert parsed == [Handling("none"), Handling("none", None, "scan"), Handling("keep", "q8_0", "random"),
                      Handling("isolate", None, "text"), Handling("none", None, "random:256"),
                      Handling("control", "f16", "self:64")]
    assert [h.label for h in parsed] == ["none", "importance:scan", "keep:q8_0+importance:random",
                                         "isolate+importance:text", "importance:random:256",
                                         "control:f16+importance:self:64"]
    # an importance changes nothing in Q8_0 and the float types (their quantizers do not read it)
    assert same_as_none("q8_0", parsed[1]) and same_as_none("f16", parsed[1]) and not same_as_none("q4_0", parsed[1])
    for bad, message in [("importance:all", "expected importance:scan"), ("keep+isolate", "one handling"),
                         ("importance:random:0", "at least 1"), ("importance:self:x", "at least 1"),
                         ("importance:random:", "at least 1"), ("importance:scan:5", "expected importance:scan"),
                         ("importance:scan+importance:text", "one handling"), ("keep+", "one handling")]:
        with pytest.raises(SwtoolError, match=message):
            parse_handlings(bad)


def test_importance_handlings_in_llama_cpp(smollm2, prose, tmp_path):
    """importance:scan (collected in the sweep's own scan) lowers q4_0's KL divergence from the source
    against none on the same window; keep+importance:random:256 is the file `swtool export --importance
    random:256` writes; each importance is listed once with its digest."""
    out = tmp_path / "files"
    # one window of 256 tokens: importance:scan's mean KLD over none's measured 0.621 there, 0.622 on 512 (and 0.62
    # on prose.txt's two windows, docs/gguf.md), so the bound below does not depend on the window's length
    result = swtool_in_process("sweep", smollm2, "--text", prose, "--types", "q4_0", "--handlings",
                               "none,importance:scan,keep+importance:random:256", "--ctx", 256, "--windows", 1,
                               "--out-dir", out, "--json", "--no-progress")
    assert result.returncode == 0, result.stderr
    swept = json.loads(result.stdout)
    rows = rows_by_key(swept)
    assert list(rows) == [("q4_0", "none"), ("q4_0", "importance:scan"), ("q4_0", "keep:q8_0+importance:random:256")]
    assert rows["q4_0", "importance:scan"]["kld"]["mean"] < 0.8 * rows["q4_0", "none"]["kld"]["mean"]
    assert set(swept["importances"]) == {"scan", "random:256"}
    assert swept["importances"]["random:256"]["tokens"] == 256
    assert swept["importances"]["scan"]["description"].startswith("the scan's prompt")
    exported = tmp_path / "random.gguf"
    # in process: the same command (test_cli.py runs `swtool export` as a real process)
    result = swtool_in_process("export", smollm2, "-o", exported, "--type", "q4_0", "--catalog",
                               out / "smollm2.catalog.json", "--importance", "random:256", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert exported.read_bytes() == file_of(out, rows["q4_0", "keep:q8_0+importance:random:256"]).read_bytes()

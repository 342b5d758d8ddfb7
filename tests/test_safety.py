"""Never damage a checkpoint: bad inputs give one line and exit 2, outputs are atomic, sources stay untouched.

- every crafted bad file of fixtures/bad_files.py, through the CLI;
- processes killed (SIGTERM, SIGINT) while writing: no partial output under its final name,
  no temporary left, the source's sha256 unchanged, an interrupted --in-place undone by --restore;
- a full disk (RLIMIT_FSIZE) and a free-space check that fails: a clean error, nothing written;
- --force, --debug, and the sha256 of every source file after every command.
"""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import bad_files
from fixtures.cli_run import file_size_limit, first_line, hashes, invoke, one_error_line, swtool, swtool_in_process


@pytest.fixture(scope="session")
def corpus(good, tmp_path_factory):
    return bad_files.build_corpus(tmp_path_factory.mktemp("bad"), good)


# --- the corpus of bad files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [builder.__name__ for builder in bad_files.BUILDERS])
def test_each_bad_input_gives_its_one_line_error_and_touches_nothing(group, corpus):
    cases = [case for case in corpus if case.group == group]
    assert cases
    for case in cases:
        before = hashes(*case.touched)
        code, stdout, stderr = invoke(case.argv)
        if case.code == 2:
            line = one_error_line(code, stdout, stderr)
            assert case.expect in line, (case.name, line)
            # the message starts with the file at fault (or the model / catalog argument)
            named = line[len("error: "):].split(": ", 1)[0]
            assert Path(named).exists() or named in case.argv, (case.name, line)
        else:  # NaN / Inf weights: reported on stderr, the scan completes
            assert code == case.code, (case.name, stderr)
            assert case.expect in stderr, (case.name, stderr)
        assert hashes(*case.touched) == before, case.name


def test_the_gguf_serializer_reproduces_gguf_py_byte_for_byte(good):
    """The corpus damages GGUF files through GGUFLayout: unchanged, it must write what gguf-py wrote."""
    assert bad_files.read_layout(good.gguf).to_bytes() == good.gguf.read_bytes()


def test_bad_input_in_a_real_process_is_one_line_no_traceback(corpus):
    by_name = {case.name: case for case in corpus}
    for name in ("st-header-deep", "gguf-nested-array", "cfg-layers-huge"):
        case = by_name[name]
        result = swtool(*case.argv)
        line = one_error_line(result.returncode, result.stdout, result.stderr)
        assert case.expect in line
        assert "Traceback" not in result.stderr


def test_debug_prints_the_traceback_before_the_line(corpus):
    """In process (test_cli.py runs --debug in a real one): the traceback, then the one line, on stderr."""
    case = next(case for case in corpus if case.name == "gguf-nested-array")
    result = swtool_in_process("--debug", *case.argv)
    assert result.returncode == 2
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "CheckpointError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and case.expect in result.stderr


# --- interrupted writes -------------------------------------------------------------------------------------------

# Runs the CLI with swtool.ablate.write_bytes_at announcing itself and then blocking: the parent
# signals the process while its output exists only half-built under a temporary name.
PAUSED = r"""
import signal, sys, time
import swtool.ablate as ablate

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started in the background
write = ablate.write_bytes_at

def write_then_wait(path, edits):
    write(path, edits)
    print("WRITING", path, flush=True)
    time.sleep(120)

ablate.write_bytes_at = write_then_wait
from swtool.cli import main
sys.argv[0] = "swtool"
main()
"""


def run_until_writing(args, cwd=None):
    process = subprocess.Popen([sys.executable, "-c", PAUSED, *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=cwd)
    line = first_line(process)
    assert line.startswith("WRITING"), (line, process.stderr.read() if process.poll() is not None else "")
    return process, Path(line.split(" ", 1)[1].strip())


@pytest.fixture
def model_copy(good, tmp_path):
    shutil.copytree(good.model, tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("signum, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT"),
                                                 (signal.SIGHUP, 129, "SIGHUP")])
def test_killed_ablate_leaves_no_partial_output(signum, code, name, good, model_copy, tmp_path):
    before = hashes(model_copy, good.catalog)
    out = tmp_path / "out" / "ablated"
    out.parent.mkdir()
    process, writing = run_until_writing(["ablate", model_copy, "--catalog", good.catalog, "-o", out, "--copy"])
    assert writing.parent.name.startswith(".ablated.") and writing.is_file()  # half-built, under a temporary name
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code
    lines = stderr.strip().splitlines()
    assert lines == [f"error: {'interrupted' if name == 'SIGINT' else 'terminated'} ({name}); "
                     f"outputs in progress were removed"], stderr
    assert list(out.parent.iterdir()) == []  # neither ablated/ nor its .ablated.*.tmp
    assert hashes(model_copy, good.catalog) == before


def test_killed_in_place_ablation_leaves_the_shard_and_restore_cleans_up(good, model_copy):
    before = hashes(model_copy)
    process, writing = run_until_writing(["ablate", model_copy, "--catalog", good.catalog, "--in-place"])
    assert writing.parent == model_copy and writing.name.startswith(".model.safetensors.")
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 143
    assert sorted(p.name for p in model_copy.iterdir()) == sorted(
        [p.name for p in good.model.iterdir()] + ["swtool-ablation-journal.json"])  # journal written first; no temporary
    assert {p: h for p, h in hashes(model_copy).items() if p.name != "swtool-ablation-journal.json"} == before
    code, stdout, stderr = invoke(["ablate", model_copy, "--restore"])
    assert code == 0, stderr
    assert hashes(model_copy) == before


# --- full disks and free space ----------------------------------------------------------------------------------

def test_full_disk_while_copying_is_a_clean_error(good, model_copy, tmp_path):
    """RLIMIT_FSIZE below the shard's size: write() fails with EFBIG half-way through the copy."""
    before = hashes(model_copy)
    out = tmp_path / "out" / "ablated"
    out.parent.mkdir()
    limit = (model_copy / "model.safetensors").stat().st_size // 2
    result = swtool("ablate", model_copy, "--catalog", good.catalog, "-o", out, "--copy",
                    preexec_fn=file_size_limit(limit))
    line = one_error_line(result.returncode, result.stdout, result.stderr)
    assert line == (f"error: {out}: writing failed: File too large; the disk is full or a file-size limit was hit. "
                    f"The partial output was removed, nothing was written")
    assert list(out.parent.iterdir()) == []
    assert hashes(model_copy) == before


def test_full_disk_while_writing_a_catalog_is_a_clean_error(good, tmp_path):
    out = tmp_path / "catalog.json"
    result = swtool("scan", good.model, "-o", out, "--no-progress", preexec_fn=file_size_limit(1000))
    line = one_error_line(result.returncode, result.stdout, result.stderr)
    assert line.startswith(f"error: {out}: writing failed: File too large;")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_an_in_place_ablation_leaves_the_shard(good, model_copy):
    before = hashes(model_copy)
    limit = (model_copy / "model.safetensors").stat().st_size // 2
    result = swtool("ablate", model_copy, "--catalog", good.catalog, "--in-place", preexec_fn=file_size_limit(limit))
    line = one_error_line(result.returncode, result.stdout, result.stderr)
    assert line.startswith(f"error: {model_copy / 'model.safetensors'}: writing failed: File too large;")
    assert {p: h for p, h in hashes(model_copy).items() if p.name != "swtool-ablation-journal.json"} == before
    assert invoke(["ablate", model_copy, "--restore"])[0] == 0
    assert hashes(model_copy) == before


def test_too_little_free_space_is_refused_before_writing(good, model_copy, tmp_path, monkeypatch):
    import swtool.atomic

    real = shutil.disk_usage
    monkeypatch.setattr(swtool.atomic.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=100_000))
    out = tmp_path / "ablated"
    line = one_error_line(*invoke(["ablate", model_copy, "--catalog", good.catalog, "-o", out, "--copy"]))
    size = sum(p.stat().st_size for p in model_copy.iterdir())
    assert line == (f"error: {out}: needs {swtool.atomic.human_bytes(size)}, but only 100.0 KB is free in "
                    f"{tmp_path}; nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- --force ---------------------------------------------------------------------------------------------------------

def test_force_replaces_an_output_and_only_with_force(good, tmp_path):
    out = tmp_path / "catalog.json"
    out.write_text("old\n")
    one_error_line(*invoke(["scan", good.model, "-o", out, "--no-progress"]))
    assert out.read_text() == "old\n"
    code, _, stderr = invoke(["scan", good.model, "-o", out, "--no-progress", "--force"])
    assert code == 0, stderr
    assert json.loads(out.read_text())["schema"] == "swtool.catalog/2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.json"]


def test_ablate_force_replaces_an_earlier_ablation(good, model_copy, tmp_path):
    out = tmp_path / "ablated"
    assert invoke(["ablate", model_copy, "--catalog", good.catalog, "-o", out])[0] == 0
    (out / "stale.txt").write_text("from the first run\n")
    assert "already exists" in one_error_line(*invoke(["ablate", model_copy, "--catalog", good.catalog, "-o", out]))
    code, _, stderr = invoke(["ablate", model_copy, "--catalog", good.catalog, "-o", out, "--scale", "0.5", "--force"])
    assert code == 0, stderr
    assert not (out / "stale.txt").exists()
    record = json.loads((out / "swtool-ablation.json").read_text())
    assert record["ablation"]["scale"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ablated", "model"]  # the old one is gone, no leftovers


def test_ablate_force_never_replaces_the_model_itself(good, model_copy):
    (model_copy / "swtool-ablation.json").write_text("{}")  # looks like an ablate output
    line = one_error_line(*invoke(["ablate", model_copy, "--catalog", good.catalog, "-o", model_copy, "--force"]))
    assert "holds the input model" in line


# --- sources are only read --------------------------------------------------------------------------------------------

def test_no_command_writes_its_sources(good, model_copy, tmp_path, write_opens):
    gguf = tmp_path / "model.gguf"
    shutil.copy(good.gguf, gguf)
    catalog = tmp_path / "catalog.json"
    shutil.copy(good.catalog, catalog)
    text = tmp_path / "text.txt"
    shutil.copy(good.text, text)
    sources = [model_copy, gguf, catalog, text]
    before = hashes(*sources)
    out = tmp_path / "out"
    out.mkdir()
    write_opens.clear()  # the copies above; from here on, only the commands
    commands = [
        ["scan", model_copy, "-o", out / "scan.json", "--no-progress", "--check-finite"],
        ["scan", gguf, "--json", "--no-progress"],
        ["eval", model_copy, "--text", text, "--catalog", catalog, "--ctx", "32", "--no-progress"],
        ["audit", model_copy, "--catalog", catalog],
        ["audit", gguf, "--catalog", catalog],
        ["inspect", model_copy],
        ["inspect", gguf, "--json"],
        ["ablate", model_copy, "--catalog", catalog, "-o", out / "ablated"],
        ["ablate", model_copy, "--catalog", catalog, "-o", out / "copied", "--copy", "--scale", "2"],
        ["catalog", "known"],
    ]
    for argv in commands:
        code, _, stderr = invoke(argv)
        assert code in (0, 1), (argv, stderr)  # audit exits 1 when a weight is damaged; here all are intact
        assert hashes(*sources) == before, argv
    written = set(write_opens)
    assert not {p for p in written if any(p == s or p.is_relative_to(s) for s in sources)}
    assert any(p.is_relative_to(out) for p in written)  # the audit did see the outputs being written


def test_in_place_is_the_one_command_that_changes_the_source_and_restore_undoes_it(good, model_copy):
    before = hashes(model_copy)
    code, _, stderr = invoke(["ablate", model_copy, "--catalog", good.catalog, "--in-place"])
    assert code == 0, stderr
    changed = hashes(model_copy)
    assert changed[model_copy / "model.safetensors"] != before[model_copy / "model.safetensors"]
    journal = json.loads((model_copy / "swtool-ablation-journal.json").read_text())
    (change,) = journal["changes"]
    with open(model_copy / "model.safetensors", "rb") as f:  # the journal holds the bytes that were there
        f.seek(change["offset"])
        assert f.read(2).hex() == change["new_bytes"]
    assert invoke(["ablate", model_copy, "--restore"])[0] == 0
    assert hashes(model_copy) == before



@pytest.mark.parametrize("shard", ["*", "*.safetensors", "../model.safetensors", "sub/model.safetensors",
                                   "model-0000[1-2].safetensors", "pytorch_model.bin"])
def test_a_downloaded_index_cannot_widen_what_is_fetched(shard, tmp_path, monkeypatch):
    """The shard names of a downloaded index become download patterns: a hostile one is refused, nothing more
    is fetched. snapshot_download is replaced by a recorder; nothing reaches the network."""
    import huggingface_hub
    from huggingface_hub import constants

    from swtool.checkpoint import hub
    from swtool.errors import SwtoolError

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    fetched = []

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, **kwargs):
        fetched.append(list(allow_patterns))
        (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(SwtoolError, match="is not a plain .safetensors file name"):
        hub.resolve("acme/hostile", download=True, cache=tmp_path)
    assert fetched == [hub.SMALL_FILES]  # the small files only; no weights


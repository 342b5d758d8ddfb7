"""Hugging Face ids resolved through a local hub cache, offline.

The tests build the cache themselves, laid out as huggingface_hub lays it out:
    <cache>/models--org--name/refs/<branch or tag>      the commit hash, no newline
    <cache>/models--org--name/snapshots/<commit>/<file>  relative symlink into blobs/
    <cache>/models--org--name/blobs/<hash>              the file's bytes
and point HF_HUB_CACHE at it with HF_HUB_OFFLINE=1. No network is used.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from swtool.checkpoint import hub
from swtool.errors import SwtoolError
from fixtures.tiny import Plant

PLANT = (Plant(1, 41, 101),)
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def add_snapshot(cache, repo_id, commit, files, refs=("main",)):
    """Put `files` ({repo path: source Path}) in the cache as revision `commit`, named by `refs`."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for repo_path, source in files.items():
        data = Path(source).read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / repo_path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return storage / "snapshots" / commit


def swtool(*args, cache):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HOME", None)
    return subprocess.run([sys.executable, "-m", "swtool", *map(str, args)], capture_output=True, text=True, env=env)


@pytest.fixture
def swtool_here(monkeypatch):
    """swtool_here(*args, cache): `swtool ARGS` in this process (fixtures/cli_run.py), with the environment
    `swtool` gives the child and huggingface_hub's constants, which it read from the environment at import,
    as that child would read them. One scan of an id, the refused download and the GGUF repository's
    inspect run real processes (swtool), so the environment variables themselves stay tested."""
    from huggingface_hub import constants

    from fixtures.cli_run import swtool_in_process

    def run(*args, cache):
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.delenv("HF_HOME", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        return swtool_in_process(*args)

    return run


def one_line_error(result):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def planted(tiny_factory):
    directory, _ = tiny_factory("llama", "bfloat16", plants=PLANT)
    return directory


@pytest.fixture
def cache(planted, tmp_path):
    cache = tmp_path / "hub"
    files = {p.name: p for p in planted.iterdir() if p.is_file()}
    add_snapshot(cache, "acme/tiny", COMMIT, files, refs=("main", "v1"))
    return cache


def found(result):
    assert result.returncode == 0, result.stderr
    return [(sw["layer"], sw["row"], sw["col"]) for sw in json.loads(result.stdout)["super_weights"]]


def test_scan_of_an_id_reads_the_cached_snapshot(swtool_here, cache, planted):
    """The plain id in a real process (HF_HUB_CACHE read from its environment), the other spellings here."""
    direct = found(swtool_here("scan", planted, "--json", "--no-progress", cache=cache))
    assert direct == [(1, 41, 101)]
    for spec, run in (("acme/tiny", swtool), ("acme/tiny@main", swtool_here), ("acme/tiny@v1", swtool_here),
                      (f"acme/tiny@{COMMIT}", swtool_here)):
        result = run("scan", spec, "--json", "--no-progress", cache=cache)
        assert found(result) == direct, spec
        assert json.loads(result.stdout)["model"]["path"] == spec


def test_revisions_pick_their_snapshot(swtool_here, cache, planted, tiny_factory):
    other, _ = tiny_factory("llama", "bfloat16", plants=(Plant(2, 13, 77),))
    add_snapshot(cache, "acme/tiny", OTHER_COMMIT, {p.name: p for p in other.iterdir() if p.is_file()}, refs=("v2",))
    assert found(swtool_here("scan", "acme/tiny@v2", "--json", "--no-progress", cache=cache)) == [(2, 13, 77)]
    assert found(swtool_here("scan", "acme/tiny", "--json", "--no-progress", cache=cache)) == [(1, 41, 101)]


def test_nothing_cached_names_the_path_searched(swtool_here, cache):
    line = one_line_error(swtool_here("scan", "acme/absent", "--no-progress", cache=cache))
    assert f"searched {cache / 'models--acme--absent'}" in line and "--download" in line
    line = one_line_error(swtool_here("scan", "acme/tiny@nope", "--no-progress", cache=cache))
    assert "at revision 'nope'" in line and str(cache / "models--acme--tiny") in line


def test_download_is_refused_offline(cache):
    line = one_line_error(swtool("scan", "acme/absent", "--download", "--no-progress", cache=cache))
    assert "HF_HUB_OFFLINE" in line


def test_a_partial_snapshot_is_reported(swtool_here, planted, tmp_path, tiny_factory):
    sharded, _ = tiny_factory("llama", "bfloat16", plants=PLANT, max_shard_size="40KB")
    files = {p.name: p for p in sharded.iterdir() if p.is_file()}
    shards = sorted(name for name in files if name.startswith("model-"))
    assert len(shards) > 2
    cache = tmp_path / "hub"
    add_snapshot(cache, "acme/sharded", COMMIT, files)
    assert found(swtool_here("scan", "acme/sharded", "--json", "--no-progress", cache=cache)) == [(1, 41, 101)]
    (cache / "models--acme--sharded" / "snapshots" / COMMIT / shards[1]).unlink()  # an interrupted download
    assert f"missing shard {shards[1]!r}" in one_line_error(swtool_here("scan", "acme/sharded", "--no-progress", cache=cache))


def test_a_local_path_wins_over_an_id(swtool_here, cache, planted, tmp_path, monkeypatch):
    local = tmp_path / "acme" / "tiny"
    local.mkdir(parents=True)
    for p in planted.iterdir():
        (local / p.name).write_bytes(p.read_bytes())
    monkeypatch.chdir(tmp_path)
    result = swtool_here("inspect", "acme/tiny", "--json", cache=tmp_path / "empty-cache")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["directory"] == "acme/tiny"


def test_a_gguf_repository_with_one_file(planted, tmp_path):
    from fixtures.hf_to_gguf import write_gguf

    gguf_file = write_gguf(planted, tmp_path / "tiny.Q8_0.gguf", "q8_0")
    readme = tmp_path / "README.md"
    readme.write_text("a tiny model\n")
    cache = tmp_path / "hub"
    add_snapshot(cache, "acme/tiny-GGUF", COMMIT, {"tiny.Q8_0.gguf": gguf_file, "README.md": readme})
    info = swtool("inspect", "acme/tiny-GGUF", "--json", cache=cache)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["format"] == "gguf"


def test_resolution_api(cache):
    snapshot = hub.resolve("acme/tiny@v1", cache=cache)
    assert snapshot == cache / "models--acme--tiny" / "snapshots" / COMMIT
    assert (snapshot / "config.json").is_symlink()
    assert hub.hub_id_of_path(snapshot / "model.safetensors") == "acme/tiny"
    assert hub.parse_hub_id("acme/tiny@v1") == ("acme/tiny", "v1")
    assert hub.parse_hub_id("acme/tiny") == ("acme/tiny", None)
    for not_an_id in ("/abs/path", "a/b/c", "just-a-name", "./x", "a/b@", "a/b c"):
        assert hub.parse_hub_id(not_an_id) is None, not_an_id
    with pytest.raises(SwtoolError, match="not a local path, and not in the Hugging Face cache"):
        hub.resolve("acme/absent", cache=cache)


def test_download_asks_only_for_the_needed_files(tmp_path, monkeypatch):
    """--download fetches config/tokenizer/index first, then exactly the shards the index lists.

    snapshot_download is replaced by a recorder that serves a repository with more files than a
    pass needs (consolidated.safetensors, *.bin, a .gguf), so nothing reaches the network."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import filter_repo_objects

    repository = ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json",
                  "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                  "consolidated.safetensors", "pytorch_model.bin", "model.Q4_K_M.gguf", "README.md"]
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    fetched = []

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, **kwargs):
        assert not kwargs.get("local_files_only")
        wanted = list(filter_repo_objects(repository, allow_patterns=allow_patterns))
        fetched.append(wanted)
        for name in wanted:
            if name == "model.safetensors.index.json":
                weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
                (snapshot / name).write_text(json.dumps({"weight_map": weight_map}))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub.resolve("acme/big@main", download=True, cache=tmp_path) == snapshot
    assert fetched == [["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"],
                       ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]]
    (snapshot / "model.safetensors.index.json").unlink()
    repository[3:6] = ["model.safetensors"]  # an unsharded repository
    fetched.clear()
    hub.resolve("acme/small", download=True, cache=tmp_path)
    assert fetched[1] == ["model.safetensors"]


# --- one MODEL argument: every command that reads a model takes a Hub id, and --download ---------------

TEXT = "The super weight is one scalar. Zeroing it wrecks the model, the paper says. " * 2


@pytest.fixture
def gguf_cache(planted, cache, tmp_path):
    """`cache` with acme/tiny-GGUF too: a repository whose one weight file is a .gguf (Q8_0) and a README."""
    from fixtures.hf_to_gguf import write_gguf

    gguf_file = write_gguf(planted, tmp_path / "tiny.Q8_0.gguf", "q8_0")
    readme = tmp_path / "README.md"
    readme.write_text("a tiny model\n")
    add_snapshot(cache, "acme/tiny-GGUF", COMMIT, {"tiny.Q8_0.gguf": gguf_file, "README.md": readme})
    return cache


def every_command(model, tmp_path, catalog):
    """{command: argv} of every command that reads a model, MODEL given as `model`."""
    tmp_path.mkdir(exist_ok=True)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    return {
        "scan": ["scan", model, "--json", "--no-progress"],
        "eval": ["eval", model, "--text", text, "--catalog", catalog, "--json", "--no-progress"],
        "quantsim": ["quantsim", model, "--text", text, "--catalog", catalog, "--block-sizes", "32", "--json",
                     "--no-progress"],
        "ablate": ["ablate", model, "--catalog", catalog, "-o", tmp_path / "ablated", "--json"],
        "audit": ["audit", model, "--catalog", catalog, "--json"],
        "inspect": ["inspect", model, "--json"],
        "export": ["export", model, "--catalog", catalog, "--type", "q8_0", "-o", tmp_path / "out.gguf", "--no-progress"],
        "sweep": ["sweep", model, "--text", text, "--types", "q8_0", "--handlings", "none", "--ctx", "16",
                  "--no-progress"],
    }


def test_every_command_reads_a_cached_id(swtool_here, cache, planted, tmp_path):
    """scan, eval, quantsim, ablate, audit and inspect give for acme/tiny what they give for its directory;
    export and sweep reach the cached snapshot's files (the tiny tokenizer has no merges, which export refuses)."""
    catalog = tmp_path / "catalog.json"
    assert swtool_here("scan", planted, "-o", catalog, "--no-progress", cache=cache).returncode == 0
    by_id = every_command("acme/tiny", tmp_path / "id", catalog)
    by_path = every_command(planted, tmp_path / "path", catalog)
    snapshot = cache / "models--acme--tiny" / "snapshots" / COMMIT
    for command in ("scan", "eval", "quantsim", "ablate", "audit", "inspect"):
        got, expected = swtool_here(*by_id[command], cache=cache), swtool_here(*by_path[command], cache=cache)
        assert got.returncode == expected.returncode == 0, (command, got.stderr)
        got, expected = json.loads(got.stdout), json.loads(expected.stdout)
        if command == "scan":
            assert got["super_weights"] == expected["super_weights"]
        elif command in ("eval", "quantsim"):
            assert [got[k] for k in ("tokens", "chunks")] == [expected[k] for k in ("tokens", "chunks")]
            assert json.dumps(got).count("perplexity") == json.dumps(expected).count("perplexity") > 0
            assert got.get("worlds", got.get("weights")) == expected.get("worlds", expected.get("weights"))
        elif command == "ablate":
            assert got["patches"] == expected["patches"]  # the same patch, read from the snapshot's (symlinked) shard
            assert (tmp_path / "id" / "ablated" / "model.safetensors").read_bytes() == \
                (tmp_path / "path" / "ablated" / "model.safetensors").read_bytes()
        elif command == "audit":
            assert [f["status"] for f in got["findings"]] == [f["status"] for f in expected["findings"]] == ["intact"]
        else:
            assert got["tensors"] == expected["tensors"]
    for command in ("export", "sweep"):
        result = swtool_here(*by_id[command], cache=cache)
        if command == "sweep" and "pip install 'swtool[llama]'" in result.stderr:
            continue  # llama-cpp-python is an optional extra
        assert f"{snapshot / 'tokenizer.json'}: a BPE vocabulary without merges" in one_line_error(result), command


def test_export_and_quantize_read_a_cached_gguf_repository(swtool_here, gguf_cache, tmp_path):
    for command in ("export", "quantize"):
        out = tmp_path / f"{command}.gguf"
        result = swtool_here(command, "acme/tiny-GGUF", "--type", "q8_0", "-o", out, "--no-scan", "--no-progress",
                             cache=gguf_cache)  # (--no-scan: this GGUF has no vocabulary to tokenize a prompt)
        assert result.returncode == 0, result.stderr
        assert out.read_bytes()[:4] == b"GGUF"
    assert (tmp_path / "export.gguf").read_bytes() == (tmp_path / "quantize.gguf").read_bytes()


def test_an_id_not_cached_is_one_line_naming_download(swtool_here, cache, planted, tmp_path):
    """Without --download: exit 2, one line naming the cache searched and --download; with it, offline,
    huggingface_hub is asked and refuses (HF_HUB_OFFLINE); quantize, which downloads nothing, says so."""
    catalog = tmp_path / "catalog.json"
    assert swtool_here("scan", planted, "-o", catalog, "--no-progress", cache=cache).returncode == 0
    for command, argv in every_command("acme/absent", tmp_path, catalog).items():
        line = one_line_error(swtool_here(*argv, cache=cache))
        if command == "sweep" and "pip install 'swtool[llama]'" in line:
            continue
        assert "acme/absent: not a local path, and not in the Hugging Face cache" in line, (command, line)
        assert "--download" in line, (command, line)
        line = one_line_error(swtool_here(*argv, "--download", cache=cache))
        assert "acme/absent: --download asked for, but HF_HUB_OFFLINE is set" in line, (command, line)
    line = one_line_error(swtool_here("quantize", "acme/absent", "--type", "q8_0", "-o", tmp_path / "q.gguf", cache=cache))
    assert "quantize does not download" in line and "hf download acme/absent" in line
    assert not list(tmp_path.glob("*.gguf")) and not (tmp_path / "ablated").exists()


def test_in_place_ablation_of_a_cache_entry_is_refused(swtool_here, cache, planted, tmp_path):
    catalog = tmp_path / "catalog.json"
    assert swtool_here("scan", planted, "-o", catalog, "--no-progress", cache=cache).returncode == 0
    snapshot = cache / "models--acme--tiny" / "snapshots" / COMMIT
    before = {p: p.read_bytes() for p in (cache / "models--acme--tiny" / "blobs").iterdir()}
    for model in ("acme/tiny", snapshot):
        line = one_line_error(swtool_here("ablate", model, "--catalog", catalog, "--in-place", cache=cache))
        assert "is in the Hugging Face cache" in line and "--in-place" in line and "-o OUTDIR" in line, line
        line = one_line_error(swtool_here("ablate", model, "--restore", cache=cache))
        assert "is in the Hugging Face cache" in line and "--restore" in line, line
    assert {p: p.read_bytes() for p in (cache / "models--acme--tiny" / "blobs").iterdir()} == before
    assert all(p.is_symlink() for p in snapshot.iterdir())

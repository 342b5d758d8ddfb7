"""An output never replaces a file the command reads, --force or not (issue: a model destroyed by -o).

Each case names, as -o or --plot, one of the input's own files: directly, through a symlinked
directory, or through a hard link. The command must refuse before writing anything, with one
line, and every input file must be byte-identical afterwards (sha256 before and after)."""

import os
import shutil
import subprocess

import pytest

from fixtures.cli_run import digests, one_line_error, swtool_in_process


@pytest.fixture()
def inputs(good, tmp_path):
    """Copies of the good tiny model (single file and sharded), its GGUF, catalog and text."""
    model = shutil.copytree(good.model, tmp_path / "model")
    sharded = shutil.copytree(good.sharded, tmp_path / "sharded")
    shutil.copy(good.gguf, tmp_path / "model.gguf")
    shutil.copy(good.text, tmp_path / "text.txt")
    (tmp_path / "link").symlink_to(model, target_is_directory=True)
    os.link(model / "model.safetensors", tmp_path / "hard-linked.safetensors")
    return tmp_path, model, sharded, tmp_path / "model.gguf", tmp_path / "text.txt"


def test_no_output_replaces_an_input(inputs):
    root, model, sharded, gguf_file, text = inputs
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    cases = [
        ["scan", model, "-o", model / "model.safetensors"],
        ["scan", model, "-o", model / "config.json"],
        ["scan", model, "-o", model / "tokenizer.json"],
        ["scan", sharded, "-o", sharded / "model.safetensors.index.json"],
        ["scan", sharded, "-o", shard],
        ["scan", gguf_file, "-o", gguf_file],
        ["scan", model, "-o", root / "link" / "model.safetensors"],
        ["scan", model, "-o", root / "hard-linked.safetensors"],
        ["scan", model, "--plot", model / "config.json"],
        ["export", model, "-o", model / "model.safetensors", "--type", "f32"],
        ["export", model, "-o", root / "link" / "config.json", "--type", "f32"],
        ["quantize", gguf_file, "-o", gguf_file, "--type", "q8_0"],
        ["export", model, "-o", text, "--type", "q4_0", "--importance", f"text:{text}"],
        ["quantize", gguf_file, "-o", text, "--type", "q4_0", "--importance", f"text:{text}"],
        ["eval", model, "--text", text, "--plot", text],
        ["quantsim", model, "--text", text, "--plot", model / "model.safetensors"],
    ]
    before = digests(root)
    for argv in cases:
        line = one_line_error(swtool_in_process(*argv, "--force", "--no-progress"))
        assert "a file this command reads; it is never replaced, even with --force" in line, (argv, line)
        assert digests(root) == before, argv


def test_one_path_for_two_outputs_is_refused(inputs):
    root, model, *_ = inputs
    out = root / "x.svg"
    line = one_line_error(swtool_in_process("scan", model, "-o", out, "--plot", out, "--no-progress"))
    assert "given for two outputs" in line
    assert not out.exists()


def test_a_catalog_beside_the_model_is_still_an_output(inputs):
    """Writing into the model's folder is fine as long as no file of the model is named."""
    _, model, *_ = inputs
    result = swtool_in_process("scan", model, "-o", model / "catalog.json", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert (model / "catalog.json").is_file()


def test_a_name_taken_meanwhile_is_not_replaced(tmp_path):
    """Two runs writing one new -o: the one finishing second must not replace the other's file.
    check_destination saw no file; another writer creates it before this one renames its output."""
    from swtool.atomic import atomic_path, check_destination
    from swtool.errors import SwtoolError

    out = tmp_path / "catalog.json"
    check_destination(out, force=False)
    out.write_text("the other run's catalog")
    with pytest.raises(SwtoolError, match="was created by another process while this one ran"):
        with atomic_path(out) as tmp:
            tmp.write_text("this run's catalog")
    assert out.read_text() == "the other run's catalog"
    assert [p.name for p in tmp_path.iterdir()] == ["catalog.json"]  # no temporary left
    # asked with --force, the same situation replaces it
    check_destination(out, force=True)
    with atomic_path(out) as tmp:
        tmp.write_text("this run's catalog")
    assert out.read_text() == "this run's catalog"


def test_a_killed_runs_temporary_is_neither_copied_nor_kept(good, tmp_path):
    """SIGKILL cannot be caught: an --in-place run killed mid-copy leaves `.NAME.XXXX.tmp` beside the
    shard. ablate -o does not copy it; --restore removes it with the journal."""
    model = shutil.copytree(good.model, tmp_path / "model")
    leftover = model / ".model.safetensors.k9x2ab7q.tmp"
    leftover.write_bytes(b"half a shard")
    result = swtool_in_process("ablate", model, "--catalog", good.catalog, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "out" / leftover.name).exists()
    assert swtool_in_process("ablate", model, "--catalog", good.catalog, "--in-place").returncode == 0
    leftover.write_bytes(b"half a shard")
    result = swtool_in_process("ablate", model, "--restore")
    assert result.returncode == 0, result.stderr
    assert not leftover.exists()


def test_sweep_out_dir_never_replaces_an_input(good, tmp_path):
    """A file sweep would write into --out-dir that is one of its inputs (here the text, named like an
    export): refused before anything is exported, --force or not."""
    out = tmp_path / "out"
    out.mkdir()
    text = out / "good-model-q8_0-none.gguf"
    shutil.copy(good.text, text)
    before = digests(out)
    line = one_line_error(swtool_in_process("sweep", good.model, "--text", text, "--out-dir", out, "--types", "q8_0",
                                 "--handlings", "none", "--ctx", "32", "--force", "--no-progress"))
    assert "a file this command reads; it is never replaced, even with --force" in line
    assert digests(out) == before


def test_an_output_in_a_read_only_folder_names_the_output(good, tmp_path):
    """The temporary beside the output cannot be made: the one line names the output the user gave.
    Root writes through permissions, so the folder is made read-only by a read-only bind mount."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], check=True)
    else:
        folder.chmod(0o555)
    out = folder / "catalog.json"
    try:
        line = one_line_error(swtool_in_process("scan", good.model, "-o", out, "--no-progress"))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(folder)], check=True)
    assert line.startswith(f"error: {out}: cannot write there (") and ".tmp" not in line, line

"""A FIFO where a regular file is expected: one line and exit 2 within seconds, never a wait.

open() on a FIFO waits for a writer; nobody writes here, so a command that opens one
without O_NONBLOCK would hang until the timeout below fails the test."""

import os
import shutil

import pytest

from fixtures.cli_run import one_line_error, swtool_in_process

TIMEOUT = 60  # seconds; the commands take about one


def fifo_in_place_of(path):
    path.unlink()
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"])
def test_a_fifo_in_the_model(good, tmp_path, name):
    model = shutil.copytree(good.model, tmp_path / "model")
    if not (model / name).exists():
        (model / name).write_text("{}")
    fifo_in_place_of(model / name)
    result = swtool_in_process("scan", model, "--no-progress", timeout=TIMEOUT)
    line = one_line_error(result)
    assert f"{name}: is a FIFO, not a regular file" in line, line


def test_a_fifo_as_gguf_catalog_text_or_index(good, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    gguf_link = tmp_path / "model.gguf"
    os.mkfifo(gguf_link)
    cases = [
        (["scan", gguf_link, "--no-progress"], "model.gguf"),
        (["inspect", gguf_link], "model.gguf"),
        (["audit", good.model, "--catalog", fifo], "fifo"),
        (["ablate", good.model, "--catalog", fifo, "-o", tmp_path / "out"], "fifo"),
        (["eval", good.model, "--text", fifo, "--no-progress"], "fifo"),
    ]
    for argv, named in cases:
        line = one_line_error(swtool_in_process(*argv, timeout=TIMEOUT))
        assert f"{named}: is a FIFO, not a regular file" in line, (argv, line)
    sharded = shutil.copytree(good.sharded, tmp_path / "sharded")
    fifo_in_place_of(sharded / "model.safetensors.index.json")
    line = one_line_error(swtool_in_process("scan", sharded, "--no-progress", timeout=TIMEOUT))
    assert "model.safetensors.index.json: is a FIFO" in line, line


def test_a_device_as_text_or_catalog(good):
    """/dev/zero never ends: read whole, it would fill memory; it is refused before any read."""
    for argv, named in ((["eval", good.model, "--text", "/dev/zero", "--max-tokens", "64"], "/dev/zero"),
                        (["audit", good.model, "--catalog", "/dev/zero"], "/dev/zero")):
        line = one_line_error(swtool_in_process(*argv, "--no-progress", timeout=TIMEOUT))
        assert f"{named}: is a character device, not a regular file" in line, (argv, line)


def test_fifos_named_as_optional_vocabulary_files_are_not_read(good, tmp_path):
    """merges.txt and the chat template files are read only when they are regular files (as gguf-py's
    SpecialVocab reads them): FIFOs of those names beside a model leave an export as it was, never waiting."""
    from fixtures.tiny import add_a_merge

    model = shutil.copytree(good.model, tmp_path / "model")
    add_a_merge(model)  # a vocabulary llama.cpp, and so export, accepts
    plain = tmp_path / "plain.gguf"
    result = swtool_in_process("export", model, "-o", plain, "--type", "f32", "--no-scan", "--no-progress",
                               timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    for name in ("merges.txt", "chat_template.json", "chat_template.jinja"):
        os.mkfifo(model / name)
    out = tmp_path / "with-fifos.gguf"
    result = swtool_in_process("export", model, "-o", out, "--type", "f32", "--no-scan", "--no-progress",
                               timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == plain.read_bytes()

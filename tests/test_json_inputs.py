"""Every JSON swtool reads is plain JSON: NaN, Infinity, 1e400 and integers of thousands of digits
are one-line errors (exit 2), never a traceback and never a value that compares as anything.

Python's json module accepts NaN and Infinity, turns 1e400 into inf, and int() raises ValueError
on more than 4,300 digits: each case is built here by writing such a token into a real file."""

import json
import shutil
import struct

import pytest

from fixtures.cli_run import one_line_error, swtool_in_process

LONG_INT = "1" * 4301


def with_token(path, key_path, token):
    """Rewrite the JSON file at `path` with the value at `key_path` replaced by the raw `token`."""
    data = json.loads(path.read_text())
    target = data
    for key in key_path[:-1]:
        target = target[key]
    target[key_path[-1]] = "@@TOKEN@@"
    path.write_text(json.dumps(data).replace('"@@TOKEN@@"', token))


def header_with_token(path, token):
    """A safetensors file whose header's __metadata__ holds the raw `token` (header length adjusted)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header["__metadata__"] = {"format": "@@TOKEN@@"}
    text = json.dumps(header).replace('"@@TOKEN@@"', token).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


@pytest.mark.parametrize("token", [LONG_INT, "NaN", "Infinity", "-Infinity", "1e400"])
def test_config_and_catalog_values(good, tmp_path, token):
    model = shutil.copytree(good.model, tmp_path / "model")
    with_token(model / "config.json", ["hidden_size"], token)
    line = one_line_error(swtool_in_process("scan", model, "--no-progress"))
    assert "config.json" in line and "not plain JSON" in line, line
    catalog = tmp_path / "catalog.json"
    shutil.copy(good.catalog, catalog)
    with_token(catalog, ["super_weights", 0, "value"], token)
    for command in (["audit", good.model, "--catalog", catalog], ["ablate", good.model, "--catalog", catalog,
                                                                 "-o", tmp_path / "out"]):
        line = one_line_error(swtool_in_process(*command))
        assert "catalog.json" in line and "not plain JSON" in line, (command, line)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("token", [LONG_INT, "NaN", "1e400"])
def test_index_header_and_tokenizer_config(good, tmp_path, token):
    sharded = shutil.copytree(good.sharded, tmp_path / "sharded")
    with_token(sharded / "model.safetensors.index.json", ["metadata", "total_size"], token)
    line = one_line_error(swtool_in_process("scan", sharded, "--no-progress"))
    assert "model.safetensors.index.json" in line and "not plain JSON" in line, line
    model = shutil.copytree(good.model, tmp_path / "model")
    header_with_token(model / "model.safetensors", token)
    line = one_line_error(swtool_in_process("inspect", model))
    assert "model.safetensors" in line and "not plain JSON" in line, line
    model = shutil.copytree(good.model, tmp_path / "model2")
    (model / "tokenizer_config.json").write_text('{"add_bos_token": true, "model_max_length": %s}' % token)
    line = one_line_error(swtool_in_process("scan", model, "--no-progress"))
    assert "tokenizer_config.json" in line and "not plain JSON" in line, line


def test_ablation_journal(good, tmp_path):
    model = shutil.copytree(good.model, tmp_path / "model")
    assert swtool_in_process("ablate", model, "--catalog", good.catalog, "--in-place").returncode == 0
    journal = model / "swtool-ablation-journal.json"
    with_token(journal, ["scale"], "NaN")
    line = one_line_error(swtool_in_process("ablate", model, "--restore"))
    assert "swtool-ablation-journal.json" in line and "not plain JSON" in line, line

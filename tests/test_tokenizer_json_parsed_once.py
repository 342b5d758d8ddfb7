"""export parses tokenizer.json once while the file stays the same (export_vocab.read_tokenizer_json):
the file it writes is the one a fresh parse gives, and a changed tokenizer.json is read again."""

import json
import shutil

from fixtures.cli_run import swtool_in_process
from swtool import export_vocab


def test_an_export_parses_tokenizer_json_once_and_writes_the_same_file(converted, tmp_path, monkeypatch):
    model_dir, _ = converted("llama")
    parses = []
    real_read_json = export_vocab.read_json
    monkeypatch.setattr(export_vocab, "read_json", lambda path, *a, **k: parses.append(path) or real_read_json(path, *a, **k))
    outputs = []
    for run in range(2):
        export_vocab._last_parsed.clear()  # each export from a cold start
        out = tmp_path / f"run{run}.gguf"
        result = swtool_in_process("export", model_dir, "-o", out, "--type", "f32", "--no-scan", "--no-progress")
        assert result.returncode == 0, result.stderr
        outputs.append(out.read_bytes())
    assert [p.name for p in parses].count("tokenizer.json") == 2  # once per export, not before and again after the scan
    again = tmp_path / "warm.gguf"  # the parse kept from the last export serves the next one: the same bytes
    assert swtool_in_process("export", model_dir, "-o", again, "--type", "f32", "--no-scan", "--no-progress").returncode == 0
    assert [p.name for p in parses].count("tokenizer.json") == 2
    assert outputs[0] == outputs[1] == again.read_bytes()


def test_a_changed_tokenizer_json_is_read_again(converted, tmp_path):
    model_dir, _ = converted("llama")
    directory = tmp_path / "copy"
    directory.mkdir()
    shutil.copy(model_dir / "tokenizer.json", directory / "tokenizer.json")
    first = export_vocab.read_tokenizer_json(directory)
    changed = json.loads((directory / "tokenizer.json").read_text())
    changed["model"]["vocab"]["a-new-token"] = 10**6
    (directory / "tokenizer.json").write_text(json.dumps(changed))
    second = export_vocab.read_tokenizer_json(directory)
    assert "a-new-token" not in first["model"]["vocab"] and second == changed
    (directory / "tokenizer.json").unlink()
    shutil.copy(model_dir / "tokenizer.json", directory / "tokenizer.json")  # another file of the same size
    assert export_vocab.read_tokenizer_json(directory) == first

"""`swtool export` never leaves a partial GGUF: killed mid-write (SIGTERM, SIGINT) or out of disk space,
no file remains under the output's name, no temporary is left, and the source's sha256 is unchanged.

Kept apart from test_safety.py because it needs swtool/gguf_export.py (the exporter).
"""

import signal
import subprocess
import sys

import pytest

from fixtures.cli_run import file_size_limit, first_line, hashes, invoke, one_error_line, swtool


# --- swtool export ------------------------------------------------------------------------------------------------

# As PAUSED, for `swtool export`: the tensor bytes of blk.1.ffn_down are produced, then the process waits.
EXPORT_PAUSED = r"""
import signal, sys, time
import swtool.gguf_export as export

signal.signal(signal.SIGINT, signal.default_int_handler)
chunks = export.tensor_chunks

def chunks_then_wait(tensor):
    for chunk in chunks(tensor):
        yield chunk
        if tensor.name == "blk.1.ffn_down.weight":
            print("WRITING", flush=True)
            time.sleep(300)

export.tensor_chunks = chunks_then_wait
from swtool.cli import main
sys.argv[0] = "swtool"
main()
"""


@pytest.mark.real
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_killed_export_leaves_no_partial_gguf(signum, code, smollm2, tmp_path):
    before = hashes(smollm2)
    out = tmp_path / "smollm2-q8_0.gguf"
    process = subprocess.Popen([sys.executable, "-c", EXPORT_PAUSED, "export", str(smollm2), "--type", "q8_0",
                                "-o", str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    line = first_line(process)
    assert line.startswith("WRITING"), (line, process.stderr.read() if process.poll() is not None else "")
    (partial,) = tmp_path.glob(".smollm2-q8_0.gguf.*.tmp")
    assert partial.stat().st_size > 10_000_000  # the header and the first layers are written
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code
    assert stderr.strip().splitlines()[-1].endswith("outputs in progress were removed")
    assert list(tmp_path.iterdir()) == []
    assert hashes(smollm2) == before


@pytest.mark.real
def test_full_disk_during_export_is_a_clean_error(smollm2, tmp_path):
    before = hashes(smollm2)
    out = tmp_path / "smollm2-q8_0.gguf"
    result = swtool("export", smollm2, "--type", "q8_0", "-o", out, "--no-progress",
                    preexec_fn=file_size_limit(20_000_000))
    line = one_error_line(result.returncode, result.stdout, result.stderr)
    assert line.startswith(f"error: {out}: writing failed: short write (") and line.endswith(
        "the disk is full or a file-size limit was hit. The partial output was removed, nothing was written")
    assert list(tmp_path.iterdir()) == []
    assert hashes(smollm2) == before


@pytest.mark.real
def test_export_refuses_when_the_disk_cannot_hold_it(smollm2, tmp_path, monkeypatch):
    import shutil

    from click.testing import CliRunner

    import swtool.atomic
    from swtool.cli import main

    real = shutil.disk_usage
    monkeypatch.setattr(swtool.atomic.shutil, "disk_usage", lambda path: real(path)._replace(free=50_000_000))
    out = tmp_path / "smollm2-f16.gguf"
    result = CliRunner().invoke(main, ["export", str(smollm2), "--type", "f16", "-o", str(out), "--no-progress"])
    line = one_error_line(result.exit_code, result.stdout, result.stderr)
    assert line.startswith(f"error: {out}: needs 2") and line.endswith(
        f"but only 50.0 MB is free in {tmp_path}; nothing was written")  # 135M parameters x 2 bytes
    assert list(tmp_path.iterdir()) == []


@pytest.mark.real
def test_export_and_quantize_only_read_their_sources(smollm2, tmp_path, write_opens):
    before = hashes(smollm2)
    f16 = tmp_path / "smollm2-f16.gguf"
    code, _, stderr = invoke(["export", smollm2, "--type", "f16", "-o", f16, "--no-progress"])
    assert code == 0, stderr
    assert hashes(smollm2) == before
    gguf_before = hashes(f16)
    write_opens.clear()
    code, _, stderr = invoke(["quantize", f16, "--type", "q8_0", "-o", tmp_path / "q8_0.gguf", "--no-progress"])
    assert code == 0, stderr
    assert hashes(f16) == gguf_before
    assert f16 not in write_opens and any(p.parent == tmp_path for p in write_opens)

"""Command-line conventions every command shares (issue 17): counts with the right noun,
audit's --tolerance spelled as a fraction or a percent, one MODEL argument, `-o -` as stdout,
progress bars only on a terminal, --threads."""

import json
import re

import pytest

from fixtures.cli_run import one_line_error, swtool, swtool_in_process
from fixtures.tiny import Plant

PLANT = (Plant(1, 41, 101),)
TEXT = "The super weight is one scalar. Zeroing it wrecks the model, the paper says. "


@pytest.fixture(scope="module")
def tiny(tiny_factory, tmp_path_factory):
    """(model directory, its catalog, a short text): one super weight, one chunk of text at --ctx 512."""
    directory, _ = tiny_factory("llama", "bfloat16", plants=PLANT)
    work = tmp_path_factory.mktemp("conventions")
    catalog = work / "catalog.json"
    assert swtool_in_process("scan", directory, "-o", catalog, "--no-progress").returncode == 0
    text = work / "text.txt"
    text.write_text(TEXT)
    return directory, catalog, text


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


# --- plurals ------------------------------------------------------------------------

def test_plural_helper():
    from swtool.table import plural

    assert [plural(n, "chunk") for n in (0, 1, 2)] == ["0 chunks", "1 chunk", "2 chunks"]
    assert plural(1, "pass", "passes") == "1 pass" and plural(3, "pass", "passes") == "3 passes"
    assert plural(1, "matrix", "matrices") == "1 matrix" and plural(2, "matrix", "matrices") == "2 matrices"


ONE_PLURAL = re.compile(r"(?<![\d.,])1 (chunks|tokens|layers|passes|super weights|files?\(s\)|files|tensors|predictions|"
                        r"windows?\(s\)|windows|keys|metadata keys|worlds|elements?\(s\)|elements|bytes|matrices|"
                        r"candidates|prompts|weights|threads)\b")


def test_a_count_of_one_takes_the_singular(tiny, tmp_path):
    """Runs whose outputs count one chunk, one pass, one super weight, one patched file ...: no '1 chunks'."""
    directory, catalog, text = tiny
    copy = tmp_path / "ablated"
    # in this process (click's runner): the same output text; test_cli.py runs each command as a process
    outputs = {
        "scan": ok(swtool_in_process("scan", directory, "--no-progress")),
        "eval": ok(swtool_in_process("eval", directory, "--text", text, "--catalog", catalog, "--no-progress")),
        "quantsim": ok(swtool_in_process("quantsim", directory, "--text", text, "--catalog", catalog, "--block-sizes",
                                         "32", "--no-progress")),
        "ablate": ok(swtool_in_process("ablate", directory, "--catalog", catalog, "-o", copy)),
        "inspect": ok(swtool_in_process("inspect", copy)),  # its ablation record lists 1 super weight
        "audit": ok(swtool_in_process("audit", directory, "--catalog", catalog)),
    }
    seen = {name: result.stdout + result.stderr for name, result in outputs.items()}
    assert "1 pass over the weights" in seen["scan"] and "with the super weight removed" in seen["scan"]
    assert "in 1 chunk of 512" in seen["eval"] and "in 1 chunk of 512" in seen["quantsim"]
    assert ": 1 file patched" in seen["ablate"]
    assert "(1 super weight, an ablation record)" in seen["inspect"]
    assert "1 super weight from catalog" in seen["audit"]
    for name, output in seen.items():
        assert not ONE_PLURAL.search(output), (name, ONE_PLURAL.search(output), output)


# --- audit --tolerance ----------------------------------------------------------------

def test_tolerance_is_a_fraction_or_a_percent(tiny, tmp_path):
    """0.05 and 5% are the same tolerance; a bare 5 (once silently 500 %) is one line naming 5%."""
    directory, catalog, _ = tiny
    scaled = tmp_path / "scaled"  # the super weight times 0.9: a 10 % change
    ok(swtool_in_process("ablate", directory, "--catalog", catalog, "--scale", "0.9", "-o", scaled))
    (scaled / "swtool-ablation.json").unlink()  # judged against the catalog alone, not as a recorded ablation

    def status(tolerance, code):
        result = swtool_in_process("audit", scaled, "--catalog", catalog, "--json", "--tolerance", tolerance)
        assert result.returncode == code, result.stdout + result.stderr
        report = json.loads(result.stdout)
        return report["tolerance"], report["findings"][0]["status"]

    assert status("0.05", 1) == status("5%", 1) == (0.05, "changed")
    assert status("0.15", 0) == status("15%", 0) == (0.15, "intact")
    assert status("0.5%", 1) == (0.005, "changed")
    line = one_line_error(swtool_in_process("audit", scaled, "--catalog", catalog, "--tolerance", "5"))
    assert "--tolerance 5%" in line
    for bad in ("1", "-0.1", "-5%", "five", "nan"):
        assert "--tolerance" in one_line_error(swtool_in_process("audit", scaled, "--catalog", catalog,
                                                                 "--tolerance", bad)), bad
    table = ok(swtool_in_process("audit", scaled, "--catalog", catalog, "--tolerance", "12.5%")).stdout
    assert "(tolerance 12.5%)" in table


# --- progress bars: on a terminal only ----------------------------------------------------

BAR = re.compile(r"it/s|s/it|\d+%\||\|[█▏▎▍▌▋▊▉ ]*\|")


def test_no_bar_when_stderr_is_not_a_terminal(tiny):
    """Captured (a pipe, as in a CI log or `2> file`), stderr holds no bar for any command that draws one."""
    directory, catalog, text = tiny
    for args in (("scan", directory), ("eval", directory, "--text", text, "--catalog", catalog),
                 ("quantsim", directory, "--text", text, "--catalog", catalog, "--block-sizes", "32"),
                 ("eval", directory, "--text", text, "--catalog", catalog, "--control-top", "3")):
        result = ok(swtool(*args))
        assert not BAR.search(result.stderr) and "pass 1" not in result.stderr, (args, result.stderr)


def run_with_terminal_stderr(*args, timeout=300):
    """`python -m swtool ARGS` with stderr on a pseudo-terminal and stdout on a pipe: (code, stdout, terminal)."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import sys
    import termios
    import time

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    process = subprocess.Popen([sys.executable, "-m", "swtool", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    seen, out, deadline = b"", b"", time.monotonic() + timeout
    streams = {leader: "tty", process.stdout.fileno(): "out"}
    try:
        while streams:
            ready, _, _ = select.select(list(streams), [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                process.kill()
                pytest.fail(f"swtool {args}: still running after {timeout} s")
            for fd in ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # the terminal's other end closed (EIO on Linux)
                    chunk = b""
                if not chunk:
                    del streams[fd]
                elif streams[fd] == "tty":
                    seen += chunk
                else:
                    out += chunk
        return process.wait(timeout=60), out.decode(), seen.decode(errors="replace")
    finally:
        os.close(leader)
        process.stdout.close()


def test_a_bar_is_drawn_on_a_terminal_and_not_with_no_progress(tiny):
    directory, _, _ = tiny
    code, stdout, terminal = run_with_terminal_stderr("scan", directory, "--json")
    assert code == 0, terminal
    assert "scan pass 1" in terminal and BAR.search(terminal), terminal
    assert json.loads(stdout)["super_weights"][0]["layer"] == 1  # the bar never reaches stdout
    code, stdout, terminal = run_with_terminal_stderr("scan", directory, "--json", "--no-progress")
    assert code == 0 and "scan pass" not in terminal and not BAR.search(terminal), terminal


# --- -o - is stdout -------------------------------------------------------------------------

def binary_run(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "swtool", *map(str, args)], capture_output=True)


def test_dash_output_is_stdout(tiny, tmp_path, monkeypatch):
    """scan's catalog, export's/quantize's GGUF and imatrix's file: with -o -, stdout holds exactly the bytes -o FILE
    writes, and nothing else (the table, the report and bars go to stderr); no file named '-' appears."""
    from fixtures.bad_files import byte_vocabulary
    from fixtures.hf_to_gguf import write_gguf
    from fixtures.tiny import TINY

    directory, catalog, _ = tiny
    monkeypatch.chdir(tmp_path)
    piped = binary_run("scan", directory, "-o", "-")
    assert piped.returncode == 0, piped.stderr
    # the -o FILE references run in this process; the -o - runs are real processes (their stdout is the point)
    ok(swtool_in_process("scan", directory, "-o", tmp_path / "catalog.json", "--no-progress"))
    assert piped.stdout == (tmp_path / "catalog.json").read_bytes()
    assert b"layer  row  col" in piped.stderr  # the table, on stderr
    source = write_gguf(directory, tmp_path / "tiny.gguf", "f32", vocabulary=byte_vocabulary(directory, TINY["vocab_size"]))
    for command in ("export", "quantize"):
        piped = binary_run(command, source, "--type", "q8_0", "--catalog", catalog, "-o", "-")
        assert piped.returncode == 0, piped.stderr
        ok(swtool_in_process(command, source, "--type", "q8_0", "--catalog", catalog, "-o", tmp_path / f"{command}.gguf",
                             "--no-progress"))
        assert piped.stdout == (tmp_path / f"{command}.gguf").read_bytes() and piped.stdout[:4] == b"GGUF"
        assert piped.stderr.decode().startswith("wrote -: llama, --type q8_0")
        # the report names the output `-`, not the temporary file stdout was copied from
        piped = binary_run(command, source, "--type", "q8_0", "--catalog", catalog, "-o", "-", "--json")
        assert piped.returncode == 0 and piped.stdout[:4] == b"GGUF", piped.stderr
        report = json.loads(piped.stderr)
        assert report["output"] == "-" and report["file_bytes"] == len(piped.stdout)
        assert "stdout.gguf" not in piped.stderr.decode()
        piped = binary_run(command, source, "--type", "q8_0", "--no-scan", "--dry-run", "-o", "-")
        assert piped.returncode == 0 and piped.stdout == b"", piped.stderr
        assert piped.stderr.decode().startswith("would write (dry run, nothing written) -: llama")
    assert not (tmp_path / "-").exists()
    for name in ("imatrix.gguf", "imatrix.dat"):  # the format from --format, as -o - has no suffix
        fmt = name.split(".")[1]
        piped = binary_run("imatrix", directory, "--random-tokens", 40, "--ctx", 20, "--format", fmt, "-o", "-")
        assert piped.returncode == 0, piped.stderr
        ok(swtool_in_process("imatrix", directory, "--random-tokens", 40, "--ctx", 20, "-o", tmp_path / name,
                             "--no-progress"))
        assert piped.stdout == (tmp_path / name).read_bytes() and piped.stderr.decode().startswith(f"wrote - ({fmt})")
    assert not (tmp_path / "-").exists()
    line = one_line_error(swtool_in_process("ablate", directory, "--catalog", catalog, "-o", "-"))
    assert "-o -: a directory is written there" in line
    assert not (tmp_path / "-").exists()


# --- -t/--threads -------------------------------------------------------------------------------

def test_threads_do_not_change_results(tiny, tmp_path):
    """-t 1 and -t 2: the same catalog bytes and the same perplexities; -t 0 is one line."""
    directory, catalog, text = tiny
    catalogs, evaluations = [], []
    for n in (1, 2):
        out = tmp_path / f"catalog-{n}.json"
        ok(swtool("scan", directory, "-t", n, "-o", out, "--no-progress"))
        catalogs.append(out.read_bytes())
        evaluations.append(json.loads(ok(swtool("eval", directory, "--text", text, "--catalog", catalog,
                                                "--threads", n, "--json", "--no-progress")).stdout))
    assert catalogs[0] == catalogs[1]
    assert evaluations[0] == evaluations[1]
    for command in (("scan", directory), ("eval", directory, "--text", text),
                    ("export", directory, "--type", "q8_0", "-o", tmp_path / "x.gguf"), ("audit", directory)):
        line = one_line_error(swtool_in_process(*command, "-t", "0"))
        assert "'-t' / '--threads': 0 is not in the range x>=1" in line, (command, line)


def test_threads_reach_numba(tiny):
    """In process (numba already loaded): -t sets numba's thread count for the command."""
    import numba

    directory, _, _ = tiny
    before = numba.get_num_threads()
    try:
        ok(swtool_in_process("scan", directory, "-t", "1", "--no-progress"))
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)

"""Running the `swtool` command as a user does, for the tests: a subprocess, and its one-line errors."""

import hashlib
import subprocess
import sys


def swtool(*args, **run_options):
    """`python -m swtool ARGS` with captured text output; run_options go to subprocess.run (e.g. env)."""
    return subprocess.run([sys.executable, "-m", "swtool", *map(str, args)], capture_output=True, text=True,
                          **run_options)


def swtool_without(module, *args):
    """`swtool ARGS` with `module` (an optional extra, e.g. matplotlib) hidden from the import system,
    whether it is installed or not."""
    hide = f"import sys; sys.modules[{module!r}] = None; from swtool.cli import main; main()"
    return subprocess.run([sys.executable, "-c", hide, *map(str, args)], capture_output=True, text=True)


def one_line_error(result):
    """The single `error: ...` line of a run that failed on bad input (exit 2)."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def digests(*roots):
    """sha256 of every regular file under `roots` (files or directories)."""
    found = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found

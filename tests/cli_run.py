"""Running the `swtool` command as a user does, for the tests: a subprocess, and its one-line errors."""

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

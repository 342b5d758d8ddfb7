"""Running the `swtool` command as a user does, for the tests: a subprocess, and its one-line errors."""

import hashlib
import subprocess
import sys


def swtool(*args, **run_options):
    """`python -m swtool ARGS` with captured text output; run_options go to subprocess.run (e.g. env)."""
    return subprocess.run([sys.executable, "-m", "swtool", *map(str, args)], capture_output=True, text=True,
                          **run_options)


class TimedOut(BaseException):
    """An in-process command still running at its timeout (a BaseException: no `except Exception` takes it)."""


def swtool_in_process(*args, timeout=None):
    """`swtool ARGS` run in this process by click's CliRunner, as a CompletedProcess: the same command
    group (swtool.cli.main), so the same one-line error and exit code as `python -m swtool`, without
    starting Python and importing numba once more. For the tables of bad inputs; every command also
    runs as a real process (test_cli.py), so its entry point stays tested.

    A command still running after `timeout` seconds is interrupted by SIGALRM (a blocking open() of a
    FIFO included) and reported as a failure, where a real process would have been killed."""
    import signal
    import traceback

    from click.testing import CliRunner

    from swtool.cli import main

    def interrupt(signum, frame):
        raise TimedOut(f"swtool {' '.join(map(str, args))}: still running after {timeout} s")

    previous = signal.signal(signal.SIGALRM, interrupt) if timeout else None
    if timeout:
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))  # what the real process would print
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


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

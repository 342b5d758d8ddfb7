"""README.md's examples, run: the user's guide cannot drift from the tool.

Every ```console block of README.md is a transcript, and this test replays them all, in order:
- A line starting with `$ ` is a command (a line ending in ` \\` continues on the next one). The lines
  after it, up to the next command or the end of the block, are output the command must print.
- Every expected line must be an output line (stdout, then stderr; trailing spaces ignored), in the
  order shown. Output lines may be left out between them: a README example shows a few lines.
- `…` in an expected line stands for any text: `read 8 bytes of weights in …` matches whatever the
  timing is. A line that is only `…` marks where output was left out, and matches nothing itself.
- `swtool ...` runs in this process (click's CliRunner, fixtures.cli_run.swtool_in_process: the same
  command group as the console script, without starting Python and numba for each); `echo $?` prints
  the exit code of the command before it; any other command runs in bash.
- A command must exit 0, unless the next command is `echo $?`, whose expected output is the code.
- The commands run in one temporary directory holding `fixtures/build/smollm2`,
  `fixtures/build/SmolLM2-135M-Instruct.Q4_1.gguf` and `fixtures/prose.txt` (links to this repository's):
  what a reader sees typing them from the repository root after `make demo`. One block's outputs (the
  catalog, the GGUF files, the ablated copy) are a later block's inputs.

```sh blocks are not run: commands that download, or set up a shell. Keep them few; a `$ ` transcript in
any other block than ```console fails the test, so an example cannot leave the tested set unnoticed.

To refresh the README after a change of the CLI's output, run this test: a failure prints each
command's whole output next to the line it did not find.
"""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from fixtures.cli_run import swtool_in_process

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ELLIPSIS = "…"
FENCE = re.compile(r"^```(\S*)")
COMMAND_TIMEOUT = 600  # seconds, in process: only a hang reaches it


def fenced_blocks(text):
    """[(language, first line number, [lines])] of every fenced block of a Markdown text."""
    blocks, current = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if current is None and match:
            current = (match.group(1), number + 1, [])
        elif current is not None and line.startswith("```"):
            blocks.append(current)
            current = None
        elif current is not None:
            current[2].append(line)
    assert current is None, f"README.md: the block opened at line {current[1] - 1} is never closed"
    return blocks


def transcript(lines):
    """[(command, [expected lines])] of a console block."""
    steps = []
    continued = False
    for line in lines:
        if continued:
            steps[-1][0] = steps[-1][0][:-1].rstrip() + " " + line.strip()
        elif line.startswith("$ "):
            steps.append([line[2:].strip(), []])
        else:
            assert steps, f"output before any command: {line!r}"
            steps[-1][1].append(line.rstrip())
        continued = steps[-1][0].endswith("\\")
    return [(command, expected) for command, expected in steps]


def console_blocks():
    return [(start, transcript(lines)) for language, start, lines in fenced_blocks(README.read_text())
            if language == "console"]


def line_matches(expected, actual):
    if ELLIPSIS not in expected:
        return expected == actual
    pattern = ".*".join(re.escape(part) for part in expected.split(ELLIPSIS))
    return re.fullmatch(pattern, actual) is not None


def missing_line(expected_lines, output):
    """The first expected line not found (in order) among the output's lines, or None."""
    actual = [line.rstrip() for line in output.splitlines()]
    position = 0
    for expected in expected_lines:
        if expected.strip() == ELLIPSIS:
            continue
        while position < len(actual) and not line_matches(expected, actual[position]):
            position += 1
        if position == len(actual):
            return expected
        position += 1
    return None


def run(command, last_code):
    """(exit code, output) of one README command, run from the current directory."""
    if command == "echo $?":
        return 0, f"{last_code}\n"
    if command.startswith("swtool "):
        words = shlex.split(command)
        assert not set(words) & {"|", ">", "<", ";", "&&", "||"}, f"{command}: swtool examples are single commands"
        result = swtool_in_process(*words[1:], timeout=COMMAND_TIMEOUT)
    else:
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    output = result.stdout + result.stderr
    # a progress bar redraws its line after each \r: only what follows the last one is left on screen
    return result.returncode, "\n".join(line.rsplit("\r", 1)[-1].rstrip() for line in output.split("\n")) + "\n"


@pytest.fixture
def workspace(smollm2, tmp_path, monkeypatch):
    """A directory laid out as the repository's root after `make demo`, as the working directory."""
    build = tmp_path / "fixtures" / "build"
    build.mkdir(parents=True)
    (build / "smollm2").symlink_to(smollm2)
    from fixtures.smollm2 import fetch_gguf

    gguf = fetch_gguf()  # the original Q4_1 file SmolLM2's directory is converted from
    (build / gguf.name).symlink_to(gguf)
    (tmp_path / "fixtures" / "prose.txt").symlink_to(ROOT / "fixtures" / "prose.txt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.llama_cpp  # the sweep example scores GGUF files in llama.cpp
def test_every_console_example_prints_what_the_readme_shows(workspace):
    blocks = console_blocks()
    assert len(blocks) >= 10, "README.md: the command reference has lost its examples"
    failures, ran = [], 0
    for start, steps in blocks:
        assert steps, f"README.md line {start}: a console block without a `$ ` command"
        last_code = 0
        for index, (command, expected) in enumerate(steps):
            code, output = run(command, last_code)
            ran += 1
            shown = steps[index + 1][0] == "echo $?" if index + 1 < len(steps) else False
            if code != 0 and not shown:
                failures.append(f"README.md, block at line {start}: `{command}` exited {code} "
                                f"(show it with `$ echo $?`, or fix the example):\n{output}")
            missing = missing_line(expected, output)
            if missing is not None:
                failures.append(f"README.md, block at line {start}: `{command}` did not print\n    {missing}\n"
                                f"its output (exit {code}):\n{output}")
            last_code = code
    assert not failures, f"{len(failures)} of {ran} README commands differ:\n\n" + "\n\n".join(failures)


def test_only_console_blocks_hold_transcripts():
    """A `$ ` transcript outside a ```console block would never run; untested ```sh commands must at
    least name real swtool commands."""
    from swtool.cli import main

    for language, start, lines in fenced_blocks(README.read_text()):
        if language == "console":
            continue
        for offset, line in enumerate(lines):
            assert not line.startswith("$ "), (f"README.md line {start + offset}: a transcript in a "
                                               f"```{language} block is not tested; make it ```console")
            if language == "sh":
                words = line.split()
                if "swtool" in words[:1] or "swtool)\"" in line:
                    name = words[1] if words[0] == "swtool" else None
                    assert name is None or name in main.commands, f"README.md line {start + offset}: {line}"


def test_the_matching_rules():
    output = "head\n4 intact: read 8 bytes in 0.3 ms\nsummary line  \n"
    assert missing_line(["head", "…", "summary line"], output) is None
    assert missing_line(["4 intact: read 8 bytes in …"], output) is None
    assert missing_line(["summary line", "head"], output) == "head"  # order counts
    assert missing_line(["4 intact: read 9 bytes in …"], output) == "4 intact: read 9 bytes in …"
    assert missing_line(["summary"], output) == "summary"  # a whole line, not a part of one
    assert transcript(["$ swtool a \\", "  --b", "out", "$ echo $?", "0"]) == [("swtool a --b", ["out"]),
                                                                             ("echo $?", ["0"])]


def test_shell_completion_as_the_readme_shows():
    """`eval "$(_SWTOOL_COMPLETE=bash_source swtool)"` defines the completion, and it completes."""
    from click.testing import CliRunner

    from swtool.cli import main

    def complete(**env):
        return CliRunner().invoke(main, [], prog_name="swtool", env={"_SWTOOL_COMPLETE": "", **env}).stdout

    assert "complete -o nosort -F _swtool_completion swtool" in complete(_SWTOOL_COMPLETE="bash_source")
    assert "#compdef swtool" in complete(_SWTOOL_COMPLETE="zsh_source")
    assert "complete --no-files --command swtool" in complete(_SWTOOL_COMPLETE="fish_source")
    words = dict(_SWTOOL_COMPLETE="bash_complete", COMP_CWORD="1", COMP_WORDS="swtool sc")
    assert complete(**words).split() == ["plain,scan"]
    words = dict(_SWTOOL_COMPLETE="bash_complete", COMP_CWORD="4", COMP_WORDS="swtool export m --sw-handling ''")
    assert complete(**words).split() == ["plain,keep", "plain,isolate", "plain,none"]


def markdown_anchors(path):
    """GitHub's anchors for the headings of a Markdown file."""
    anchors, fence = set(), False
    for line in path.read_text().splitlines():
        fence ^= line.startswith("```")
        if not fence and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add("".join(c for c in title if c.isalnum() or c in " -_").replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", [README] + sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_links_between_the_pages_resolve(page):
    """Every relative link of README.md and docs/ names a file that exists, and a heading it has."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        name, _, anchor = target.partition("#")
        linked = (page.parent / name).resolve() if name else page
        assert linked.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in markdown_anchors(linked), f"{page.name}: link to {target}: no such heading"


def test_the_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 300
    assert os.path.getsize(README) > 0

"""Text that is not valid UTF-8 where swtool meets it: command-line arguments and paths.

Bytes that are not UTF-8 in argv reach Python as lone surrogates ('\\udcff'); the tokenizer
refuses them with a TypeError and printing them raises UnicodeEncodeError."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from cli_run import one_line_error

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    """swtool with raw bytes in argv (not through text=True's encoding)."""
    argv = [os.fsencode(sys.executable), b"-m", b"swtool", *[a if isinstance(a, bytes) else os.fsencode(str(a))
                                                            for a in args]]
    result = subprocess.run(argv, capture_output=True)
    result.stdout = result.stdout.decode("utf-8", "replace")
    result.stderr = result.stderr.decode("utf-8", "replace")
    return result


def test_a_prompt_that_is_not_utf8_is_one_line_and_writes_nothing(good, tmp_path):
    out = tmp_path / "catalog.json"
    line = one_line_error(run("scan", good.model, "--prompt", b"caf\xff", "-o", out, "--no-progress"))
    assert "not valid UTF-8" in line
    assert not out.exists()


def test_a_model_in_a_folder_whose_name_is_not_utf8(good, tmp_path):
    folder = os.path.join(os.fsencode(tmp_path), b"m\xff")
    shutil.copytree(good.model, os.fsdecode(folder))
    result = run("scan", folder, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "m\\udcff: LlamaForCausalLM, 4 layers" in result.stdout  # the path printed escaped, not a crash


def test_a_prefix_gives_the_whole_texts_first_tokens(smollm2, tmp_path):
    """--max-tokens reads only a prefix of the text: its first N tokens are those of the whole text."""
    from swtool.evaluate import READ_STEP, text_token_ids
    from swtool.tokenizer import encode

    prose = (ROOT / "fixtures" / "prose.txt").read_text() * 40
    path = tmp_path / "long.txt"
    path.write_text(prose)
    whole = encode(smollm2, prose)
    assert len(prose) > 3 * READ_STEP  # the larger counts take several, doubled prefixes
    for n in (2, 100, 1000, 20_000, 45_000, len(whole) - 1, len(whole) + 10):
        assert text_token_ids(smollm2, path, n) == whole[:n], n


def test_a_huge_text_is_read_only_as_far_as_max_tokens_needs(good, tmp_path):
    """A 1 GB sparse file (all NUL characters): eval with --max-tokens 64 reads a prefix; without
    --max-tokens it is refused by its length. Peak memory stays far below the file's size."""
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(1 << 30)
    script = ("import resource, sys; from swtool.cli import main\n"
              "try:\n    main()\nexcept SystemExit as e:\n"
              "    print(e.code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); raise\n")
    result = subprocess.run([sys.executable, "-c", script, "eval", good.model, "--text", huge, "--max-tokens", "64",
                             "--ctx", "32", "--no-progress"], capture_output=True, text=True, timeout=300)
    code, peak_kib = result.stderr.split()[-2:]
    assert code == "0", result.stderr
    assert "64 tokens in 2 chunks of 32" in result.stdout
    assert int(peak_kib) < 800 * 1024  # the file is 1 GiB; the whole process stays under 800 MiB
    line = one_line_error(run("eval", good.model, "--text", huge, "--no-progress"))
    assert "longer than 256 M characters; score a part of it with --max-tokens" in line

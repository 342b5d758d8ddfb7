"""Text that is not valid UTF-8 where swtool meets it: command-line arguments and paths.

Bytes that are not UTF-8 in argv reach Python as lone surrogates ('\\udcff'); the tokenizer
refuses them with a TypeError and printing them raises UnicodeEncodeError."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.cli_run import one_line_error, swtool_in_process

# peak memory is read from Linux's /proc/self/status (VmHWM) of the measured process: what these tests measure
linux_peak_memory = pytest.mark.skipif(sys.platform != "linux", reason="reads peak memory from Linux's /proc/self/status")

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


@linux_peak_memory
def test_a_huge_text_is_read_only_as_far_as_max_tokens_needs(good, tmp_path):
    """A 1 GB sparse file (all NUL characters): eval with --max-tokens 64 reads a prefix; without
    --max-tokens it is refused by its length. Peak memory stays far below the file's size."""
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(1 << 30)
    code, peak, result = peak_rss_kib("eval", good.model, "--text", huge, "--max-tokens", "64", "--ctx", "32",
                                      "--no-progress")
    assert code == 0, result.stderr
    assert "64 tokens in 2 chunks of 32" in result.stdout
    assert peak < 800 * 1024  # KiB: the file is 1 GiB; the whole process stays under 800 MiB
    line = one_line_error(swtool_in_process("eval", good.model, "--text", huge, "--no-progress"))
    assert "longer than 256 M characters; score a part of it with --max-tokens" in line


def peak_rss_kib(*argv):
    """(exit code, peak RSS in KiB) of `swtool ARGV` run in a fresh process."""
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a child of a large
    # pytest process would report the parent's size
    script = ("import re, sys; from swtool.cli import main\n"
              "try:\n    main()\nexcept SystemExit as e:\n"
              "    peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
              "    print(e.code, peak, file=sys.stderr); raise\n")
    result = subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True,
                            timeout=300)
    code, peak = result.stderr.split()[-2:]
    return int(code), int(peak), result


def gguf_with_a_huge_array(good, tmp_path, size=256 << 20):
    """The tiny GGUF with a `size`-byte UINT8 metadata array (written by gguf-py at 32 elements, then
    widened in the file: the KV section grows by a multiple of the alignment, so tensor offsets,
    relative to the aligned data section, stay valid); and the small file it was made from."""
    import gguf

    from fixtures.hf_to_gguf import vocabulary_fields, write_gguf

    small = write_gguf(good.model, tmp_path / "small.gguf", "f32", vocabulary=vocabulary_fields(good.gguf),
                       extra=[("test.big", bytes([7]) * 32, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8)])
    raw = small.read_bytes()
    key = b"test.big"
    marker = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, 32) + bytes([7]) * 32
    assert raw.count(marker) == 1 and size % 32 == 0
    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:
        at = raw.index(marker)
        f.write(raw[:at] + struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, size))
        f.write(bytes([7]) * size)
        f.write(raw[at + len(marker):])
    return big, small


@linux_peak_memory
def test_a_huge_numeric_metadata_array_costs_its_bytes_not_ten_times_them(good, tmp_path):
    """As Python ints a 256 MiB array took ~10 bytes of memory per byte of file."""
    import gguf

    big, small = gguf_with_a_huge_array(good, tmp_path)
    code, peak, result = peak_rss_kib("inspect", big, "--json")
    assert code == 0, result.stderr
    assert json.loads(result.stdout)["gguf"]["metadata_keys"] == len(gguf.GGUFReader(small).fields) - 3
    assert peak < 1024 * 1024  # KiB: under 1 GiB for a 256 MiB array (~2.5 GiB as Python ints)


def test_inputs_built_to_blow_memory_up_fit_a_2_gib_address_space(good, tmp_path):
    """The same hostile inputs under RLIMIT_AS = 2 GiB: a clean result or a one-line error, never a
    MemoryError traceback or the kernel's OOM killer."""
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(1 << 30)
    big, _ = gguf_with_a_huge_array(good, tmp_path, size=512 << 20)
    cases = [(["eval", good.model, "--text", huge, "--max-tokens", "64", "--ctx", "32", "--no-progress"], 0),
             (["eval", good.model, "--text", huge, "--ctx", "32", "--no-progress"], 2),
             (["eval", good.model, "--text", "/dev/zero", "--ctx", "32", "--no-progress"], 2),
             (["inspect", big], 0), (["audit", big, "--known-id", "acme/nothing"], 2),
             (["scan", big, "--no-progress"], 0),
             (["quantize", big, "-o", tmp_path / "out.gguf", "--type", "q8_0", "--no-progress"], 2)]
    for argv, code in cases:
        result = subprocess.run([sys.executable, "-m", "swtool", *map(str, argv)],
                                capture_output=True, text=True, timeout=300, preexec_fn=limited)
        assert result.returncode == code, (argv, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr, argv
    assert "metadata test.big holds an array of 536870912 values" in result.stderr  # quantize: refused, not copied
    assert not (tmp_path / "out.gguf").exists()


def test_a_gpt2_vocabulary_without_merges_is_refused_as_llama_cpp_does(good, tmp_path):
    from fixtures.hf_to_gguf import vocabulary_fields, write_gguf

    fields = [f for f in vocabulary_fields(good.gguf) if f[0] != "tokenizer.ggml.merges"]
    path = write_gguf(good.model, tmp_path / "no-merges.gguf", "f32", vocabulary=fields)
    for argv in (["scan", path, "--no-progress"], ["inspect", path]):
        line = one_line_error(swtool_in_process(*argv))
        assert "tokenizer.ggml.merges: missing, and a gpt2 (byte-level BPE) vocabulary needs its merges" in line

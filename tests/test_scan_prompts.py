"""`swtool scan` over several prompts: one read of the weights, each prompt's numbers as if scanned alone,
per-candidate counts (found and verified in k of n prompts), and the compact / --wide tables."""

import json
import shutil

import pytest

from swtool.detect import Settings, SuperWeight, merge_prompts, scan, scan_prompts
from swtool.errors import SwtoolError
from swtool.model import load_model
from swtool.tokenizer import DEFAULT_PROMPT, DEFAULT_PROMPTS, encode
from fixtures.cli_run import swtool_in_process
from fixtures.tiny import Plant

PLANT = Plant(1, 41, 101)
TWO_IN_ONE_ROW = (Plant(1, 20, 33, value=4.0), Plant(1, 20, 90, value=3.0))
# different lengths (padded to the longest in the pass), the paper's first
PROMPTS = [DEFAULT_PROMPT, "Hi there", "def f(x): return x * 2  # a longer line of code, in tokens"]


def measured(sw):
    """What a scan measures about a weight, in a fixed order."""
    return [sw.input_activation, sw.output_activation, sw.contribution, sw.super_activation,
            *(value for key, value in sorted(sw.verification.items()) if key not in ("verified", "verified_by"))]


def decided(sw):
    return (sw.layer, sw.row, sw.col, sw.expert, sw.value, sw.rank, sw.token, sw.iteration,
            sw.verification["verified"], tuple(sw.verification["verified_by"]))


def assert_as_alone(model, prompts, rel=1e-5):
    """scan_prompts of `prompts` gives, prompt by prompt, what scan of that prompt alone gives."""
    tokens = [encode(model.directory, text) for text in prompts]
    together = scan_prompts(model, tokens, Settings(prompts[0]))
    for (found, report), ids, text in zip(together, tokens, prompts):
        alone, alone_report = scan(model, ids, Settings(text))
        assert [decided(sw) for sw in found] == [decided(sw) for sw in alone]
        for a, b in zip(found, alone):
            # tolerance as tests/test_detect.py's one pass vs pass by pass: a world that cancels the super
            # activation is compared relative to the super activation
            assert measured(a) == pytest.approx(measured(b), rel=rel, abs=rel * abs(b.super_activation))
        assert report["nll_intact"] == pytest.approx(alone_report["nll_intact"], rel=1e-6)
        assert report["passes"] == together[0][1]["passes"]  # one pass for all the prompts
    return together


@pytest.mark.parametrize("family, dtype, plants", [
    ("llama", "bfloat16", (PLANT,)),
    ("llama", "float32", TWO_IN_ONE_ROW),
    ("gpt2", "float32", (PLANT,)),  # learned positions: every prompt's start at position 0
    ("mixtral", "float32", (Plant(2, 41, 101, expert=2),)),  # padding never routed into an expert's records
])
def test_each_prompt_is_scanned_as_if_alone(tiny_factory, family, dtype, plants):
    # measured gap on these tiny models: exact (0) for most, float32 rounding otherwise; on SmolLM2
    # (test_smollm2_default_prompts) at most 1.8e-4 relative on a super activation left after zeroing its
    # row's set, which cancels 24,000 to 140 (1.1e-6 of the intact one), and 6e-6 nats on an NLL
    directory, _ = tiny_factory(family, dtype, plants=plants)
    together = assert_as_alone(load_model(directory), PROMPTS)
    assert all(found for found, _ in together)  # the planted weight is found with every prompt


def test_a_prompt_of_one_token_is_named(tiny_factory):
    directory, _ = tiny_factory("llama", "bfloat16", plants=(PLANT,))
    model = load_model(directory)
    with pytest.raises(SwtoolError, match="prompt 2 must have at least 2 tokens"):
        scan_prompts(model, [encode(model.directory, DEFAULT_PROMPT), [5]], Settings(DEFAULT_PROMPT))


def weight(col, verified, tests, nll_rise=1.0):
    return SuperWeight(layer=1, row=4, col=col, expert=None, tensor="model.layers.1.mlp.down_proj.weight",
                       gguf_tensor="blk.1.ffn_down.weight", value=5.0, dtype="F32", rank=1, token=0,
                       input_activation=10.0, output_activation=50.0, contribution=50.0, super_activation=60.0,
                       iteration=1, verification={"nll_intact": 3.0, "nll_removed": 3.0 + nll_rise,
                                                  "verified": verified, "verified_by": tests})


def test_verified_means_verified_in_more_than_half_of_the_prompts():
    results = [([weight(1, True, ["NLL"]), weight(2, True, ["activation", "NLL"])], {}),
               ([weight(1, True, ["set"]), weight(3, True, ["NLL"])], {}),
               ([weight(1, False, []), weight(2, True, ["NLL"])], {})]
    merged = {sw.col: sw for sw in merge_prompts(results)}
    assert [sw.col for sw in merge_prompts(results)] == [1, 2, 3]  # in the order the prompts found them
    one, two, three = merged[1], merged[2], merged[3]
    assert (one.found_in, one.verified_in, one.verification["verified"]) == (3, 2, True)
    assert one.verification["verified_by"] == ["NLL", "set"]  # the tests of the prompts that verified it
    assert (two.found_in, two.verified_in, two.verification["verified"]) == (2, 2, True)
    assert two.verification["verified_by"] == ["activation", "NLL"]
    # found and verified in one prompt of three: weak, a prompt that did not find it does not verify it
    assert (three.found_in, three.verified_in, three.verification["verified"]) == (1, 1, False)
    assert three.per_prompt[0] is None and three.per_prompt[2] is None
    assert three.per_prompt[1]["verification"]["verified_by"] == ["NLL"]
    # one prompt: the old rule, verified in it
    (alone,) = merge_prompts([([weight(1, False, [])], {})])
    assert (alone.found_in, alone.verified_in, alone.verification["verified"]) == (1, 0, False)


@pytest.mark.parametrize("family, plants, expected", [
    ("llama", (PLANT,), [["activation"]]),  # a random model's NLL hardly moves: the activation test alone
    # two weights feeding one spike: the larger carries it alone, the other only with it (its set)
    ("llama", TWO_IN_ONE_ROW, None),
    # a renormalising block (tests/test_detect_renormalised.py): the weight alone leaves the activation
    ("gemma2", (Plant(2, 41, 101), Plant(2, 41, 130, value=0.1, drive=10.0)), None),
])
def test_verified_by_names_the_test(tiny_factory, family, plants, expected):
    directory, _ = tiny_factory(family, "float32", plants=plants)
    model = load_model(directory)
    found, _ = scan(model, encode(model.directory, DEFAULT_PROMPT), Settings(DEFAULT_PROMPT))
    activation, nll = {}, {}
    for sw in found:
        v = sw.verification
        activation[sw.col] = v["super_activation_removed"] < 0.5 * v["super_activation_intact"]
        nll[sw.col] = v["nll_removed"] - v["nll_intact"] > 0.1
        alone = [name for name, passed in (("activation", activation[sw.col]), ("NLL", nll[sw.col])) if passed]
        together = (v["super_activation_set_removed"] < 0.5 * v["super_activation_intact"]
                    or v["nll_set_removed"] - v["nll_intact"] > 0.1)
        assert v["verified_by"] == (alone or (["set"] if together else []))
        assert v["verified"] == bool(v["verified_by"])
    if expected is not None:
        assert [sw.verification["verified_by"] for sw in found] == expected
    if family == "gemma2":
        assert found[0].verification["verified_by"] == []  # weak: no test passes
    if plants == TWO_IN_ONE_ROW:
        assert [sw.verification["verified_by"] for sw in found] == [["activation"], ["set"]]


# --- the command -----------------------------------------------------------------------------------------

@pytest.fixture
def planted(tiny_factory):
    directory, _ = tiny_factory("llama", "bfloat16", plants=(PLANT,))
    return directory


def table_header(stdout):
    return stdout.splitlines()[1].split("  ")


def test_compact_table_by_default_and_every_column_with_wide(planted):
    compact = swtool_in_process("scan", planted, "--no-progress")
    assert compact.returncode == 0, compact.stderr
    lines = compact.stdout.splitlines()
    assert f"{len(DEFAULT_PROMPTS)} prompts of" in lines[0]
    assert [c.strip() for c in table_header(compact.stdout) if c.strip()] == [
        "layer", "row", "col", "tensor", "value", "found", "NLL -w", "verified by"]
    n = len(DEFAULT_PROMPTS)
    assert lines[3].split()[:6] == ["1", "41", "101", "model.layers.1.mlp.down_proj.weight", "4", f"{n}/{n}"]
    assert lines[3].split()[-2:] == [f"{n}/{n}", "activation"]  # verified in n of n prompts, by the activation test
    assert max(map(len, lines[1:4])) <= 100
    wide = swtool_in_process("scan", planted, "--no-progress", "--wide")
    assert wide.returncode == 0, wide.stderr
    assert [c.strip() for c in table_header(wide.stdout) if c.strip()] == [
        "layer", "row", "col", "tensor", "value", "dtype", "rank", "token", "input", "output", "SA", "SA -w",
        "SA -row", "NLL", "NLL -w", "NLL -row", "found", "verified by"]


def test_gguf_input_keeps_llama_cpp_names(good):
    result = swtool_in_process("scan", good.gguf, "--no-progress", "--prompt", DEFAULT_PROMPT)
    assert result.returncode == 0, result.stderr
    row = result.stdout.splitlines()[3].split()
    assert row[3].startswith("blk.") and row[3].endswith(".ffn_down.weight"), result.stdout
    safetensors = swtool_in_process("scan", good.model, "--no-progress", "--prompt", DEFAULT_PROMPT)
    assert safetensors.stdout.splitlines()[3].split()[3].startswith("model.layers.")


def test_prompts_file_is_one_prompt_per_line(planted, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"Hello there, world\r\n\n   \nThe weather today is\n")  # CRLF, blank lines skipped
    by_file = swtool_in_process("scan", planted, "--no-progress", "--json", "--prompt", DEFAULT_PROMPT,
                                "--prompts-file", path)
    assert by_file.returncode == 0, by_file.stderr
    catalog = json.loads(by_file.stdout)
    assert [p["prompt"] for p in catalog["detection"]["prompts"]] == [
        DEFAULT_PROMPT, "Hello there, world", "The weather today is"]  # --prompt first, then the file's
    by_option = swtool_in_process("scan", planted, "--no-progress", "--json", "--prompt", DEFAULT_PROMPT,
                                  "--prompt", "Hello there, world", "--prompt", "The weather today is")
    assert json.loads(by_option.stdout)["super_weights"] == catalog["super_weights"]
    (sw,) = catalog["super_weights"]
    assert (sw["found_in"], sw["verified_in"], len(sw["per_prompt"])) == (3, 3, 3)
    assert sw["verification"]["verified_by"] == ["activation"]


@pytest.mark.parametrize("content, message", [
    (b"", "no prompt in the file"),
    (b"\n  \n\t\n", "no prompt in the file"),
    (b"caf\xe9 au lait\n", "not UTF-8 text"),
])
def test_prompts_file_without_prompts_or_not_utf8_is_one_line(planted, tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    result = swtool_in_process("scan", planted, "--no-progress", "--prompts-file", path)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: {message}")


def test_smollm2_default_prompts(smollm2):
    """SmolLM2's four super weights with the default prompt set (docs/prompts.md has the table)."""
    model = load_model(smollm2)
    together = assert_as_alone(model, list(DEFAULT_PROMPTS))
    merged = merge_prompts(together)
    n = len(DEFAULT_PROMPTS)
    counts = {(sw.layer, sw.row, sw.col): (sw.found_in, sw.verified_in, sw.verification["verified"])
              for sw in merged}
    # [507, 430] of layer 2 is not found with the French prompt, whose layer-2 spike it does not feed enough
    assert counts == {(2, 507, 90): (n, n, True), (2, 507, 430): (n - 1, n - 1, True),
                      (11, 507, 1229): (n, n, True), (11, 507, 1487): (n, n, True)}
    # the paper's prompt, first: its entries are what the single-prompt scan reports (README's table)
    paper = {(sw.layer, sw.col): sw.per_prompt[0]["verification"]["verified_by"] for sw in merged}
    assert paper == {(2, 90): ["NLL"], (2, 430): ["set"], (11, 1229): ["activation", "NLL"], (11, 1487): ["NLL"]}


def test_smollm2_scan_command_with_the_default_prompts(smollm2_catalog):
    catalog = json.loads(smollm2_catalog.read_text())
    assert [p["prompt"] for p in catalog["detection"]["prompts"]] == list(DEFAULT_PROMPTS)
    assert [(sw["layer"], sw["col"], sw["found_in"]) for sw in catalog["super_weights"]] == [
        (2, 90, 5), (2, 430, 4), (11, 1229, 5), (11, 1487, 5)]
    assert all(sw["verification"]["verified"] for sw in catalog["super_weights"])


def test_one_read_for_every_prompt(smollm2):
    result = swtool_in_process("scan", smollm2, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "5 prompts of 4-10 tokens, 1 pass over the weights" in result.stdout.splitlines()[0]


@pytest.mark.parametrize("family", ["phi3-longrope", "llama-dynamic"])
def test_default_prompts_past_a_length_dependent_rope_are_left_out_with_a_note(tiny_factory, family, tmp_path):
    """Dynamic NTK and longrope change every frequency once a sequence passes their limit (16 tokens
    here), so default prompts past it cannot share a padded pass with shorter ones: the scan keeps those
    that fit (or the paper's alone, which one pass scans at any length) and says so."""
    from swtool.arch.rope import length_limit

    directory, _ = tiny_factory(family, "float32")
    limit = int(length_limit(json.loads((directory / "config.json").read_text())))
    lengths = {text: len(encode(directory, text)) for text in DEFAULT_PROMPTS}
    fitting = [text for text in DEFAULT_PROMPTS if lengths[text] <= limit]
    assert len(fitting) < len(DEFAULT_PROMPTS)  # the case this test is about
    result = swtool_in_process("scan", directory, "-o", tmp_path / "c.json", "--no-progress")
    assert result.returncode == 0, result.stderr
    expected = fitting or [DEFAULT_PROMPT]
    left_out = len(DEFAULT_PROMPTS) - len(expected)
    assert f"note: {left_out} default prompt{'s' if left_out != 1 else ''} left out: longer than the {limit} tokens" \
        in result.stderr
    catalog = json.loads((tmp_path / "c.json").read_text())
    assert [p["prompt"] for p in catalog["detection"]["prompts"]] == expected
    # prompts the user names are never dropped: mixed lengths past the limit are one line
    long_prompt = max(DEFAULT_PROMPTS, key=lengths.get)
    short_prompt = min(DEFAULT_PROMPTS, key=lengths.get)
    refused = swtool_in_process("scan", directory, "--prompt", long_prompt, "--prompt", short_prompt)
    assert refused.returncode == 2 and "scan it alone" in refused.stderr


@pytest.mark.parametrize("family", ["llama", "llama-dynamic"])
def test_default_prompts_are_tokenized_once(tiny_factory, family, tmp_path, monkeypatch):
    """The length check of default_prompts (llama-dynamic: a limit some prompts pass) hands its ids
    to the scan, which does not tokenize them again; the catalog's ids are the tokenizer's."""
    import swtool.tokenizer

    directory, _ = tiny_factory(family, "float32")
    encoded = []

    def counting_encode(directory, text, tokenizer=None):
        encoded.append(text)
        return real_encode(directory, text, tokenizer)

    real_encode = swtool.tokenizer.encode
    monkeypatch.setattr(swtool.tokenizer, "encode", counting_encode)
    result = swtool_in_process("scan", directory, "-o", tmp_path / "c.json", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert sorted(encoded) == sorted(DEFAULT_PROMPTS)
    monkeypatch.undo()
    scanned = json.loads((tmp_path / "c.json").read_text())["detection"]["prompts"]
    assert [p["tokens"] for p in scanned] == [encode(directory, p["prompt"]) for p in scanned]


def test_the_tokenizer_is_loaded_once_for_every_prompt_and_again_when_its_bytes_change(tiny_factory, tmp_path,
                                                                                         monkeypatch):
    """swtool.tokenizer keeps the last tokenizer it loaded, by the bytes of tokenizer.json: the prompts of a
    scan share one load, a copy of the file in another directory is the same tokenizer, and a file whose bytes
    changed is loaded again (the ids it gives change with it)."""
    import shutil

    import tokenizers

    from swtool import tokenizer as swtool_tokenizer

    model_dir, _ = tiny_factory("llama")
    loads = []
    real = tokenizers.Tokenizer

    class Counted:
        @staticmethod
        def from_buffer(raw):
            loads.append(len(raw))
            return real.from_buffer(raw)

    monkeypatch.setattr(tokenizers, "Tokenizer", Counted)
    swtool_tokenizer._last_loaded.clear()
    ids = [encode(model_dir, prompt) for prompt in DEFAULT_PROMPTS]
    assert len(loads) == 1
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert [encode(copy, prompt) for prompt in DEFAULT_PROMPTS] == ids and len(loads) == 1
    vocabulary = json.loads((copy / "tokenizer.json").read_text())
    vocab = vocabulary["model"]["vocab"]
    first = ids[0][-1]  # the prompt's last token renumbered: the same strings, other bytes, other ids
    other = next(i for i in vocab.values() if i not in ids[0])
    token_first, token_other = (next(t for t, i in vocab.items() if i == n) for n in (first, other))
    vocab[token_first], vocab[token_other] = other, first
    (copy / "tokenizer.json").write_text(json.dumps(vocabulary))
    changed = encode(copy, DEFAULT_PROMPTS[0])
    assert len(loads) == 2 and changed == [other if i == first else i for i in ids[0]]


def test_a_template_inside_a_sequence_of_processors_must_define_its_special_tokens(good, tmp_path):
    model = shutil.copytree(good.model, tmp_path / "model")
    data = json.loads((model / "tokenizer.json").read_text())
    template = data["post_processor"]
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    data["post_processor"] = {"type": "Sequence", "processors": [byte_level, template]}  # as Llama 3 nests it
    (model / "tokenizer.json").write_text(json.dumps(data))
    assert encode(model, "Hello") == encode(good.model, "Hello")  # the template's BOS, through the Sequence
    template["special_tokens"] = {}
    (model / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(SwtoolError, match="adds the special token '<s>', which it does not define"):
        encode(model, "Hello")

"""Importance in export and quantize (swtool/export_importance.py, docs/gguf.md "Importance").

Oracles, and what each checks:
  - transformers (fixtures/torch_importance.py, a hook on torch's linear): the importance a
    scan collects in its own pass is the x² sums over its prompts' real tokens in the intact model only
    (no world with a weight zeroed, no padding, an expert's routed rows);
  - libggml (fixtures/ggml_oracle.py, ggml_quantize_chunk with an imatrix): every quantized tensor's bytes
    of `swtool quantize --imatrix F`, with the importance read from F by gguf-py (not by swtool's reader),
    divided as llama-quantize divides it (tools/quantize/quantize.cpp: in_sum2 / counts);
  - the tensor types: llama.cpp's src/llama-quant.cpp, read by hand (llama_model_quantize takes its
    imatrix as a C++ map, which Python cannot hand it): with an imatrix, Q4_0's ffn_down of the first
    n/8 layers is Q4_1; the keys llama-quantize writes for the file (quantize.imatrix.*).
"""

import json

import numpy as np
import pytest

from fixtures.cli_run import one_line_error, swtool_in_process
from fixtures.tiny import Plant, random_tokens
from swtool import imatrix as im
from swtool.detect import Settings, scan_prompts
from swtool.export_importance import digest, parse_importance, scan_collector
from swtool.errors import SwtoolError
from swtool.model import load_model
from fixtures.torch_importance import torch_importance


@pytest.mark.parametrize("family, plants", [
    ("llama", (Plant(1, 41, 101),)),
    ("mixtral", (Plant(1, 41, 101, expert=2),)),  # routed rows: worlds and padding told apart by row
])
def test_scan_collects_the_intact_models_importance_of_its_prompts(tiny_factory, family, plants):
    """Prompts of different lengths (padded in the pass), a planted weight whose worlds fork: the sums equal
    transformers' over each prompt alone, to 1e-5 of the largest (float32 sums in another order), and the
    counts are the prompts' tokens exactly."""
    directory, _ = tiny_factory(family, "float32", plants=plants)
    model = load_model(directory)
    prompts = [list(map(int, random_tokens(n, seed=n, vocab=250))) for n in (9, 17)]
    collector = scan_collector(model)
    results = scan_prompts(model, prompts, Settings("x"), linear_observer=collector)
    assert any(found for found, _ in results)  # the planted weight was found: zeroed worlds were computed
    got = collector.importance(["scan"], 0, 512)
    expected = {}
    for prompt in prompts:  # transformers, one prompt at a time (no padding)
        for name, (sums, counts) in torch_importance(directory, family, [prompt]).items():
            into = expected.setdefault(name, [np.zeros_like(sums), np.zeros_like(counts)])
            into[0] += sums
            into[1] += counts
    assert set(got.entries) == set(expected)
    for name, (sums, counts) in expected.items():
        np.testing.assert_array_equal(got.entries[name].counts, counts, err_msg=name)
        assert np.abs(got.entries[name].sums - sums).max() <= 1e-5 * sums.max(), name


def test_stacked_experts_are_quantized_with_each_experts_importance(tmp_path):
    """A mixture's ffn_*_exps: expert e's rows with importance row e (the scan's counts per expert), as
    llama-quantize hands ggml_quantize_chunk one expert's slice of the imatrix (libggml as the oracle)."""
    import gguf

    from fixtures.ggml_oracle import Ggml
    from fixtures.tiny import build_tiny
    from swtool.gguf_export import ExportOptions, export
    from fixtures.tiny import add_a_merge

    build_tiny(tmp_path, "mixtral", "float32", plants=(Plant(1, 41, 101, expert=2),))
    add_a_merge(tmp_path)
    report = export(tmp_path, tmp_path / "q4_0.gguf", ExportOptions("q4_0", progress=False, handling="none"))
    assert report.importance.source == "scan"
    name = "blk.0.ffn_down_exps.weight"
    weights = report.importance.importance.importance_for(name, 160)
    counts = report.importance.importance.entries[name].counts
    assert weights.shape == (4, 160) and counts.sum() > 0
    for row, count in zip(weights, counts):  # an expert no token reached: ones, as llama-quantize makes them
        assert (row == 1).all() == (count == 0)
    source = load_model(tmp_path).checkpoint.tensor("model.layers.0.block_sparse_moe.experts.0.w2.weight")
    stored = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "q4_0.gguf")).tensors}[name]
    data = np.asarray(stored.data).view(np.uint8).reshape(4, -1)
    ggml = Ggml()
    for expert in range(4):
        values = source.read() if expert == 0 else load_model(tmp_path).checkpoint.tensor(
            f"model.layers.0.block_sparse_moe.experts.{expert}.w2.weight").read()
        expected = ggml.quantize(values, gguf.GGMLQuantizationType.Q4_0, weights[expert])
        assert np.array_equal(data[expert], expected.reshape(-1)), expert


def test_importance_option_syntax():
    assert parse_importance(None).kind == "scan"
    assert parse_importance("none").kind == "none"
    assert parse_importance("text:a b.txt").path == "a b.txt"
    assert parse_importance("random").tokens == 2048 and parse_importance("random:300").tokens == 300
    assert parse_importance(None, "f.gguf").path == "f.gguf"
    for bad in ("scan:x", "text", "text:", "random:0", "random:x", "all"):
        with pytest.raises(SwtoolError, match="--importance"):
            parse_importance(bad)
    with pytest.raises(SwtoolError, match="not both"):
        parse_importance("none", "f.gguf")


# --- quantize --imatrix of an F16 GGUF: llama-quantize's file -------------------------------------------

@pytest.fixture(scope="module")
def f16_and_imatrix(tmp_path_factory):
    """A tiny Llama of 8 layers (n/8 = 1: ffn_down of layer 0 is the rule's) exported F16, and an imatrix of
    it from random tokens written by `swtool imatrix`."""
    from fixtures.tiny import build_tiny
    from fixtures.tiny import add_a_merge

    directory = tmp_path_factory.mktemp("importance-model")
    build_tiny(directory, "llama", "float32", plants=(Plant(1, 41, 101),), num_hidden_layers=8)
    add_a_merge(directory)  # llama.cpp's loader needs one
    out = tmp_path_factory.mktemp("importance")
    f16 = out / "f16.gguf"
    assert swtool_in_process("export", directory, "-o", f16, "--type", "f16", "--no-scan",
                             "--no-progress").returncode == 0
    imatrix = out / "imatrix.gguf"
    result = swtool_in_process("imatrix", directory, "--random-tokens", 256, "--ctx", 64, "-o", imatrix, "--no-progress")
    assert result.returncode == 0, result.stderr
    return directory, f16, imatrix


def gguf_py_importance(path):
    """{tensor: float32 [n_mat, cols]} read by gguf-py, divided as llama-quantize's load_imatrix divides it."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    result = {}
    for name in tensors:
        if name.endswith(".in_sum2"):
            stem = name[: -len(".in_sum2")]
            counts = tensors[stem + ".counts"].reshape(-1)
            sums = tensors[name].reshape(len(counts), -1)
            result[stem] = np.where(counts[:, None] > 0, sums / np.where(counts > 0, counts, 1)[:, None],
                                    np.float32(1)).astype(np.float32)
    return result


def test_quantize_with_imatrix_writes_llama_quantizes_bytes_and_types(f16_and_imatrix, tmp_path):
    from fixtures.ggml_oracle import Ggml
    import gguf

    _, f16, imatrix = f16_and_imatrix
    out = tmp_path / "q4_0.gguf"
    result = swtool_in_process("quantize", f16, "-o", out, "--type", "q4_0", "--imatrix", imatrix,
                               "--sw-handling", "none", "--no-progress", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["importance"]["source"] == "imatrix" and summary["importance"]["file"] == str(imatrix)
    importance = gguf_py_importance(imatrix)
    source = {t.name: t for t in gguf.GGUFReader(str(f16)).tensors}
    written = gguf.GGUFReader(str(out))
    ggml = Ggml()
    checked = 0
    for tensor in written.tensors:
        # llama-quant.cpp: with an imatrix, Q4_0's ffn_down of layers < n/8 (= 1) is Q4_1
        if tensor.name.endswith("ffn_down.weight"):
            expected_type = "Q4_1" if tensor.name == "blk.0.ffn_down.weight" else "Q4_0"
            assert tensor.tensor_type.name == expected_type, tensor.name
        if tensor.tensor_type not in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1):
            continue
        values = np.asarray(source[tensor.name].data, dtype=np.float32).reshape(-1, int(tensor.shape[0]))
        weights = importance.get(tensor.name)
        expected = ggml.quantize(values, tensor.tensor_type, None if weights is None else weights[0])
        assert np.array_equal(np.asarray(tensor.data).view(np.uint8).reshape(-1), expected.reshape(-1)), tensor.name
        checked += weights is not None
    assert checked >= 8 * 6  # q, k, v, o, gate, up of every layer (and down where Q4_0/Q4_1)
    fields = {name: field.contents() for name, field in written.fields.items()}
    assert fields["quantize.imatrix.file"] == str(imatrix)
    assert fields["quantize.imatrix.entries_count"] == len(importance)
    assert fields["swtool.importance.source"].startswith("imatrix: ")
    assert fields["swtool.importance.sha256"] == digest(im.read_imatrix(imatrix))


def test_default_and_none_and_the_dat_form(f16_and_imatrix, tmp_path):
    """Without options a GGUF that records nothing is scanned and its importance comes from the scan;
    --importance none is the stock file (no swtool.importance keys, ffn_down of layer 0 stays Q4_0);
    the same matrix as .dat quantizes to the same bytes (its values are sum / count x ncall / ncall)."""
    import gguf

    _, f16, imatrix = f16_and_imatrix
    default = swtool_in_process("quantize", f16, "-o", tmp_path / "default.gguf", "--type", "q4_0", "--no-progress",
                                "--json")
    assert default.returncode == 0, default.stderr
    assert json.loads(default.stdout)["importance"]["source"] == "scan"
    plain = swtool_in_process("quantize", f16, "-o", tmp_path / "plain.gguf", "--type", "q4_0", "--importance", "none",
                              "--no-progress", "--json")
    assert json.loads(plain.stdout)["importance"] is None
    reader = gguf.GGUFReader(str(tmp_path / "plain.gguf"))
    assert not any(name.startswith("swtool.importance") for name in reader.fields)
    assert {t.name: t.tensor_type.name for t in reader.tensors}["blk.0.ffn_down.weight"] == "Q4_0"
    dat = tmp_path / "imatrix.dat"
    im.write_imatrix_dat(dat, im.read_imatrix(imatrix))
    for path, name in ((imatrix, "gguf"), (dat, "dat")):
        assert swtool_in_process("quantize", f16, "-o", tmp_path / f"{name}.gguf", "--type", "q4_0", "--imatrix", path,
                                 "--sw-handling", "none", "--no-progress").returncode == 0
    a, b = (gguf.GGUFReader(str(tmp_path / f"{n}.gguf")) for n in ("gguf", "dat"))
    for x, y in zip(a.tensors, b.tensors):
        assert np.array_equal(np.asarray(x.data), np.asarray(y.data)), x.name


def test_the_default_takes_no_pass_of_its_own_when_a_scan_runs(f16_and_imatrix, tmp_path, monkeypatch):
    """A scan: the importance comes from its pass (imatrix.collect is never called); --catalog: the catalog's
    prompts in one collect pass, with a note; --no-scan: none, with a note."""
    from swtool.gguf_export import ExportOptions, export

    directory = f16_and_imatrix[0]
    catalog = tmp_path / "catalog.json"
    assert swtool_in_process("scan", directory, "-o", catalog, "--prompt", "Apple", "--prompt", "a longer prompt here",
                             "--no-progress").returncode == 0
    calls = []
    real = im.collect
    monkeypatch.setattr(im, "collect", lambda *args, **kwargs: calls.append(args[1]) or real(*args, **kwargs))
    scanned = export(directory, tmp_path / "a.gguf", ExportOptions("q4_0", progress=False))
    assert scanned.importance.source == "scan" and calls == []
    listed = export(directory, tmp_path / "b.gguf", ExportOptions("q4_0", progress=False, catalog=str(catalog)))
    recorded = [p["tokens"] for p in json.loads(catalog.read_text())["detection"]["prompts"]]
    assert listed.importance.source == "catalog" and calls == [recorded]
    assert any("one more pass over the weights" in note for note in listed.notes)
    plain = export(directory, tmp_path / "c.gguf", ExportOptions("q4_0", progress=False, scan=False))
    assert plain.importance is None and any("quantized without importance" in note for note in plain.notes)


def test_text_importance_is_llama_imatrixs_chunks_of_the_text(f16_and_imatrix, tmp_path):
    """--importance text:FILE: whole chunks of 512 tokens (the tiny byte tokenizer: 1,300 characters give 2),
    the same matrix as `swtool imatrix --text FILE --ctx 512` (its digest)."""
    directory = f16_and_imatrix[0]
    text = tmp_path / "text.txt"
    text.write_text(open(im.__file__.replace("swtool/imatrix.py", "fixtures/prose.txt")).read()[:1300])
    result = swtool_in_process("export", directory, "-o", tmp_path / "t.gguf", "--type", "q4_0", "--importance",
                               f"text:{text}", "--no-scan", "--no-progress", "--json")
    assert result.returncode == 0, result.stderr
    used = json.loads(result.stdout)["importance"]
    assert (used["source"], used["tokens"]) == ("text", 2 * 512)
    assert swtool_in_process("imatrix", directory, "--text", text, "-o", tmp_path / "i.gguf",
                             "--no-progress").returncode == 0
    assert used["sha256"] == digest(im.read_imatrix(tmp_path / "i.gguf"))


def test_q8_0_and_float_types_use_and_record_no_importance(f16_and_imatrix, tmp_path):
    """Their quantizers do not read one: nothing is computed, recorded or reported; an --imatrix file is
    recorded all the same, as llama-quantize records it whatever the type."""
    import gguf

    _, f16, imatrix = f16_and_imatrix
    for kind, extra in (("q8_0", ()), ("f32", ()), ("q8_0", ("--imatrix", imatrix))):
        out = tmp_path / f"{kind}-{len(extra)}.gguf"
        result = swtool_in_process("quantize", f16, "-o", out, "--type", kind, *extra, "--no-progress", "--json")
        assert result.returncode == 0, result.stderr
        recorded = [name for name in gguf.GGUFReader(str(out)).fields
                    if name.startswith(("swtool.importance", "quantize.imatrix"))]
        if extra:
            assert json.loads(result.stdout)["importance"]["source"] == "imatrix" and len(recorded) == 6
        else:
            assert json.loads(result.stdout)["importance"] is None and recorded == []


def test_bad_importance_is_one_line(f16_and_imatrix, tmp_path):
    directory, f16, imatrix = f16_and_imatrix
    out = tmp_path / "x.gguf"
    assert "not both" in one_line_error(swtool_in_process("quantize", f16, "-o", out, "--type", "q4_0", "--imatrix",
                                                          imatrix, "--importance", "none"))
    assert "--importance 'every'" in one_line_error(swtool_in_process("export", directory, "-o", out, "--type", "q4_0",
                                                                      "--importance", "every"))
    wrong = tmp_path / "wrong.gguf"
    im.write_imatrix_gguf(wrong, im.Importance({"blk.0.attn_q.weight": im.Entry(np.ones((1, 7)), np.ones(1, int))},
                                               ["x"], 1, 512))
    assert "7 values" in one_line_error(swtool_in_process("quantize", f16, "-o", out, "--type", "q4_0", "--imatrix",
                                                          wrong, "--no-scan"))
    assert not out.exists()


# --- SmolLM2: the must-show ---------------------------------------------------------------------------

# The thresholds (KLD <= 0.20, perplexity <= 25.9 against stock 0.306, 28.50 and F16 23.56 on its
# held-out text) scaled to fixtures/prose.txt, where llama-quantize's Q4_0 scores KLD 0.259, perplexity 18.65
# and the F16 file 17.18: KLD <= 0.259 x 0.20 / 0.306 = 0.169; perplexity <= 17.18 + (18.65 - 17.18) x
# (25.9 - 23.56) / (28.50 - 23.56) = 17.87. Measured (bench/importance.py): 0.148, 17.19, +1.09 % bytes.
KLD_LIMIT, PPL_LIMIT = 0.169, 17.87


def test_smollm2_default_q4_0_beats_llama_quantize_in_llama_cpp(smollm2, smollm2_export, smollm2_llama_quantized,
                                                                 llama_logits, tmp_path):
    """`swtool export --type q4_0` with its defaults against llama-quantize's Q4_0 (llama_model_quantize of the
    F16 file, no imatrix), both scored in llama.cpp on fixtures/prose.txt (its 2 full windows of 512) against
    the F16 file's distributions: within the issue's thresholds (scaled above), at most 2 % more bytes."""
    import llama_cpp  # noqa: F401  (the llama_cpp lane)
    from bench.importance import score
    from fixtures.llama_oracle import perplexity_of_logits
    from swtool import llama_score
    from swtool.evaluate import read_text
    from swtool.tokenizer import encode

    files = {"f16": smollm2_export("f16"), "llama-quantize": smollm2_llama_quantized("q4_0"),  # of that f16 file
             "swtool default": tmp_path / "default.gguf"}
    # in process: the same command (test_cli.py runs `swtool export` as a real process)
    result = swtool_in_process("export", smollm2, "-o", files["swtool default"], "--type", "q4_0", "--no-progress")
    assert result.returncode == 0, result.stderr
    ids = encode(smollm2, read_text(smollm2.parents[1] / "prose.txt"))
    windows = llama_score.windows(ids, 512, 2)
    # the F16 file's distributions: llama.cpp's logits of it on these windows, decoded once per run (conftest's
    # llama_logits, llama-cpp-python with the same context and batch of 512 and one thread as llama_score.load)
    # and shared with test_export.py, which judges the same file on the same windows
    reference = llama_logits(files["f16"], windows)
    results = score(files, windows, 512, (reference, *perplexity_of_logits(windows, reference)))
    stock, ours = results["llama-quantize"], results["swtool default"]
    assert ours["bytes"] <= 1.02 * stock["bytes"]
    assert ours["kld"]["mean"] <= KLD_LIMIT and ours["perplexity"] <= PPL_LIMIT, (ours, stock)
    # the stock file does not meet them: the test can fail
    assert stock["kld"]["mean"] > KLD_LIMIT and stock["perplexity"] > PPL_LIMIT


def test_scan_importance_guards_the_super_weights_input_columns_in_smollm2(smollm2, tmp_path):
    """docs/gguf.md "What importance does to the super weights' blocks": on SmolLM2's blk.11.ffn_down, libggml's
    Q4_0 with the importance of the scan's 9-token prompt (`swtool imatrix --prompt`, read by gguf-py) keeps the
    two super weights as exact as without one (Q4_0's scale is the block's largest value / -8), and rounds
    their input columns, whose massive activations dominate the importance, with a smaller error over the
    other 575 rows (measured: -23 %)."""
    from gguf import GGMLQuantizationType as T
    from safetensors import safe_open

    from fixtures.ggml_oracle import Ggml

    importance_file = tmp_path / "scan.imatrix.gguf"
    result = swtool_in_process("imatrix", smollm2, "--prompt", "Apple Inc. is a worldwide tech company.",
                               "-o", importance_file, "--no-progress")
    assert result.returncode == 0, result.stderr
    importance = gguf_py_importance(importance_file)["blk.11.ffn_down.weight"][0]
    with safe_open(str(smollm2 / "model.safetensors"), framework="pt") as checkpoint:
        source = checkpoint.get_tensor("model.layers.11.mlp.down_proj.weight").float().numpy()
    assert sorted(np.argsort(importance)[-2:].tolist()) == [1229, 1487]  # the layer's super weights' columns
    ggml = Ggml()
    plain, weighted = (ggml.dequantize(ggml.quantize(source, T.Q4_0, weights), T.Q4_0, source.shape)
                       for weights in (None, importance))
    row = 507
    for col in (1229, 1487):  # the layer's super weights (docs/audit.md)
        for stored in (plain, weighted):
            assert abs(stored[row, col] / source[row, col] - 1) < 1e-3
        column_error = [np.sqrt(np.mean(np.delete(stored[:, col] - source[:, col], row) ** 2))
                        for stored in (plain, weighted)]
        assert column_error[1] < 0.85 * column_error[0], column_error

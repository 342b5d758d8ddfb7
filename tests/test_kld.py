"""KL divergence as llama.cpp's `llama-perplexity --kl-divergence` reports it (swtool/kld.py), in
`swtool sweep` (each GGUF in llama.cpp against the source) and `swtool eval --kld-reference`.

  - the statistics against an independent computation: torch.nn.functional.kl_div (log_target) for the
    per-prediction KLD, and a transcription of perplexity.cpp's percentile, median, "± e" and
    "Same top p" for the summary;
  - sweep on SmolLM2 (f16 and q2_k, one window of 512): the source's distributions from transformers and
    each file's from llama-cpp-python (fixtures/llama_oracle.py), compared by torch, give the sweep's
    numbers; f16's KLD is tiny and q2_k's large;
  - eval: a model against itself is exactly 0 and 100 % same top; each world of a comparison (tiny Llama,
    its planted super weight removed) and SmolLM2 with its super weights zeroed match transformers;
  - a reference with another vocabulary, or that tokenizes the text otherwise, is one line, exit 2.
"""

import json
import shutil

import numpy as np
import pytest

from fixtures.cli_run import one_line_error, swtool_in_process
from swtool import kld as kld_module
from swtool.errors import SwtoolError
from swtool.kld import statistics, token_kld

SMOLLM2_SUPER_WEIGHTS = ("2:507:90", "2:507:430", "11:507:1229", "11:507:1487")


# --- the statistics, against torch and perplexity.cpp --------------------------------------------------------

def torch_kld(reference_logits, logits):
    """Per position sum_i P_i (log P_i - log Q_i), by torch in float64: kl_div(input=log Q, target=log P)."""
    import torch

    log_p = torch.log_softmax(torch.as_tensor(np.asarray(reference_logits), dtype=torch.float64), dim=-1)
    log_q = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=-1)
    return torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).numpy()


def llama_cpp_summary(values, same):
    """perplexity.cpp's kl_divergence() summary, transcribed: mean_and_uncertainty, the percentile
    lambda on the sorted values, the median of the two middle values, Same top p."""
    values = sorted(float(v) for v in values)
    n = len(values)

    def percentile(fraction):
        if fraction <= 0:
            return values[0]
        if fraction >= 1:
            return values[-1]
        p = fraction * (n - 1)
        ip = int(p)
        p -= ip
        return (1 - p) * values[ip] + p * values[min(ip + 1, n - 1)]

    mean = sum(values) / n
    df = sum(v * v for v in values) / n - mean * mean
    df = (df / (n - 1)) ** 0.5 if df > 0 and n > 10 else 0.0
    median = 0.5 * (values[n // 2] + values[n // 2 - 1]) if n % 2 == 0 else values[n // 2]
    return {"mean": mean, "mean_uncertainty": df, "median": median, "p90": percentile(0.9),
            "p99": percentile(0.99), "max": values[-1], "same_top": sum(bool(s) for s in same) / n, "predictions": n}


def random_logits(rng, n, vocab, spread):
    return (rng.standard_normal((n, vocab)) * spread).astype(np.float32)


@pytest.mark.parametrize("n", [7, 200, 201])  # few values (no ± e), an even and an odd count
def test_statistics_are_torch_and_llama_cpps(n):
    rng = np.random.default_rng(n)
    reference = random_logits(rng, n, 1000, 3.0)
    logits = reference + random_logits(rng, n, 1000, 0.5)
    values, same = token_kld(reference, logits)
    expected = torch_kld(reference, logits)
    np.testing.assert_allclose(values, expected, rtol=1e-12, atol=0)  # measured: 1e-15
    np.testing.assert_array_equal(same, reference.argmax(1) == logits.argmax(1))
    assert 0 < same.mean() < 1
    got = statistics(values, same).to_json()
    want = llama_cpp_summary(expected, same)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=0), key


def test_against_itself_is_exactly_zero_and_every_top_agrees():
    rng = np.random.default_rng(0)
    reference = random_logits(rng, 50, 4000, 10.0)
    values, same = token_kld(reference, reference.copy())
    assert (values == 0).all() and same.all()
    stats = statistics(values, same)
    assert (stats.mean, stats.p99, stats.maximum, stats.same_top) == (0.0, 0.0, 0.0, 1.0)


def test_extreme_logits_stay_finite_and_exact():
    """Logits of 1e4 and -1e30 (a masked token): the float64 log-softmax takes the maximum out first,
    so nothing overflows, a probability of 0 adds 0, and the values are still torch's."""
    reference = np.array([[1e4, 0.0, -1e30, 5.0], [-3.0, -3.0, -3.0, -3.0], [80.0, 90.0, 100.0, -1e30]], np.float32)
    logits = np.array([[1e4 - 1, 2.0, 1.0, 5.0], [-3.0, -3.0, -1e30, -5.0], [100.0, 90.0, 80.0, 0.0]], np.float32)
    values, same = token_kld(reference, logits)
    assert np.isfinite(values).all()
    np.testing.assert_allclose(values, torch_kld(reference, logits), rtol=1e-12, atol=1e-300)
    assert same.tolist() == [True, True, False]  # ties: the first maximum, as llama.cpp's strict >


def test_blocks_give_the_same_values(monkeypatch):
    rng = np.random.default_rng(3)
    reference, logits = random_logits(rng, 37, 300, 2.0), random_logits(rng, 37, 300, 2.0)
    whole, _ = token_kld(reference, logits)
    monkeypatch.setattr(kld_module, "BLOCK_ELEMENTS", 300 * 5)  # 5 positions at a time, the last block 2
    blocked, _ = token_kld(reference, logits)
    np.testing.assert_array_equal(whole, blocked)


def test_mismatched_shapes_are_refused():
    with pytest.raises(SwtoolError, match=r"logits of shape \(3, 5\) against a reference of shape \(3, 4\)"):
        token_kld(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(SwtoolError, match="no prediction"):
        statistics([], [])


# --- sweep: llama.cpp's distributions against the source's ---------------------------------------------------

@pytest.fixture(scope="module")
def prose(smollm2):
    return smollm2.parents[1] / "prose.txt"


@pytest.fixture(scope="module")
def kld_sweep(smollm2_sweep):
    """(JSON with the rows of handling none, files, table) of conftest's smollm2_sweep, shared with
    test_sweep.py: f16 and q2_k, one window of 512, files kept."""
    result, files, stdout, _ = smollm2_sweep
    return dict(result, rows=[row for row in result["rows"] if row["handling"] == "none"]), files, stdout


@pytest.fixture(scope="module")
def source_logits(smollm2_prose_logits):
    """transformers' float32 logits of SmolLM2 on the first 512 tokens of the text (its tokenizer's):
    conftest's smollm2_prose_logits, computed once per run."""
    return smollm2_prose_logits


def test_sweep_kld_is_torchs_on_llama_cpps_and_transformers_distributions(kld_sweep, source_logits, llama_logits):
    """Each file loaded again in llama-cpp-python, its logits on the window against transformers' logits
    of the source: torch's KLD gives the sweep's statistics."""
    result, files, _ = kld_sweep
    window, reference = source_logits
    by_type = {row["type"]: row for row in result["rows"]}
    for qtype, tolerance in (("f16", 5e-3), ("q2_k", 5e-6)):
        # llama_oracle.window_logits of the file on the window, decoded once per run (conftest's llama_logits):
        # test_sweep.py scores the same files on the same window
        logits = np.array(llama_logits(files / f"smollm2-{qtype}-none.gguf", [window])[0])  # writable, for torch
        values = torch_kld(reference[:511], logits)
        same = reference[:511].argmax(1) == logits.argmax(1)
        want, got = llama_cpp_summary(values, same), by_type[qtype]["kld"]
        assert got["predictions"] == want["predictions"] == 511
        for key in ("mean", "median", "p90", "p99", "max"):
            # the source is swtool's pass there, transformers here: f16's KLD (1.6e-6) is small enough for
            # their float32 difference to show (measured rel gaps: mean 1.3e-4, median 2.4e-3, max 1.7e-3);
            # q2_k's is not (measured: mean 9e-8, at most 2.0e-6 over the statistics)
            assert got[key] == pytest.approx(want[key], rel=tolerance), (qtype, key, got[key], want[key])
        assert got["same_top"] == want["same_top"], qtype


def test_sweep_f16_is_nearly_the_source_and_q2_k_is_not(kld_sweep):
    """Measured on prose.txt, first window: f16 mean KLD 1.6e-6 (99 %: 6.8e-6, max 4.1e-5), same top 100 %;
    q2_k mean 1.71 (99 %: 6.84, max 15.1), same top 42.9 %."""
    result, _, table = kld_sweep
    by_type = {row["type"]: row["kld"] for row in result["rows"]}
    f16, q2_k = by_type["f16"], by_type["q2_k"]
    assert f16["mean"] < 1e-5 and f16["p99"] < 1e-4 and f16["same_top"] == 1.0
    assert q2_k["mean"] > 1.0 and q2_k["p99"] > 3.0 and q2_k["same_top"] < 0.6
    assert q2_k["median"] <= q2_k["p90"] <= q2_k["p99"] <= q2_k["max"]
    lines = table.splitlines()
    assert lines[1].split()[-5:] == ["KLD", "KLD", "99%", "same", "top"]
    q2_k_line = next(line for line in lines if line.startswith("q2_k"))
    assert q2_k_line.split()[-4:] == [f"{q2_k['mean']:.4g}", f"{q2_k['p99']:.4g}", f"{100 * q2_k['same_top']:.2f}",
                                      "%"]
    assert any(line.startswith("KLD: KL divergence of llama.cpp's next-token distributions") for line in lines)


# --- eval --kld-reference ------------------------------------------------------------------------------------

def eval_json(*args):
    result = swtool_in_process("eval", *args, "--no-progress", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_eval_of_a_model_against_itself_is_zero(smollm2, prose):
    data = eval_json(smollm2, "--text", prose, "--max-tokens", 256, "--ctx", 128, "--kld-reference", smollm2)
    (world,) = data["worlds"]
    assert world["kld"]["predictions"] == world["predictions"] == 254
    assert (world["kld"]["mean"], world["kld"]["max"], world["kld"]["same_top"]) == (0.0, 0.0, 1.0)
    assert data["kld_reference"] == {"model": str(smollm2), "perplexity": world["perplexity"], "predictions": 254}


def test_eval_zeroed_super_weights_are_transformers(smollm2, prose, source_logits):
    """SmolLM2 with its four super weights zeroed against itself intact, second halves of two chunks of 256:
    transformers zeroing the same weights gives the same KLD (measured rel gaps: mean 8e-8, at most 1.2e-6
    over the statistics; same top 1.18 % in both)."""
    import torch
    import transformers

    zero = [a for sw in SMOLLM2_SUPER_WEIGHTS for a in ("--zero", sw)]
    data = eval_json(smollm2, "--text", prose, "--max-tokens", 512, "--ctx", 256, "--score-second-half", *zero,
                     "--kld-reference", smollm2)
    got = data["worlds"][0]["kld"]
    window, _ = source_logits
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    values, same = [], []
    with torch.no_grad():
        chunks = torch.tensor([window[:256], window[256:]])
        intact = model(chunks).logits[:, 128:255].reshape(-1, model.config.vocab_size).numpy()
        for sw in SMOLLM2_SUPER_WEIGHTS:
            layer, row, col = map(int, sw.split(":"))
            model.model.layers[layer].mlp.down_proj.weight[row, col] = 0.0
        removed = model(chunks).logits[:, 128:255].reshape(-1, model.config.vocab_size).numpy()
    values, same = torch_kld(intact, removed), intact.argmax(1) == removed.argmax(1)
    want = llama_cpp_summary(values, same)
    assert got["predictions"] == want["predictions"] == 254
    for key in ("mean", "median", "p90", "p99", "max"):
        assert got[key] == pytest.approx(want[key], rel=5e-6), (key, got[key], want[key])
    assert got["same_top"] == want["same_top"]
    assert want["mean"] > 5  # removing the super weights moves every distribution far (measured 10.0)


def test_eval_each_world_against_the_reference(good, tmp_path):
    """A comparison on the tiny Llama: `original` is the reference itself (0), `removed` is transformers'
    KLD with the planted super weight zeroed, and the table shows the columns."""
    import torch
    import transformers

    from swtool.tokenizer import encode

    data = eval_json(good.model, "--text", good.text, "--ctx", 32, "--catalog", good.catalog, "--sweep", "0,2",
                     "--kld-reference", good.sharded)
    worlds = {w["name"]: w["kld"] for w in data["worlds"]}
    assert worlds["original"]["mean"] == 0.0 and worlds["original"]["same_top"] == 1.0
    ids = encode(good.model, good.text.read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(good.model, dtype=torch.float32)
    n_chunks = -(-len(ids) // 32)
    with torch.no_grad():
        def logits():
            return [model(torch.tensor([ids[i * 32:(i + 1) * 32]])).logits[0, :-1].numpy() for i in range(n_chunks)]
        intact = np.concatenate(logits())
        from fixtures.bad_files import PLANT_ARGS

        layer, row, col = PLANT_ARGS
        model.model.layers[layer].mlp.down_proj.weight[row, col] = 0.0
        removed = np.concatenate(logits())
    want = llama_cpp_summary(torch_kld(intact, removed), intact.argmax(1) == removed.argmax(1))
    assert worlds["removed"]["predictions"] == want["predictions"] == len(ids) - n_chunks
    for key in ("mean", "median", "p99", "max"):  # measured rel gaps 1.3e-6 (mean) to 4.2e-6 (median)
        assert worlds["removed"][key] == pytest.approx(want[key], rel=1e-5), key
    assert worlds["removed"]["same_top"] == want["same_top"]  # measured 0 in both: without it no prediction keeps its top token
    assert worlds["removed"]["mean"] > 0 and worlds["scale 2"]["mean"] > 0
    table = swtool_in_process("eval", good.model, "--text", good.text, "--ctx", 32, "--kld-reference", good.model,
                              "--no-progress").stdout.splitlines()
    assert table[1].split()[4:9] == ["KLD", "KLD", "99%", "same", "top"]
    assert table[3].split()[4:7] == ["0", "0", "100.00"]


def test_hostile_references_are_one_line(good, tmp_path):
    """Another vocabulary (the GGUF of good has a byte vocabulary), a tokenizer that cuts the text
    otherwise (a BOS added), a missing or non-model reference: one line, exit 2, before any pass."""
    bos = tmp_path / "with-bos"
    shutil.copytree(good.model, bos)
    (bos / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "e"}))
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    cases = [
        (good.gguf, "--kld-reference " + str(good.gguf) + ": another vocabulary than the model's"),
        (bos, "its tokenizer cuts the text into other tokens than the model's (from token 0 on)"),
        (tmp_path / "missing", "missing: no such file or directory"),
        (not_a_model, "notes.txt: expected a directory or a .safetensors file"),
    ]
    for reference, message in cases:
        result = swtool_in_process("eval", good.model, "--text", good.text, "--ctx", 32, "--kld-reference", reference,
                                   "--no-progress")
        assert result.returncode == 2, result.stderr
        assert message in one_line_error(result), (reference, result.stderr)

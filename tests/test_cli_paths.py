"""Command-line paths no other test runs: several `--batch-tokens` passes, `--score-second-half`,
`--scale-super` other than 0, `quantsim --no-weights`, `scan --max-iter / --spike-ratio`, `audit
--known-id` and disputed entries, `ablate --json`, ablating a stacked expert and a Conv1D element,
and outputs never replaced without --force. Each result is checked against transformers, the
file's own bytes, or the planted model, not against swtool."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from swtool.cli import main
from swtool.known import load as SHIPPED_KNOWN_TABLE
from fixtures.tiny import Plant, stacked_copy

PLANT = Plant(1, 41, 101)
DOWN = "model.layers.1.mlp.down_proj.weight"
TEXT = ("The super weight is one scalar. Zeroing it wrecks the model, the paper says, and a "
        "control of larger weights does not. ") * 2  # 239 byte tokens with BOS: 8 chunks of 32, the last partial
CTX = 32


def invoke(*args):
    """The CLI in this process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def invoke_json(*args):
    code, stdout, stderr = invoke(*args, "--json")
    assert code == 0, stderr
    return json.loads(stdout)


def one_line(code, stderr):
    """The one `error: ...` line of a run refused as bad input (exit 2)."""
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr)
    return lines[0]


def planted_model(tiny_factory, tmp_path_factory, **overrides):
    """A tiny bf16 Llama with one planted super weight, its scan catalog, and a text of 239 tokens."""
    directory, _ = tiny_factory("llama", "bfloat16", plants=(PLANT,), **overrides)
    root = tmp_path_factory.mktemp("paths")
    catalog, text = root / "catalog.json", root / "text.txt"
    code, _, stderr = invoke("scan", directory, "-o", catalog, "--no-progress")
    assert code == 0, stderr
    assert [(sw["layer"], sw["row"], sw["col"]) for sw in json.loads(catalog.read_text())["super_weights"]] == \
        [(PLANT.layer, PLANT.row, PLANT.col)]
    text.write_text(TEXT)
    return directory, catalog, text


@pytest.fixture(scope="module")
def planted(tiny_factory, tmp_path_factory):
    return planted_model(tiny_factory, tmp_path_factory)


@pytest.fixture(scope="module")
def wide(tiny_factory, tmp_path_factory):
    """The same with weights drawn 2.5 times wider: large enough inputs that int8 rounding, and keeping
    the super activation out of it, move the perplexity far beyond the tolerances."""
    return planted_model(tiny_factory, tmp_path_factory, initializer_range=0.05)


def reference_model(directory, scale=1.0):
    """transformers' float32 model, the planted super weight multiplied by `scale` by hand."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        model.get_parameter(DOWN)[PLANT.row, PLANT.col] *= scale
    return model


def text_ids(directory, text):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(directory) / "tokenizer.json")).encode(text).ids


def reference_perplexity(model, ids, ctx, first_scored=0):
    """(perplexity, predictions): each chunk of `ids` alone through transformers, the predictions at
    positions p >= first_scored scored (transformers' cross-entropy over those positions)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), ctx):
            chunk = torch.tensor([ids[start:start + ctx]])
            logits = model(chunk).logits[0, first_scored:-1]
            targets = chunk[0, first_scored + 1:]
            if len(targets):
                nll += torch.nn.functional.cross_entropy(logits.double(), targets, reduction="sum").item()
                count += len(targets)
    return float(np.exp(nll / count)), count


def reference_peaks(model, ids, ctx):
    """Max |down_proj output| per layer over every chunk, from forward hooks."""
    peaks = np.zeros(len(model.model.layers))

    def hook(layer):
        def record(module, inputs, output):
            peaks[layer] = max(peaks[layer], output.abs().max().item())
        return record

    handles = [layer.mlp.down_proj.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for start in range(0, len(ids), ctx):
            model(torch.tensor([ids[start:start + ctx]]))
    for handle in handles:
        handle.remove()
    return peaks


# --- eval -------------------------------------------------------------------------------------------------

def test_eval_in_several_passes_equals_one_pass_and_transformers(planted, bars_drawn):
    """--batch-tokens 64 with two worlds (original, removed) of 32-token chunks: one chunk per pass,
    eight passes; every number equals the one-pass run's and transformers'."""
    directory, catalog, text = planted
    args = ("eval", directory, "--text", text, "--ctx", CTX, "--catalog", catalog)
    code, stdout, progress = invoke(*args, "--batch-tokens", 64, "--json")  # the progress bar on stderr
    assert code == 0, progress
    passes = {line for line in progress.replace("\r", "\n").split("\n") if line.startswith("eval pass ")}
    assert {line.split(" (")[0] for line in passes} == {f"eval pass {i}/8" for i in range(1, 9)}
    several = json.loads(stdout)
    one = invoke_json(*args, "--no-progress")
    ids = text_ids(directory, TEXT)
    assert several["chunks"] == one["chunks"] == 8 and several["tokens"] == len(ids) == 239
    for scale, a, b in zip((1.0, 0.0), several["worlds"], one["worlds"]):
        # BLAS sums the batch rows in other blocks, so float32 results differ in their last bits
        assert a["predictions"] == b["predictions"]
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-7)  # measured 1.1e-8
        assert a["stop_word_probability"] == pytest.approx(b["stop_word_probability"], rel=1e-7)  # 1e-8
        np.testing.assert_allclose(a["peak_down_proj_output"], b["peak_down_proj_output"], rtol=2e-6)  # 2e-7
        model = reference_model(directory, scale)
        expected, count = reference_perplexity(model, ids, CTX)
        assert a["predictions"] == count == 239 - 8
        assert a["perplexity"] == pytest.approx(expected, rel=1e-7)  # measured 1e-8
        np.testing.assert_allclose(a["peak_down_proj_output"], reference_peaks(model, ids, CTX), rtol=5e-6)  # 8e-7


def test_eval_score_second_half_is_transformers_loss_on_those_positions(planted):
    """Each 32-token chunk scores only its predictions from position 16 on (llama-perplexity's convention)."""
    directory, _, text = planted
    result = invoke_json("eval", directory, "--text", text, "--ctx", CTX, "--score-second-half", "--no-progress")
    (world,) = result["worlds"]
    ids = text_ids(directory, TEXT)
    model = reference_model(directory)
    expected, count = reference_perplexity(model, ids, CTX, first_scored=CTX // 2)
    assert world["predictions"] == count == 7 * 15  # the partial last chunk (15 tokens) has no second half
    assert world["perplexity"] == pytest.approx(expected, rel=1e-7)  # measured 1e-8
    every, _ = reference_perplexity(model, ids, CTX)
    assert abs(expected / every - 1) > 1e-4  # scoring every position would not pass


@pytest.mark.parametrize("scale", [2.0, -1.0])
def test_eval_scale_super_is_transformers_with_the_weight_scaled_by_hand(planted, scale):
    directory, catalog, text = planted
    result = invoke_json("eval", directory, "--text", text, "--ctx", CTX, "--catalog", catalog,
                         f"--scale-super={scale}", "--no-progress")
    assert result["super_weights_scaled_by"] == scale
    (world,) = result["worlds"]
    assert world["weights_edited"] == 1
    ids = text_ids(directory, TEXT)
    scaled = reference_model(directory, scale)
    expected, _ = reference_perplexity(scaled, ids, CTX)
    assert world["perplexity"] == pytest.approx(expected, rel=1e-7)  # measured 1e-8
    peaks = reference_peaks(scaled, ids, CTX)
    np.testing.assert_allclose(world["peak_down_proj_output"], peaks, rtol=5e-6)  # measured 8e-7
    intact, _ = reference_perplexity(reference_model(directory), ids, CTX)
    assert abs(expected / intact - 1) > 1e-4  # the scaling matters at this precision


# --- quantsim ---------------------------------------------------------------------------------------------

def quantized_reference(directory, bits, block, zscore=None):
    """transformers' model with every decoder matrix quantized as the paper's quantize_blockwise does
    it (flat blocks of W [out, in], min-max to 2^bits - 1 steps, torch.round). Super-weight-aware
    (`zscore` given): each block's |w| first clamped to zscore * std + mean of the block's |w|
    (statistics in float64), and the planted super weight written back at its original value."""
    model = reference_model(directory)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim != 2 or not name.startswith("model.layers."):
                continue
            blocks = param.detach().reshape(-1, block).clone()
            if zscore:
                magnitude = blocks.abs().double()
                limit = (zscore * magnitude.std(dim=1, keepdim=True) + magnitude.mean(dim=1, keepdim=True)).float()
                blocks = torch.clamp(blocks, -limit, limit)
            low, high = blocks.min(dim=1, keepdim=True).values, blocks.max(dim=1, keepdim=True).values
            scale = (2 ** bits - 1) / (high - low)
            quantized = ((blocks - low) * scale).round() / scale + low
            if zscore and name == DOWN:
                quantized.view(param.shape)[PLANT.row, PLANT.col] = param[PLANT.row, PLANT.col]
            param.copy_(quantized.reshape(param.shape))
    return model


def int8_input_hooks(model, keep):
    """Pre-hooks on every decoder linear: SmoothQuant's per-tensor absmax int8 fake quantization of
    its input, one sequence per call; with `keep`, down_proj's super activation (the largest |x| of
    column PLANT.col of the super weight's layer) is replaced by the input's median first and
    written back after."""
    def hook(module, inputs, name):
        x = inputs[0].clone()
        saved = None
        if keep and name == DOWN[:-len(".weight")]:
            token = int(x[0, :, PLANT.col].abs().argmax())
            saved = (token, x[0, token, PLANT.col].item())
            x[0, token, PLANT.col] = x.flatten().quantile(0.5)
        step = x.abs().max() / 127
        x = (x / step).round() * step
        if saved:
            x[0, saved[0], PLANT.col] = saved[1]
        return (x,)

    return [module.register_forward_pre_hook(lambda m, i, name=name: hook(m, i, name))
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")]


def activation_references(directory, ids):
    """Perplexity unquantized, with int8 linear inputs, and with the super activation kept."""
    model, found = reference_model(directory), []
    for keep in (None, False, True):
        hooks = [] if keep is None else int8_input_hooks(model, keep)
        found.append(reference_perplexity(model, ids, CTX)[0])
        for handle in hooks:
            handle.remove()
    return found


def test_quantsim_in_several_passes_equals_one_pass_and_transformers(wide, bars_drawn):
    """Weights (RTN and super-weight-aware, blocks of 32) and int8 activations (three worlds), one
    32-token chunk per pass (eight passes per setting) against one pass and transformers."""
    directory, catalog, text = wide
    args = ("quantsim", directory, "--text", text, "--ctx", CTX, "--catalog", catalog, "--block-sizes", "32",
            "--clip", "zscore:2", "--activations", "int8", "--no-progress")
    code, stdout, progress = invoke(*args[:-1], "--batch-tokens", CTX, "--json")  # the progress bar on stderr
    assert code == 0 and "eval pass 8/8 (3 worlds x 1 chunk)" in progress  # the activation worlds
    assert "eval pass 8/8 (1 world x 1 chunk)" in progress  # each weight setting
    several, one = json.loads(stdout), invoke_json(*args)
    ids = text_ids(directory, TEXT)
    weights = [s["perplexity"] for s in several["weights"]["settings"]]
    activations = [s["perplexity"] for s in several["activations"]["settings"]]
    # one pass and eight: measured gaps 7e-9 (weights), 0 (activations); transformers: 1.3e-8 at most
    assert weights == pytest.approx([s["perplexity"] for s in one["weights"]["settings"]], rel=1e-7)
    assert activations == pytest.approx([s["perplexity"] for s in one["activations"]["settings"]], rel=1e-7)
    rtn, aware = (reference_perplexity(quantized_reference(directory, 4, 32, zscore), ids, CTX)[0]
                  for zscore in (None, 2.0))
    assert weights == pytest.approx([rtn, aware], rel=1e-7)
    assert activations == pytest.approx(activation_references(directory, ids), rel=1e-7)
    results = weights + activations  # every setting moves the result far beyond the tolerance
    assert min(abs(a / b - 1) for i, a in enumerate(results) for b in results[i + 1:]) > 1e-5


def test_quantsim_no_weights_runs_only_the_activation_worlds(wide):
    directory, catalog, text = wide
    args = ("quantsim", directory, "--text", text, "--ctx", CTX, "--catalog", catalog, "--activations", "int8",
            "--no-weights", "--no-progress")
    result = invoke_json(*args)
    assert "weights" not in result
    rows = result["activations"]["settings"]
    assert [s["setting"] for s in rows] == ["unquantized", "int8", "int8, super activation kept"]
    assert result["activations"]["super_activation"] == [{"linear": DOWN, "col": PLANT.col}]
    ids = text_ids(directory, TEXT)
    assert [s["perplexity"] for s in rows] == pytest.approx(activation_references(directory, ids), rel=1e-7)  # 8e-9
    assert result["baseline"]["perplexity"] == rows[0]["perplexity"]
    code, table, _ = invoke(*args)
    assert code == 0 and "activations: INT8" in table and "weights:" not in table and "RTN" not in table


# --- scan --max-iter, --spike-ratio -----------------------------------------------------------------------

PROMPT = "Apple Inc. is a worldwide tech company."  # scan's default prompt
# two super weights in layer 1, in rows 20 and 50: a pass traces only the largest output of a layer,
# so the second is seen only once the first is zeroed
TWO_ROWS = (Plant(1, 20, 33, value=4.0), Plant(1, 50, 90, channel=9, value=2.0))


def down_proj_outputs(model, ids):
    """Per layer, down_proj's output [tokens, hidden] on `ids`, and the residual stream after each layer."""
    outputs = {}
    handles = [layer.mlp.down_proj.register_forward_hook(
        lambda module, inputs, output, i=i: outputs.__setitem__(i, output[0].detach().clone()))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for handle in handles:
        handle.remove()
    return [outputs[i] for i in range(len(outputs))], [h[0] for h in hidden[1:]]


def largest_row(output):
    return int(output.abs().max(dim=0).values.argmax())


@pytest.fixture(scope="module")
def two_rows(tiny_factory):
    directory, _ = tiny_factory("llama", "float32", plants=TWO_ROWS)
    return directory


def scanned(directory, *options):
    catalog = invoke_json("scan", directory, "--no-progress", *options)
    return catalog, [(sw["layer"], sw["row"], sw["col"], sw["iteration"]) for sw in catalog["super_weights"]]


def test_scan_max_iter_stops_after_that_many_passes(two_rows):
    model = transformers.AutoModelForCausalLM.from_pretrained(two_rows).eval()
    ids = text_ids(two_rows, PROMPT)
    outputs, _ = down_proj_outputs(model, ids)
    assert largest_row(outputs[1]) == 20
    with torch.no_grad():
        model.get_parameter(DOWN)[20, 33] = 0.0
    assert largest_row(down_proj_outputs(model, ids)[0][1]) == 50  # what the second pass sees
    catalog, found = scanned(two_rows)
    assert found == [(1, 20, 33, 1), (1, 50, 90, 2)]
    catalog, found = scanned(two_rows, "--max-iter", 1)
    assert found == [(1, 20, 33, 1)]
    assert catalog["detection"]["settings"]["max_iter"] == 1
    code, table, _ = invoke("scan", two_rows, "--max-iter", 1, "--no-progress")
    assert code == 0 and "with the super weight removed" in table  # per prompt, with the default prompt set


def test_scan_spike_ratio_is_against_the_median_layer(two_rows):
    """Layer 1's max |down_proj output| over the median layer's, and its residual value over the
    median channel of its token, both from transformers: a ratio just below both finds the super
    weight; one above the layer's ratio finds nothing, and says so."""
    model = transformers.AutoModelForCausalLM.from_pretrained(two_rows).eval()
    outputs, residual = down_proj_outputs(model, text_ids(two_rows, PROMPT))
    peaks = np.array([out.abs().max().item() for out in outputs])
    layer_ratio = peaks[1] / np.median(peaks)
    token = int(outputs[1].abs().max(dim=1).values.argmax())
    channel_ratio = residual[1][token, 20].abs().item() / np.median(residual[1][token].abs().numpy())
    assert layer_ratio > channel_ratio > 10  # the default ratio finds it (the test above)
    _, found = scanned(two_rows, "--spike-ratio", 0.99 * channel_ratio)
    assert found[0] == (1, 20, 33, 1)
    catalog, found = scanned(two_rows, "--spike-ratio", 1.01 * layer_ratio)
    assert found == [] and catalog["detection"]["nll_all_removed"] is None
    assert catalog["detection"]["settings"]["spike_ratio"] == pytest.approx(1.01 * layer_ratio)
    code, table, _ = invoke("scan", two_rows, "--spike-ratio", 1.01 * layer_ratio, "--no-progress")
    assert code == 0
    assert table.splitlines()[1] == ("no super weight found: no down_proj output spike creates a persistent "
                                     "massive activation")


# --- audit --known-id, disputed entries --------------------------------------------------------------------

SMOL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def stored_value(directory, tensor, index):
    """One stored weight, read by the safetensors library (through torch, which holds bf16)."""
    from safetensors import safe_open

    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if tensor in f.keys():
                return f.get_tensor(tensor)[tuple(index)].float().item()
    raise KeyError(tensor)


@pytest.mark.real
def test_audit_known_id_holds_smollm2_to_its_published_coordinates(smollm2):
    from swtool import known

    published = known.by_id(SMOL_ID).super_weights
    code, stdout, stderr = invoke("audit", smollm2, "--known-id", SMOL_ID, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["verdict"] == "intact" and report["known_model"] == SMOL_ID
    assert report["expectations"] == f"the known coordinates of {SMOL_ID} (named)"
    assert [(f["layer"], f["row"], f["col"]) for f in report["findings"]] == \
        [(sw["layer"], sw["row"], sw["col"]) for sw in published]
    for finding in report["findings"]:
        tensor = f"model.layers.{finding['layer']}.mlp.down_proj.weight"
        assert finding["status"] == "intact" and finding["tensor"] == tensor
        assert finding["value"] == stored_value(smollm2, tensor, (finding["row"], finding["col"]))


def with_known_entry(monkeypatch, entry):
    """The shipped known table with one more model, as swtool.known.load returns it."""
    from swtool import known

    def load():
        data, _ = SHIPPED_KNOWN_TABLE()
        data = {**data, "models": data["models"] + [entry]}
        return data, [known.KnownModel(m["name"], m["id"], m.get("aliases", []), m["fingerprint"], m["super_weights"],
                                       m.get("notes", "")) for m in data["models"]]

    monkeypatch.setattr(known, "load", load)


def test_audit_disputed_entries_are_reported_but_set_no_exit_code(planted, monkeypatch):
    """A known entry whose second coordinate is an ordinary weight (not an outlier of its row), flagged
    disputed as the shipped OLMo-1B-0724 entry is: reported with its conflict, exit 0; the same entry
    undisputed fails the audit (exit 1)."""
    from swtool import known

    directory, _, _ = planted
    (olmo,) = [m for m in known.load()[1] if m.id == "allenai/OLMo-1B-0724-hf"]
    (shipped_dispute,) = [sw for sw in olmo.super_weights if sw.get("disputed")]
    good = {"layer": PLANT.layer, "row": PLANT.row, "col": PLANT.col, "sources": ["repo"]}
    ordinary = {"layer": 2, "row": 3, "col": 5, "sources": ["repo"]}
    config = json.loads((directory / "config.json").read_text())
    entry = {"name": "tiny", "id": "swtool-tests/tiny-planted", "fingerprint": known.fingerprint_of(config),
             "super_weights": [good, {**ordinary, **{k: shipped_dispute[k] for k in ("disputed", "conflict")}}]}
    with_known_entry(monkeypatch, entry)
    code, table, stderr = invoke("audit", directory, "--known-id", entry["id"])
    assert code == 0, table + stderr
    rows = [line.split() for line in table.splitlines()]
    assert rows[3][:3] == ["1", "41", "101"] and "intact" in rows[3]
    assert rows[4][:3] == ["2", "3", "5"] and " ".join(rows[4]).count("not outlier (disputed)") == 1
    assert f"disputed [2, 3, 5]: {shipped_dispute['conflict']}" in table
    assert "1 intact, 1 not outlier: intact but for 1 disputed, not counted (tolerance 5%)" in table
    with_known_entry(monkeypatch, {**entry, "super_weights": [good, ordinary]})
    code, table, _ = invoke("audit", directory, "--known-id", entry["id"])
    assert code == 1 and "1 missing or damaged" in table


# --- ablate --json, stacked experts, Conv1D -----------------------------------------------------------------

def element_bytes(path, tensor, index):
    """(absolute byte offset, size, dtype) of tensor[index] in a safetensors file, from its header."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    entry = json.loads(raw[8:8 + n])[tensor]
    size = {"BF16": 2, "F16": 2, "F32": 4}[entry["dtype"]]
    flat = int(np.ravel_multi_index(tuple(index), entry["shape"]))
    return 8 + n + entry["data_offsets"][0] + flat * size, size, entry["dtype"]


def differing_bytes(a, b):
    """Positions where two files of equal length differ."""
    left, right = np.fromfile(a, np.uint8), np.fromfile(b, np.uint8)
    assert left.shape == right.shape
    return set(np.flatnonzero(left != right).tolist())


def test_ablate_json_lists_each_patch_as_the_files_hold_it(planted, tmp_path):
    directory, catalog, _ = planted
    out = tmp_path / "half"
    code, stdout, stderr = invoke("ablate", directory, "--catalog", catalog, "-o", out, "--scale", 0.5, "--json")
    assert code == 0, stderr
    (patch,) = json.loads(stdout)["patches"]
    (sw,) = json.loads(catalog.read_text())["super_weights"]
    offset, size, dtype = element_bytes(directory / "model.safetensors", DOWN, (PLANT.row, PLANT.col))
    old = (directory / "model.safetensors").read_bytes()[offset:offset + size]
    new = (out / "model.safetensors").read_bytes()[offset:offset + size]
    halved = torch.tensor(sw["value"], dtype=torch.bfloat16) * 0.5
    assert patch == {"layer": PLANT.layer, "row": PLANT.row, "col": PLANT.col, "expert": None, "tensor": DOWN,
                     "file": "model.safetensors", "offset": offset, "dtype": dtype, "old_bytes": old.hex(),
                     "new_bytes": new.hex(), "old_value": sw["value"], "new_value": halved.item()}
    assert dtype == "BF16" and sw["value"] == stored_value(directory, DOWN, (PLANT.row, PLANT.col)) == PLANT.value
    assert new == halved.view(torch.int16).numpy().tobytes()
    assert differing_bytes(directory / "model.safetensors", out / "model.safetensors") <= {offset, offset + 1}


# family, tensor holding the planted weight, and where the file stores W[row, col] of expert 2 / the Conv1D
STORED = {
    "mixtral": ("model.layers.1.mlp.experts.down_proj", (2, 41, 101)),  # transformers 5: [experts, out, in]
    "gpt2": ("transformer.h.1.mlp.c_proj.weight", (101, 41)),  # Conv1D: [in, out]
}


@pytest.mark.parametrize("family", list(STORED))
def test_ablate_changes_the_one_stored_scalar_of_a_stacked_expert_or_conv1d(family, tiny_factory, tmp_path):
    from safetensors.torch import load_file

    directory, _ = tiny_factory(family, "bfloat16", plants=(Plant(1, 41, 101, expert=2),))
    if family == "mixtral":
        directory = stacked_copy(directory, tmp_path / "stacked")
    tensor, index = STORED[family]
    catalog = tmp_path / "catalog.json"
    assert invoke("scan", directory, "-o", catalog, "--no-progress")[0] == 0
    (sw,) = json.loads(catalog.read_text())["super_weights"]
    assert (sw["layer"], sw["row"], sw["col"], sw["tensor"]) == (1, 41, 101, tensor)
    out = tmp_path / "ablated"
    code, stdout, stderr = invoke("ablate", directory, "--catalog", catalog, "-o", out, "--scale", -0.5, "--json")
    assert code == 0, stderr
    before, after = load_file(directory / "model.safetensors"), load_file(out / "model.safetensors")
    assert before[tensor][index].item() == 4.0 and after[tensor][index].item() == -2.0
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {tensor}
    differs = (before[tensor] != after[tensor]).nonzero().tolist()
    assert differs == [list(index)]
    offset, size, _ = element_bytes(directory / "model.safetensors", tensor, index)
    assert json.loads(stdout)["patches"][0]["offset"] == offset
    assert differing_bytes(directory / "model.safetensors", out / "model.safetensors") <= set(range(offset, offset + size))


# --- outputs never replaced without --force ------------------------------------------------------------------

def test_existing_plots_and_quantize_outputs_are_never_replaced_without_force(planted, good, tmp_path):
    """Each command refuses before any work, in one line, and leaves the file's bytes as they were;
    with --force the same run replaces it."""
    directory, catalog, text = planted
    existing = b"an earlier result, not to be lost\n"
    runs = {
        "eval.svg": ("eval", directory, "--text", text, "--ctx", CTX, "--plot"),
        "quantsim.svg": ("quantsim", directory, "--text", text, "--ctx", CTX, "--catalog", catalog,
                         "--block-sizes", "32", "--plot"),
        "scan.svg": ("scan", directory, "--plot"),
        "sweep.svg": ("sweep", directory, "--text", text, "--types", "q8_0", "--handlings", "none", "--plot"),
        "out.gguf": ("quantize", good.gguf, "--type", "q8_0", "-o"),
    }
    for name, args in runs.items():
        (tmp_path / name).write_bytes(existing)
        code, stdout, stderr = invoke(*args, tmp_path / name, "--no-progress")
        assert one_line(code, stderr) == f"error: {tmp_path / name}: already exists; pass --force to replace it"
        assert stdout == "" and (tmp_path / name).read_bytes() == existing, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(runs)  # no temporary left either
    for name in ("scan.svg", "out.gguf"):
        code, _, stderr = invoke(*runs[name], tmp_path / name, "--no-progress", "--force")
        assert code == 0, stderr
    assert b"<svg" in (tmp_path / "scan.svg").read_bytes()[:1000]
    assert (tmp_path / "out.gguf").read_bytes()[:4] == b"GGUF"

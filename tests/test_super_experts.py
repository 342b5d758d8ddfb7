"""Super experts (Su et al. 2025) in tiny Mixtral, Qwen3-MoE and OLMoE with a planted one: the scan lists
it by the paper's criterion, verifies it by removal against a control, and transformers, with the same
experts excluded from its own router, gives the removed-expert NLL, super activation and perplexity.

The planted super expert is fixtures/tiny.py's plant_mixtral: one expert of layer 2 whose gate/up rows
read the embedding's large channel and whose down projection has one large weight, with a router row
that sends every token to it; its down projection's output is hundreds where the others' are ~1.

Removing an expert in transformers (the oracle): torch.nn.functional.linear is wrapped so the product
with that layer's router weight has the expert's logit at -inf; transformers' own router then takes the
softmax, the top k and (Mixtral, Qwen3-MoE with norm_topk_prob) their renormalisation, as it always does.
"""

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from swtool.catalog import build_catalog, validate
from swtool.detect import Settings, scan
from swtool.forward import DropExpert, World, forward, mean_nll
from swtool.model import load_model
from swtool.tokenizer import DEFAULT_PROMPT, encode
from fixtures.tiny import Plant

PLANT = Plant(2, 41, 101, expert=2)
PROSE = Path(__file__).resolve().parents[1] / "fixtures" / "prose.txt"
FAMILIES = ["mixtral", "qwen3-moe", "olmoe"]


def hf_model(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@contextlib.contextmanager
def hf_without(model, experts):
    """transformers' `model` with these (layer, expert) pairs excluded from its routers' choice."""
    dropped = {}
    for layer, expert in experts:
        dropped.setdefault(id(model.model.layers[layer].mlp.gate.weight), []).append(expert)
    original = torch.nn.functional.linear

    def linear(x, weight, bias=None):
        out = original(x, weight, bias)
        if id(weight) in dropped:
            out = out.clone()
            out[..., dropped[id(weight)]] = -torch.inf
        return out

    torch.nn.functional.linear = linear
    try:
        yield model
    finally:
        torch.nn.functional.linear = original


def hf_run(model, tokens, experts=()):
    """(mean NLL of tokens[1:], hidden states after each layer [layers + 1, T, hidden]) in transformers."""
    ids = torch.tensor([list(tokens)])
    with hf_without(model, experts), torch.no_grad():
        out = model(ids, labels=ids, output_hidden_states=True)
    return float(out.loss), np.stack([h[0].numpy() for h in out.hidden_states])


def hf_expert_maxima(model, tokens):
    """{(layer, expert): max |down_proj output|} over the tokens transformers routes to each expert,
    computed here in torch from the layer's normalised input and transformers' routing."""
    maxima, inputs = {}, {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda module, args, i=i: inputs.__setitem__(i, args[0][0]))
             for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        model(torch.tensor([list(tokens)]))
        for hook in hooks:
            hook.remove()
        for i, h in inputs.items():
            mlp = model.model.layers[i].mlp
            _, _, chosen = mlp.gate(h)
            experts = mlp.experts
            for e in range(experts.num_experts):
                rows = (chosen == e).any(dim=-1)
                if not rows.any():
                    continue
                gate, up = torch.nn.functional.linear(h[rows], experts.gate_up_proj[e]).chunk(2, dim=-1)
                y = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
                maxima[i, e] = float(y.abs().max())
    return maxima


@pytest.fixture(scope="module", params=FAMILIES)
def planted(request, tiny_factory_module):
    directory, _ = tiny_factory_module(request.param, "float32", plants=(PLANT,))
    model = load_model(directory)
    tokens = encode(model.directory, DEFAULT_PROMPT)
    found, report = scan(model, tokens, Settings(DEFAULT_PROMPT))
    return request.param, directory, model, tokens, found, report


@pytest.fixture(scope="module")
def tiny_factory_module(tmp_path_factory):
    from fixtures.tiny import build_tiny

    built = {}

    def make(family, dtype, plants=()):
        if (family, plants) not in built:
            out = tmp_path_factory.mktemp(f"super-expert-{family}")
            built[family, plants] = (out, build_tiny(out, family, dtype, plants=plants))
        return built[family, plants]

    return make


def test_planted_super_expert_is_found_by_the_papers_criterion(planted):
    family, directory, _, tokens, _, report = planted
    section = report["super_experts"]
    (se,) = section["experts"]
    assert (se["layer"], se["expert"]) == (PLANT.layer, PLANT.expert)
    assert se["channel"] == PLANT.row  # its largest output is the planted weight's row
    # the criterion's measurements against transformers' experts (computed in torch from its routing)
    expected = hf_expert_maxima(hf_model(directory), tokens)
    assert section["experts_observed"] == len(expected)
    assert se["max_output"] == pytest.approx(expected[PLANT.layer, PLANT.expert], rel=1e-5)
    values = np.array(list(expected.values()))
    assert section["threshold"] == pytest.approx(np.percentile(values, 99.5), rel=1e-5)
    assert section["largest"] == pytest.approx(values.max(), rel=1e-5)
    others = sorted(v for at, v in expected.items() if at != (PLANT.layer, PLANT.expert))
    assert se["max_output"] > 100 * others[-1]  # planted: far above every other expert
    assert se["ratio"] == 1.0 and se["percentile"] == 100.0


def test_planted_super_expert_is_verified_by_removal_against_transformers(planted):
    """The NLL and super activation with the super expert removed, and with the control's expert removed,
    are transformers' with the same experts excluded from its router."""
    family, directory, _, tokens, _, report = planted
    section = report["super_experts"]
    (se,) = section["experts"]
    v = se["verification"]
    (control,) = [(c["layer"], c["expert"]) for c in section["control"]]
    assert control[0] == PLANT.layer and control[1] != PLANT.expert  # as many others, from the same layer
    model = hf_model(directory)
    at = (PLANT.layer + 1, se["token"], se["channel"])  # hidden_states[l + 1]: the residual after layer l
    for world, experts in (("intact", ()), ("removed", [(PLANT.layer, PLANT.expert)]), ("control", [control])):
        nll, hidden = hf_run(model, tokens, experts)
        assert v[f"nll_{world}"] == pytest.approx(nll, rel=1e-5), world
        assert v[f"super_activation_{world}"] == pytest.approx(abs(hidden[at]), rel=1e-4, abs=1e-4), world
    assert v["super_activation_intact"] > 100 and v["massive"]
    assert v["super_activation_removed"] < 1e-3 * v["super_activation_intact"]  # the expert made it
    assert v["super_activation_control"] == pytest.approx(v["super_activation_intact"], rel=1e-3)
    assert v["verified"] and v["verified_by"] == ["activation"]
    assert section["nll_all_removed"] == pytest.approx(v["nll_removed"], rel=1e-6)


def test_removal_world_matches_transformers_logits(planted):
    """A DropExpert world of the forward pass beside the intact one: each row is transformers'."""
    family, directory, model, tokens, _, _ = planted
    removed = [(PLANT.layer, PLANT.expert), (1, 0)]
    worlds = [World("intact"), World("removed", tuple(DropExpert(*at) for at in removed))]
    logits = forward(model, tokens, worlds)
    hf = hf_model(directory)
    for row, experts in zip(logits, ((), removed)):
        with hf_without(hf, experts), torch.no_grad():
            expected = hf(torch.tensor([list(tokens)])).logits[0].numpy()
        np.testing.assert_allclose(row, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert not np.allclose(logits[0], logits[1])
    assert mean_nll(logits, tokens).shape == (2,)


def test_catalog_section_is_valid_and_in_the_table(planted, tmp_path):
    from swtool.catalog import format_scan

    _, _, model, tokens, found, report = planted
    catalog = build_catalog(model, DEFAULT_PROMPT, tokens, Settings(DEFAULT_PROMPT), found, report)
    validate(json.loads(json.dumps(catalog)))
    assert catalog["super_experts"]["experts"][0]["expert"] == PLANT.expert
    table = format_scan(catalog)
    assert "super experts (Su et al. 2025" in table
    line = next(line for line in table.splitlines() if line.split()[:2] == [str(PLANT.layer), str(PLANT.expert)]
                and line.endswith("activation"))
    assert "100.0" in line


def test_random_mixture_lists_its_largest_expert_unverified(tiny_factory):
    """Without a plant the criterion still names the largest expert (fewer than 201 observed), and
    removing it neither collapses a massive activation nor raises the NLL: not verified."""
    directory, _ = tiny_factory("mixtral", "float32")
    model = load_model(directory)
    tokens = encode(model.directory, DEFAULT_PROMPT)
    found, report = scan(model, tokens, Settings(DEFAULT_PROMPT))
    assert found == []
    (se,) = report["super_experts"]["experts"]
    assert se["ratio"] == 1.0
    assert not se["verification"]["massive"] and not se["verification"]["verified"]


def test_dense_model_has_no_super_expert_section(tiny_factory):
    directory, _ = tiny_factory("llama", "float32", plants=(Plant(1, 20, 33),))
    model = load_model(directory)
    tokens = encode(model.directory, DEFAULT_PROMPT)
    _, report = scan(model, tokens, Settings(DEFAULT_PROMPT))
    assert report["super_experts"] is None
    catalog = build_catalog(model, DEFAULT_PROMPT, tokens, Settings(DEFAULT_PROMPT), *scan(model, tokens,
                                                                                            Settings(DEFAULT_PROMPT)))
    assert "super_experts" not in catalog


def hf_perplexity(directory, ids, ctx, experts=()):
    """exp(mean NLL) of `ids` in chunks of `ctx`, every prediction of a chunk scored, by transformers
    with `experts` excluded from its routers."""
    model, nll, count = hf_model(directory), 0.0, 0
    with hf_without(model, experts), torch.no_grad():
        for start in range(0, len(ids), ctx):
            chunk = torch.tensor([ids[start:start + ctx]])
            nll += model(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    return float(np.exp(nll / count)), count


def test_eval_drop_expert_perplexity_is_transformers(planted):
    """`eval --drop-expert` (repeatable) against transformers with the same experts excluded from its router;
    the super expert's removal takes the layer's peak down_proj output from hundreds to ordinary."""
    from tokenizers import Tokenizer

    from fixtures.cli_run import swtool_in_process

    family, directory, *_ = planted
    ctx, max_tokens = 64, 192
    ids = Tokenizer.from_file(str(directory / "tokenizer.json")).encode(PROSE.read_text()).ids[:max_tokens]

    def swtool_eval(*drops):
        args = [arg for drop in drops for arg in ("--drop-expert", drop)]
        out = swtool_in_process("eval", directory, "--text", PROSE, "--ctx", ctx, "--max-tokens", max_tokens,
                                "--json", "--no-progress", *args)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    intact = swtool_eval()
    assert "experts_dropped" not in intact
    removed = swtool_eval("2:2", "1:0")
    assert removed["experts_dropped"] == [[1, 0], [2, 2]]
    (world,), (intact_world,) = removed["worlds"], intact["worlds"]
    expected, count = hf_perplexity(directory, ids, ctx, [(2, 2), (1, 0)])
    assert world["predictions"] == count and world["weights_edited"] == 0
    assert world["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert intact_world["perplexity"] == pytest.approx(hf_perplexity(directory, ids, ctx)[0], rel=1e-5)
    assert abs(world["perplexity"] / intact_world["perplexity"] - 1) > 1e-4  # the removal shows at that tolerance
    assert intact_world["peak_down_proj_output"][2] > 100 > 10 * world["peak_down_proj_output"][2]


def test_drop_expert_bad_input_is_one_line(planted, tiny_factory):
    from fixtures.cli_run import one_line_error, swtool_in_process

    family, directory, *_ = planted
    cases = [("9:0", "the model has 4 layers"), ("2:4", "layer 2 has 4 experts"),
             ("2-1", "expected LAYER:EXPERT"), ("2:x", "expected LAYER:EXPERT")]
    if family == "qwen3-moe":
        cases.append(("3:0", "layer 3 is a dense MLP"))  # mlp_only_layers
    for drop, message in cases:
        assert message in one_line_error(swtool_in_process(
            "eval", directory, "--text", PROSE, "--max-tokens", 64, "--no-progress", "--drop-expert", drop)), drop
    many = [arg for e in (0, 1, 3) for arg in ("--drop-expert", f"2:{e}")]
    assert "leaves fewer than the 2" in one_line_error(swtool_in_process(
        "eval", directory, "--text", PROSE, "--max-tokens", 64, "--no-progress", *many))
    dense, _ = tiny_factory("llama", "float32")
    assert "not a mixture of experts" in one_line_error(swtool_in_process(
        "eval", dense, "--text", PROSE, "--max-tokens", 64, "--no-progress", "--drop-expert", "1:0"))


def test_audit_checks_the_super_experts_down_proj_row(planted, tmp_path):
    """audit reads back the super expert's down_proj row: intact as scanned; the row rescaled elsewhere
    than its largest weight is `changed` (its RMS), the row zeroed is `zeroed`; each a copy written by
    safetensors with only that row changed."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fixtures.cli_run import swtool_in_process

    family, directory, model, tokens, found, report = planted
    catalog = build_catalog(model, DEFAULT_PROMPT, tokens, Settings(DEFAULT_PROMPT), found, report)
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(catalog))
    (se,) = catalog["super_experts"]["experts"]
    row = se["down_proj_row"]
    assert (row["row"], row["col"], row["value"]) == (PLANT.row, PLANT.col, pytest.approx(PLANT.value))

    def audit(target):
        out = swtool_in_process("audit", target, "--catalog", path, "--json")
        data = json.loads(out.stdout)
        (finding,) = [f for f in data["findings"] if f["super_expert"]]
        return out.returncode, finding

    code, finding = audit(directory)
    assert code == 0 and finding["status"] == "intact"
    tensors = load_file(directory / "model.safetensors")
    weight = tensors[se["tensor"]]
    scanned_row = (weight[se["expert"], row["row"]] if weight.dim() == 3 else weight[row["row"]]).clone()
    assert int(scanned_row.abs().argmax()) == row["col"]
    scanned_row[row["col"]] = float("nan")
    expected_rms = float(torch.sqrt(torch.nanmean(torch.square(scanned_row))))  # the others
    assert finding["expected_row_rms"] == pytest.approx(expected_rms, rel=1e-6)
    for change, status in (("rescaled", "changed"), ("zeroed", "zeroed")):
        edited = {name: t.clone() for name, t in tensors.items()}
        matrix = edited[se["tensor"]][se["expert"]] if weight.dim() == 3 else edited[se["tensor"]]
        if change == "rescaled":
            keep = matrix[row["row"], row["col"]].item()
            matrix[row["row"]] *= 3.0
            matrix[row["row"], row["col"]] = keep  # its largest weight as scanned: only the RMS tells
        else:
            matrix[row["row"]] = 0.0
        copy = tmp_path / change
        shutil.copytree(directory, copy)
        save_file(edited, copy / "model.safetensors", metadata={"format": "pt"})
        code, finding = audit(copy)
        assert code == 1 and finding["status"] == status, (change, finding)
        assert finding["row_rms"] == pytest.approx(3 * expected_rms if change == "rescaled" else 0.0, rel=1e-3)


def test_ablate_drop_expert_zeroes_its_down_projection_and_restores(planted, tmp_path):
    """`ablate --drop-expert`: a copy whose only change is the expert's whole down projection, zeros,
    which transformers reads and whose perplexity swtool and transformers agree on; it is not router
    exclusion (the expert is still picked): eval --drop-expert scores differently. --in-place journals
    the matrix and --restore puts every byte back."""
    import shutil

    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from fixtures.cli_run import digests, swtool_in_process
    from swtool import schemas

    family, directory, model, tokens, found, report = planted
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps(build_catalog(model, DEFAULT_PROMPT, tokens, Settings(DEFAULT_PROMPT), found,
                                                report)))
    out = tmp_path / "ablated"
    result = swtool_in_process("ablate", directory, "--catalog", catalog, "--drop-expert", "2:2", "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    schemas.validate("ablate", described, "ablate --json")
    assert described["patches"] == [] and [(e["layer"], e["expert"]) for e in described["experts_zeroed"]] == [(2, 2)]
    before, after = load_file(directory / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)
    down = model.arch.down_proj_name(2, 2)
    for name in before:
        expected = before[name].clone()
        if name == down:
            (expected[2] if expected.dim() == 3 else expected).zero_()  # the one matrix ablate changes
        assert torch.equal(expected, after[name]), name

    ctx, max_tokens = 64, 192
    ids = Tokenizer.from_file(str(directory / "tokenizer.json")).encode(PROSE.read_text()).ids[:max_tokens]
    expected, _ = hf_perplexity(out, ids, ctx)  # transformers reading the copy
    result = swtool_in_process("eval", out, "--text", PROSE, "--ctx", ctx, "--max-tokens", max_tokens, "--json",
                               "--no-progress")
    (world,) = json.loads(result.stdout)["worlds"]
    assert world["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert world["peak_down_proj_output"][2] < 10  # the super expert's output is gone ...
    excluded, _ = hf_perplexity(directory, ids, ctx, [(2, 2)])
    assert abs(excluded / expected - 1) > 1e-4  # ... but the router still picks it: not the same model

    inplace = tmp_path / "inplace"
    shutil.copytree(directory, inplace)
    original = digests(inplace)
    result = swtool_in_process("ablate", inplace, "--catalog", catalog, "--drop-expert", "2:2", "--in-place")
    assert result.returncode == 0, result.stderr
    assert torch.equal(load_file(inplace / "model.safetensors")[down], after[down])
    result = swtool_in_process("ablate", inplace, "--restore")
    assert result.returncode == 0 and "and 1 expert" in result.stdout, result.stderr
    assert digests(inplace) == original


def test_stacked_layout_names_the_stacked_tensor_and_ablates_one_slice(tiny_factory_module, tmp_path):
    """transformers 5's stacked experts [experts, hidden, ff]: the super expert is slice 2 of
    mlp.experts.down_proj; audit reads [expert, row, col] there, ablate zeroes that slice alone."""
    from safetensors.torch import load_file

    from fixtures.cli_run import swtool_in_process
    from fixtures.tiny import stacked_copy

    per_expert, _ = tiny_factory_module("mixtral", "float32", plants=(PLANT,))
    directory = stacked_copy(per_expert, tmp_path / "stacked")
    catalog = tmp_path / "catalog.json"
    result = swtool_in_process("scan", directory, "--prompt", DEFAULT_PROMPT, "--no-progress", "-o", catalog)
    assert result.returncode == 0, result.stderr
    (se,) = json.loads(catalog.read_text())["super_experts"]["experts"]
    assert (se["layer"], se["expert"], se["tensor"]) == (2, 2, "model.layers.2.mlp.experts.down_proj")
    assert se["down_proj_row"]["tensor_index"] == [2, PLANT.row, PLANT.col]
    result = swtool_in_process("audit", directory, "--catalog", catalog)
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "ablated"
    assert swtool_in_process("ablate", directory, "--catalog", catalog, "--drop-expert", "2:2", "-o", out).returncode == 0
    before = load_file(directory / "model.safetensors")[se["tensor"]]
    after = load_file(out / "model.safetensors")[se["tensor"]]
    assert torch.count_nonzero(after[2]) == 0
    assert torch.equal(after[[0, 1, 3]], before[[0, 1, 3]])


def test_expert_that_cannot_be_removed_is_listed_unverified(tiny_factory):
    """Every token routed to all 4 experts (num_experts_per_tok 4): no expert can be removed, so the
    planted super expert is listed with no removal measured, and not verified; the scan still completes."""
    from swtool.catalog import format_scan

    directory, _ = tiny_factory("mixtral", "float32", plants=(PLANT,), num_experts_per_tok=4)
    model = load_model(directory)
    tokens = encode(model.directory, DEFAULT_PROMPT)
    found, report = scan(model, tokens, Settings(DEFAULT_PROMPT))
    section = report["super_experts"]
    (se,) = section["experts"]
    assert (se["layer"], se["expert"]) == (PLANT.layer, PLANT.expert) and section["control"] == []
    v = se["verification"]
    assert v["nll_removed"] is None and v["super_activation_removed"] is None and v["nll_control"] is None
    assert not v["verified"] and v["massive"]
    assert section["nll_all_removed"] is None
    catalog = build_catalog(model, DEFAULT_PROMPT, tokens, Settings(DEFAULT_PROMPT), found, report)
    validate(json.loads(json.dumps(catalog)))
    assert "-: not measured" in format_scan(catalog)

"""`swtool ablate`: patched copies that differ from the input only in the super weights' bytes,
loaded by transformers; in-place ablation that restores to identical files; one-line errors."""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from fixtures.tiny import Plant
from fixtures.cli_run import one_line_error, swtool_in_process

ROOT = Path(__file__).resolve().parents[1]
PROSE = ROOT / "fixtures" / "prose.txt"
PLANTS = (Plant(1, 20, 33), Plant(3, 50, 120, channel=20, from_embedding=False))
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4}


def sha256s(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())}


def header_offset(shard, tensor, index):
    """Byte offset of tensor[index] in a safetensors file, read from its header here, not by swtool."""
    with open(shard, "rb") as f:  # the header only, not the whole shard
        (n,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(n))[tensor]
    flat = int(np.ravel_multi_index(index, entry["shape"]))
    return 8 + n + entry["data_offsets"][0] + flat * DTYPE_BYTES[entry["dtype"]], DTYPE_BYTES[entry["dtype"]]


def bytes_at(path, offset, size):
    """The `size` bytes of a file at `offset` (without reading the whole file)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def cmp_bytes(a, b, chunk=1 << 26):
    """0-based positions where two equal-length files differ, compared a chunk at a time from their maps."""
    first, second = (np.memmap(path, np.uint8, mode="r") for path in (a, b))
    assert first.size == second.size, (a, b)
    return {start + int(i) for start in range(0, first.size, chunk)
            for i in np.flatnonzero(first[start:start + chunk] != second[start:start + chunk])}


def scan_catalog(model_dir, out):
    result = swtool_in_process("scan", model_dir, "-o", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    return json.loads(Path(out).read_text())


# --- SmolLM2: the real model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_catalog(smollm2_catalog):
    return smollm2_catalog


@pytest.mark.real
def test_ablated_smollm2_differs_only_in_the_super_weights_and_loads_in_transformers(smollm2, smol_catalog,
                                                                                       tmp_path):
    catalog = json.loads(smol_catalog.read_text())
    sws = catalog["super_weights"]
    assert len(sws) == 4
    before = sha256s(smollm2)
    out = tmp_path / "ablated"
    result = swtool_in_process("ablate", smollm2, "--catalog", smol_catalog, "-o", out)
    assert result.returncode == 0, result.stderr
    assert sha256s(smollm2) == before  # the input is never written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    # every file is there; only model.safetensors differs, and only in the super weights' bytes
    assert {p.name for p in out.iterdir()} == set(before) | {"swtool-ablation.json"}
    for name in before:
        if name != "model.safetensors":
            assert (out / name).read_bytes() == (smollm2 / name).read_bytes()
    expected = set()
    for sw in sws:
        offset, size = header_offset(smollm2 / "model.safetensors", sw["tensor"], (sw["row"], sw["col"]))
        expected |= set(range(offset, offset + size))
        assert bytes_at(out / "model.safetensors", offset, size) == b"\0\0"  # bf16 +0.0
    differing = cmp_bytes(smollm2 / "model.safetensors", out / "model.safetensors")
    assert differing and differing <= expected
    record = json.loads((out / "swtool-ablation.json").read_text())
    assert [(c["layer"], c["row"], c["col"]) for c in record["ablation"]["changes"]] == \
        [(sw["layer"], sw["row"], sw["col"]) for sw in sws]
    assert all(sw["value"] == 0.0 for sw in record["super_weights"])
    # transformers loads the copy: the super weights are zero, and its perplexity is swtool's --zero's
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for sw in sws:
        assert reference.get_parameter(sw["tensor"])[sw["row"], sw["col"]].item() == 0.0
    zero = [arg for sw in sws for arg in ("--zero", f"{sw['layer']}:{sw['row']}:{sw['col']}")]
    on_the_fly = eval_json(smollm2, *zero)
    of_the_copy = eval_json(out)
    assert of_the_copy["worlds"][0]["perplexity"] == pytest.approx(on_the_fly["worlds"][0]["perplexity"], rel=1e-6)
    ids = transformers.AutoTokenizer.from_pretrained(out)(PROSE.read_text())["input_ids"][:768]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 256):
            chunk = torch.tensor([ids[start:start + 256]])
            nll += reference(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    assert on_the_fly["worlds"][0]["predictions"] == count
    # measured gap: 8.6e-6 relative (a perplexity of 2e6, whose NLL's float32 error it multiplies)
    assert on_the_fly["worlds"][0]["perplexity"] == pytest.approx(np.exp(nll / count), rel=5e-5)
    assert on_the_fly["worlds"][0]["perplexity"] > 1000  # the model is wrecked


def eval_json(model, *args):
    """`swtool eval --json` of MODEL on 768 tokens in chunks of 256, run in this process (fixtures/cli_run.py:
    the same command, without starting Python and numba again; the entry point is test_cli.py's)."""
    result = swtool_in_process("eval", model, "--text", PROSE, "--ctx", 256, "--max-tokens", 768, "--json",
                               "--no-progress", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- tiny sharded models: dtypes, scales, links, in place -------------------------------------------

@pytest.fixture(scope="module", params=["bfloat16", "float16", "float32"])
def planted(request, tiny_factory, tmp_path_factory):
    """A sharded tiny model with two planted super weights, and the catalog its scan writes."""
    source, _ = tiny_factory("llama", request.param, plants=PLANTS, max_shard_size="40KB", num_hidden_layers=6)
    catalog_path = tmp_path_factory.mktemp("catalog") / "catalog.json"
    catalog = scan_catalog(source, catalog_path)
    assert {(sw["layer"], sw["row"], sw["col"]) for sw in catalog["super_weights"]} == \
        {(p.layer, p.row, p.col) for p in PLANTS}
    return source, catalog_path, getattr(torch, request.param)


@pytest.fixture
def sharded(planted, tmp_path):
    """A private copy of the planted model (tests patch it in place)."""
    source, catalog, dtype = planted
    shutil.copytree(source, tmp_path / "model")
    return tmp_path / "model", catalog, dtype


def test_scaled_copy_of_a_sharded_checkpoint(sharded, tmp_path):
    model, catalog, dtype = sharded
    out = tmp_path / "half"
    result = swtool_in_process("ablate", model, "--catalog", catalog, "-o", out, "--scale", "0.5", "--only", "3:50:120")
    assert result.returncode == 0, result.stderr
    assert "hard-linked" in result.stdout
    original = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    patched = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    name = "model.layers.3.mlp.down_proj.weight"
    old = original.get_parameter(name)[50, 120]
    # the stored value is torch's own rounding of value x 0.5 to the checkpoint's dtype
    assert patched.get_parameter(name)[50, 120].item() == (old.float() * 0.5).to(dtype).item() != old.item()
    changed = [n for n, p in patched.named_parameters() if not torch.equal(p, original.get_parameter(n))]
    assert changed == [name]
    # unchanged shards are hard links, the one holding the element a patched copy; the rest byte for byte
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    for path in model.iterdir():
        copy = out / path.name
        assert copy.read_bytes() == path.read_bytes() or path.name == index[name]
        if path.name.endswith(".safetensors"):
            assert (copy.stat().st_ino == path.stat().st_ino) == (path.name != index[name])
    offset, size = header_offset(model / index[name], name, (50, 120))
    assert cmp_bytes(model / index[name], out / index[name]) <= set(range(offset, offset + size))
    # --copy: no links at all
    copied = tmp_path / "copied"
    assert swtool_in_process("ablate", model, "--catalog", catalog, "-o", copied, "--copy").returncode == 0
    assert all((copied / p.name).stat().st_ino != p.stat().st_ino for p in model.iterdir())


def test_in_place_and_restore_round_trip(sharded):
    model, catalog, _ = sharded
    before = sha256s(model)
    result = swtool_in_process("ablate", model, "--catalog", catalog, "--in-place")
    assert result.returncode == 0, result.stderr
    assert (model / "swtool-ablation-journal.json").is_file()
    after = sha256s(model)
    changed = {name for name in before if before[name] != after.get(name)}
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    assert changed == {index[f"model.layers.{p.layer}.mlp.down_proj.weight"] for p in PLANTS}
    reference = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    for p in PLANTS:
        assert reference.get_parameter(f"model.layers.{p.layer}.mlp.down_proj.weight")[p.row, p.col].item() == 0.0
    # ablating again is refused (the values no longer match the catalog, and a journal exists)
    assert "already" in one_line_error(swtool_in_process("ablate", model, "--catalog", catalog, "--in-place"))
    result = swtool_in_process("ablate", model, "--restore")
    assert result.returncode == 0, result.stderr
    assert sha256s(model) == before  # identical bytes, journal gone
    assert "nothing was ablated in place" in one_line_error(swtool_in_process("ablate", model, "--restore"))


def test_restore_refuses_bytes_changed_since(sharded):
    model, catalog, _ = sharded
    assert swtool_in_process("ablate", model, "--catalog", catalog, "--in-place", "--only", "1:20:33").returncode == 0
    change = json.loads((model / "swtool-ablation-journal.json").read_text())["changes"][0]
    shard = model / change["file"]
    data = bytearray(shard.read_bytes())
    data[change["offset"]] ^= 0x55
    shard.write_bytes(bytes(data))
    assert "changed since the ablation" in one_line_error(swtool_in_process("ablate", model, "--restore"))


DAMAGED_JOURNAL_ENTRIES = {  # an entry changed since the ablation, field by field
    "old_bytes": lambda change: bytes([int(change["old_bytes"][:2], 16) ^ 1]).hex() + change["old_bytes"][2:],
    "dtype": lambda change: "BF16" if change["dtype"] == "F16" else "F16",
    "old_value": lambda change: change["old_value"] + 1.0,
}


@pytest.mark.parametrize("field", DAMAGED_JOURNAL_ENTRIES)
def test_restore_refuses_a_journal_whose_original_bytes_disagree_with_its_record(sharded, field):
    """--restore writes the journal's original bytes: an entry changed since (its bytes, dtype or value)
    is refused, the shard left as the ablation made it (found by tests/test_fuzz_inputs.py::test_journal)."""
    model, catalog, _ = sharded
    assert swtool_in_process("ablate", model, "--catalog", catalog, "--in-place", "--only", "1:20:33").returncode == 0
    journal_path = model / "swtool-ablation-journal.json"
    journal = json.loads(journal_path.read_text())
    journal["changes"][0][field] = DAMAGED_JOURNAL_ENTRIES[field](journal["changes"][0])
    journal_path.write_text(json.dumps(journal))
    before = sha256s(model)
    assert "disagree with the value recorded" in one_line_error(swtool_in_process("ablate", model, "--restore"))
    assert sha256s(model) == before


def test_bad_input_is_one_line_and_touches_nothing(tiny_factory, tmp_path):
    source, _ = tiny_factory("llama", "bfloat16", plants=PLANTS[:1], num_hidden_layers=6)
    model = tmp_path / "model"
    shutil.copytree(source, model)
    catalog = tmp_path / "catalog.json"
    scan_catalog(model, catalog)
    other, _ = tiny_factory("llama", "bfloat16", plants=PLANTS[1:], num_hidden_layers=6)
    before = sha256s(model)
    (tmp_path / "exists").mkdir()
    cases = [
        (("-o", tmp_path / "exists"), "already exists"),
        (("-o", model / "sub"), "inside the input model's directory"),
        ((), "exactly one of -o OUTDIR and --in-place"),
        (("-o", tmp_path / "a", "--in-place"), "exactly one of -o OUTDIR and --in-place"),
        (("-o", tmp_path / "b", "--only", "3:4:5"), "--only 3:4:5 is not in the catalog"),
        (("-o", tmp_path / "c", "--only", "1-20-33"), "expected LAYER:ROW:COL"),
        (("-o", tmp_path / "d", "--scale", "nan"), "--scale must be a finite number"),
    ]
    for args, message in cases:
        assert message in one_line_error(swtool_in_process("ablate", model, "--catalog", catalog, *args))
    assert "--catalog is required" in one_line_error(swtool_in_process("ablate", model, "-o", tmp_path / "e"))
    assert "no such file" in one_line_error(swtool_in_process("ablate", model, "--catalog", tmp_path / "none.json",
                                                   "-o", tmp_path / "f"))
    # the catalog of another model: the element does not hold the catalog's value
    assert "the catalog says" in one_line_error(swtool_in_process("ablate", other, "--catalog", catalog, "-o", tmp_path / "g"))
    assert sha256s(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.json", "exists", "model"]

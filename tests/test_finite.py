"""NaN and Inf weights are counted per tensor (swtool/finite.py) and a scan of such a model completes and flags them.

The expected counts come from NumPy on the values as the safetensors library (through torch)
and gguf-py's dequantizer read them, not from swtool's reader.
"""

import json
import math

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import swtool.finite as finite
from swtool.checkpoint.gguf_file import read_gguf
from swtool.checkpoint.safetensors import SafetensorsFile


def planted(shape, seed, nan=(), pos_inf=(), neg_inf=()):
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    flat = values.reshape(-1)
    flat[list(nan)], flat[list(pos_inf)], flat[list(neg_inf)] = np.nan, np.inf, -np.inf
    return values


def expected_counts(values):
    return int(np.isnan(values).sum()), int(np.isinf(values).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk", [finite.CHUNK_ELEMENTS, 100])  # one read, and many row chunks
def test_safetensors_counts_match_numpy(dtype, chunk, tmp_path, monkeypatch):
    monkeypatch.setattr(finite, "CHUNK_ELEMENTS", chunk)
    tensors = {"matrix": planted((37, 64), 0, nan=[0, 5, 2367], pos_inf=[64], neg_inf=[100, 2000]),
               "vector": planted((64,), 1, nan=[63]), "clean": planted((8, 8), 2)}
    tensors["big"] = planted((9, 16), 3) * np.float32(1e5)  # finite in f32, +-Inf once stored as f16
    path = tmp_path / "model.safetensors"
    save_file({name: torch.from_numpy(value).to(dtype) for name, value in tensors.items()}, str(path))
    stored = {name: value.to(torch.float32).numpy() for name, value in load_file(str(path)).items()}
    header = SafetensorsFile(path)
    for name in tensors:
        assert finite.count_nonfinite(header[name]) == expected_counts(stored[name]), name
    assert expected_counts(stored["matrix"]) == (3, 3)
    if dtype == torch.float16:  # the planted values, and the overflow of f16's range, both counted
        assert expected_counts(stored["big"])[1] > 0


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0,
                                   gguf.GGMLQuantizationType.Q4_0])
def test_gguf_counts_match_gguf_py(qtype, tmp_path):
    """Block types: a NaN or Inf spoils its block's scale, so the whole block dequantizes non-finite."""
    matrix = planted((6, 64), 4, nan=[3], pos_inf=[200])
    vector = planted((64,), 5, neg_inf=[40])
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    expected = {}
    for name, value in (("matrix", matrix), ("vector", vector)):
        with np.errstate(all="ignore"):
            data = gguf.quants.quantize(value, qtype)
            expected[name] = expected_counts(gguf.quants.dequantize(data, qtype))
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = read_gguf(path)
    for name in ("matrix", "vector"):
        with np.errstate(all="ignore"):
            assert finite.count_nonfinite(header.tensors[name]) == expected[name], name
    assert sum(expected["matrix"]) > 0 and sum(expected["vector"]) > 0


def test_scan_of_a_model_with_nan_completes_flags_and_writes_standard_json(good, tmp_path):
    from fixtures import bad_files
    from click.testing import CliRunner

    from swtool.catalog import read_catalog
    from swtool.cli import main

    (case,) = [c for c in bad_files.nonfinite_cases(good, tmp_path) if c.name == "nan-weight"]
    out = tmp_path / "catalog.json"
    result = CliRunner().invoke(main, case.argv + ["-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "WARNING: 1 tensor holds non-finite weights" in result.stdout

    def refuse(constant):
        raise AssertionError(f"{constant} in the catalog: not standard JSON")

    catalog = json.loads(out.read_text(), parse_constant=refuse)
    assert catalog["nonfinite_weights"] == [{"tensor": "model.layers.2.self_attn.q_proj.weight", "nan": 1, "inf": 0}]
    assert catalog["detection"]["nll_intact"] is None  # NaN logits: written as null
    profile = catalog["profile"]
    assert all(math.isfinite(entry["residual"]["value"]) for entry in profile[:2])  # before the NaN's layer
    assert all(entry["residual"]["value"] is None for entry in profile[2:])
    assert read_catalog(out)["nonfinite_weights"] == catalog["nonfinite_weights"]


def test_check_finite_on_a_clean_model_reports_nothing(good):
    from click.testing import CliRunner

    from swtool.cli import main

    result = CliRunner().invoke(main, ["scan", str(good.model), "--json", "--no-progress", "--check-finite"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["nonfinite_weights"] == []
    assert "warning" not in result.stderr


def test_check_finite_finds_a_nan_the_prompt_never_reaches(good, tmp_path):
    """A NaN in the embedding row of a token the prompt does not hold leaves every activation finite,
    so only --check-finite's read of every weight can find it; without the flag the scan does not look."""
    import shutil

    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from swtool.cli import main

    model = tmp_path / "unused-row-nan"
    shutil.copytree(good.model, model)
    tensors = load_file(str(model / "model.safetensors"))
    unused = tensors["model.embed_tokens.weight"].shape[0] - 1  # a byte-level id above every byte and special
    tensors["model.embed_tokens.weight"][unused, 5] = float("nan")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})

    def scan(*flags):
        result = CliRunner().invoke(main, ["scan", str(model), "--json", "--no-progress", *flags])
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout), result.stderr

    checked, warned = scan("--check-finite")
    assert checked["nonfinite_weights"] == [{"tensor": "model.embed_tokens.weight", "nan": 1, "inf": 0}]
    assert "warning:" in warned and "model.embed_tokens.weight (1 NaN)" in warned
    assert unused not in checked["detection"]["tokens"]
    assert math.isfinite(checked["detection"]["nll_intact"])  # the prompt never met the NaN
    unchecked, quiet = scan()
    assert not unchecked.get("nonfinite_weights") and "warning" not in quiet
    assert unchecked["super_weights"] == checked["super_weights"] != []

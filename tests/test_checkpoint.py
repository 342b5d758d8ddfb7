"""The safetensors reader: exact decoding of each dtype, and clear errors for bad files."""

import json
import struct
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from swtool.checkpoint import open_checkpoint, write_safetensors
from swtool.checkpoint.safetensors import SafetensorsFile
from swtool.errors import CheckpointError


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decodes_exactly_what_torch_stores(tmp_path, dtype):
    values = torch.randn(37, 19, generator=torch.Generator().manual_seed(0)) * 3
    values[0, 0] = 1e30 if dtype != torch.float16 else 6e4
    save_file({"w": values.to(dtype)}, tmp_path / "x.safetensors")
    info = SafetensorsFile(tmp_path / "x.safetensors")["w"]
    expected = values.to(dtype).float().numpy()
    np.testing.assert_array_equal(info.read(), expected)
    np.testing.assert_array_equal(info.read(rows=[5, 2, 36]), expected[[5, 2, 36]])
    np.testing.assert_array_equal(info.read(rows=slice(10, 20)), expected[10:20])


def test_writer_rounds_bf16_like_torch_and_safetensors_reads_it(tmp_path):
    values = torch.randn(64, 33, generator=torch.Generator().manual_seed(1)).numpy()
    edge = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4028235e38, np.inf, -np.inf, 1e-40, -0.0],
                    dtype=np.float32)  # ties to even, overflow to inf, infinities, a denormal, -0
    values[0, : len(edge)] = edge
    write_safetensors(tmp_path / "w.safetensors", {"a": ("BF16", values), "b": ("F16", values)}, {"format": "pt"})
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / "w.safetensors")
    assert torch.equal(loaded["a"].view(torch.int16), torch.from_numpy(values).to(torch.bfloat16).view(torch.int16))
    assert torch.equal(loaded["b"], torch.from_numpy(values).to(torch.float16))


def test_element_offset_points_at_the_element(tmp_path):
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_safetensors(tmp_path / "w.safetensors", {"a": ("F32", values)})
    info = SafetensorsFile(tmp_path / "w.safetensors")["a"]
    with open(tmp_path / "w.safetensors", "rb") as f:
        f.seek(info.element_offset((2, 1)))
        assert struct.unpack("<f", f.read(4))[0] == 9.0


def write_raw(path, header, data=b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize("header, data, message", [
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
    ({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, b"\0" * 16, "is 24 bytes but data_offsets span 16"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24, "overlap"),
    ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "unknown dtype"),
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, "shape"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, b"\0" * 16, "data_offsets"),
    ({"w": [1, 2]}, b"", "entry is not an object"),
])
def test_bad_headers_are_clear_errors(tmp_path, header, data, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=message) as raised:
        SafetensorsFile(path)
    assert str(path) in str(raised.value)


def test_corrupt_header_bytes(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json!")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SafetensorsFile(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds"):
        SafetensorsFile(path)
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(path)
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        SafetensorsFile(path)


def make_sharded(tmp_path):
    a = np.ones((4, 4), np.float32)
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"x": ("F32", a)})
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"y": ("BF16", a * 2)})
    index = {"metadata": {"total_size": 96},
             "weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text("{}")
    return index


def test_sharded_directory_reads_every_shard(tmp_path):
    make_sharded(tmp_path)
    checkpoint = open_checkpoint(tmp_path)
    assert sorted(checkpoint.names()) == ["x", "y"]
    np.testing.assert_array_equal(checkpoint.tensor("y").read(), np.full((4, 4), 2, np.float32))
    with pytest.raises(CheckpointError, match="missing tensor 'z'"):
        checkpoint.tensor("z")


def test_a_shard_name_is_quoted_so_its_error_stays_one_line(tmp_path):
    index = make_sharded(tmp_path)
    index["weight_map"]["y"] = "model-00002\nof-00002.safetensors"  # a name no shard on disk has
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as raised:
        open_checkpoint(tmp_path)
    assert "\n" not in str(raised.value)
    assert str(raised.value).endswith("missing shard 'model-00002\\nof-00002.safetensors' (listed in the index)")


def test_missing_shard_and_missing_indexed_tensor(tmp_path):
    index = make_sharded(tmp_path)
    index["weight_map"]["z"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'z' is listed in 'model-00002-of-00002.safetensors' but that shard lacks it"):
        open_checkpoint(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard 'model-00002-of-00002.safetensors'"):
        open_checkpoint(tmp_path)


def test_directory_without_weights_or_config(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", {"x": ("F32", np.zeros(2, np.float32))})
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(tmp_path)


def _mapped(path):
    """Is `path` memory-mapped in this process now? (Linux lists the maps in /proc/self/maps.)"""
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(str(path)) for line in maps)


@pytest.mark.skipif(sys.platform != "linux", reason="reads this process's maps from Linux's /proc/self/maps")
def test_a_view_held_by_a_reference_cycle_does_not_keep_the_map(tmp_path):
    """with_stored unmaps on return even when a reference cycle still holds a view of the bits
    (numba's first compile of a kernel leaves one: the first scan with an empty kernel cache
    failed with "BufferError: cannot close exported pointers exist")."""
    import gc

    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"w": ("BF16", np.arange(64 * 32, dtype=np.float32).reshape(64, 32))})
    info = SafetensorsFile(path)["w"]

    def use(stored):
        cycle = [stored]
        cycle.append(cycle)  # only the collector frees this list, and the view with it
        return float(stored.view(np.uint16)[3, 4])

    gc.disable()
    try:
        assert info.with_stored(use) == float(np.float32(100.0).view(np.uint32) >> 16)  # w[3, 4] = 3 * 32 + 4
        assert not _mapped(path)
    finally:
        gc.enable()

"""Property tests: mutated safetensors and GGUF headers give a clean error or a correct result.

Never a crash (an exception other than SwtoolError), never a hang (each example runs under an
alarm), never a read outside the file: whenever swtool accepts a mutated file, every tensor it
lists lies inside the file, no two overlap, and reading each one works. Where an independent
reader (the safetensors library, gguf-py's GGUFReader) also accepts the file, both agree on
what it holds.

Mutations start from real files: the tiny Llama of fixtures/bad_files.py (safetensors and
GGUF, with its vocabulary, so the whole path to a forward pass is exercised) and the header of
the real SmolLM2 Q4_1 GGUF. They are of three kinds: a field of the header replaced by an
arbitrary JSON / GGUF value (structure-aware), bytes of the header overwritten or cut, and
length and count fields set to boundary values.

The example counts are sized for CI on 2 cores (about a minute in all); FUZZ_EXAMPLES=N
multiplies them for a longer local run.
"""

import json
import math
import shutil
import signal
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, strategies as st

from fixtures import bad_files
from fixtures.fuzzing import bounded, fuzz_settings
from swtool.checkpoint.gguf_file import read_gguf
from swtool.checkpoint.safetensors import DTYPES, FLOAT_DTYPES, SafetensorsFile
from swtool.errors import SwtoolError
from swtool.forward import forward
from swtool.model import load_model

TOKENS = [256, 72, 101, 108, 108, 111]


def test_an_examples_alarm_leaves_the_tests_own_timeout_counting():
    """pytest-timeout's alarm (ITIMER_REAL too) is armed again after each example, less the time it took."""
    outer = signal.getitimer(signal.ITIMER_REAL)
    signal.setitimer(signal.ITIMER_REAL, 500)
    try:
        with bounded(seconds=5):
            assert signal.getitimer(signal.ITIMER_REAL)[0] <= 5
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
    finally:
        signal.setitimer(signal.ITIMER_REAL, *outer)  # the test's own timeout, as it was
    assert 490 < remaining <= 500


# --- values a mutation puts in place -------------------------------------------------------------

BOUNDARY_INTS = [0, 1, 2, 3, 4, 7, 8, 31, 32, 255, 256, 2 ** 16, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32,
                 2 ** 53, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, -1, -(2 ** 63)]
json_scalars = (st.none() | st.booleans() | st.sampled_from(BOUNDARY_INTS) | st.integers(-10 ** 6, 10 ** 6)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6)
                | st.sampled_from(sorted(DTYPES)))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def byte_edits(length):
    """[(position, new bytes)] within the first `length` bytes."""
    return st.lists(st.tuples(st.integers(0, max(0, length - 1)), st.binary(min_size=1, max_size=8)),
                    min_size=1, max_size=6)


def apply_edits(raw, edits):
    raw = bytearray(raw)
    for position, patch in edits:
        raw[position:position + len(patch)] = patch
    return bytes(raw)


# --- safetensors -----------------------------------------------------------------------------------------

def check_safetensors(path):
    """Either a CheckpointError, or a header whose every tensor is inside the file and readable, and
    equal to what the safetensors library reads from the same file when the library accepts it."""
    try:
        header = SafetensorsFile(path)
    except SwtoolError:
        return "rejected"
    size = path.stat().st_size
    extents = []
    for name, info in header.tensors.items():
        assert info.nbytes == math.prod(info.shape) * DTYPES[info.dtype][0]
        assert 8 <= info.offset and info.offset + info.nbytes <= size, name
        if info.nbytes:
            extents.append((info.offset, info.offset + info.nbytes))
    extents.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(extents, extents[1:]))
    library = _library_tensors(path)
    for name, info in header.tensors.items():
        if info.dtype not in FLOAT_DTYPES:
            with pytest.raises(SwtoolError):
                info.read()
            continue
        ours = info.read()
        assert ours.shape == info.shape
        if library is not None and name in library:
            np.testing.assert_array_equal(ours, library[name])
    return "accepted"


def _library_tensors(path):
    """{name: float32 array} from the safetensors library (through torch), or None if it refuses the file."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name).to(torch.float32).numpy() for name in f.keys()
                    if f.get_slice(name).get_dtype() in ("BF16", "F16", "F32")}
    except Exception:  # the library's own refusal of a malformed file: nothing to compare with
        return None


def check_model(directory):
    """The whole path: load_model gives a SwtoolError or a model that runs a forward pass."""
    try:
        model = load_model(directory)
    except SwtoolError:
        return "rejected"
    with np.errstate(all="ignore"):  # mutated bytes may make weights NaN: computed, never a crash
        logits = forward(model, TOKENS)
    assert logits.shape[-1] == model.arch.vocab_size
    return "accepted"


@pytest.fixture(scope="module")
def st_base(good):
    header, data = bad_files.read_safetensors(good.model / "model.safetensors")
    return header, data


@pytest.fixture
def st_dir(good, tmp_path):
    """A private copy of the tiny model's directory; the tests overwrite its model.safetensors."""
    target = tmp_path / "model"
    if not target.exists():
        shutil.copytree(good.model, target)
    return target


def run_and_count(examples, body):
    """Run the property `body(data) -> "accepted" | "rejected"` over `examples` Hypothesis examples;
    the counts of each verdict. Both must occur: a fuzzer whose every input is refused at the first
    byte, or accepted unchanged, tests nothing."""
    counts = {"accepted": 0, "rejected": 0}

    @fuzz_settings(examples, suppress=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
    @given(data=st.data())
    def run(data):
        with bounded():
            counts[body(data)] += 1

    run()
    print(f"fuzz cases: {counts}")
    assert counts["accepted"] > 0 and counts["rejected"] > 0, counts
    return counts


def test_safetensors_header_fields_replaced(st_base, st_dir):
    run_and_count(400, lambda data: _safetensors_fields(st_base, st_dir, data))


def _safetensors_fields(st_base, st_dir, data):
    header, blob = st_base
    header = json.loads(json.dumps(header))
    names = sorted(name for name in header if name != "__metadata__")
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names + ["__metadata__"]))
        kind = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "delete", "borrow"]))
        if kind == "delete":
            header.pop(name, None)
        elif kind == "entry" or name == "__metadata__":
            header[name] = data.draw(json_values)
        elif kind == "borrow":  # another tensor's offsets: overlaps and mismatches that look plausible
            other = data.draw(st.sampled_from(names))
            if isinstance(header.get(name), dict) and isinstance(header.get(other), dict):
                header[name]["data_offsets"] = header[other].get("data_offsets")
        elif isinstance(header.get(name), dict):
            header[name][kind] = data.draw(json_values)
    path = st_dir / "model.safetensors"
    path.write_bytes(bad_files.safetensors_bytes(header, blob))
    verdict = check_safetensors(path)
    check_model(st_dir)
    return verdict


def test_safetensors_bytes_overwritten_or_cut(st_dir, good):
    original = (good.model / "model.safetensors").read_bytes()
    run_and_count(400, lambda data: _safetensors_bytes(original, st_dir, data))


def _safetensors_bytes(raw, st_dir, data):
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    kind = data.draw(st.sampled_from(["bytes", "digits", "digits", "length", "cut"]))
    if kind == "bytes":
        raw = apply_edits(raw, data.draw(byte_edits(header_end)))
    elif kind == "digits":  # digits of the JSON header replaced by digits: still JSON, other shapes and offsets
        digits = [i for i in range(8, header_end) if 48 <= raw[i] <= 57]
        edits = data.draw(st.lists(st.tuples(st.sampled_from(digits), st.integers(48, 57)), min_size=1, max_size=4))
        raw = apply_edits(raw, [(position, bytes([digit])) for position, digit in edits])
    elif kind == "length":
        raw = struct.pack("<Q", data.draw(st.sampled_from(BOUNDARY_INTS[:20]) | st.integers(0, 2 ** 64 - 1))) + raw[8:]
    else:
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    path = st_dir / "model.safetensors"
    path.write_bytes(raw)
    verdict = check_safetensors(path)
    check_model(st_dir)
    return verdict


# --- GGUF --------------------------------------------------------------------------------------------------------

def check_gguf(path, compare=True, whole_model=True):
    """Either a SwtoolError, or a header whose every tensor is inside the file, readable, and as gguf-py reads it."""
    try:
        parsed = read_gguf(path)
    except SwtoolError:
        return "rejected"
    size = path.stat().st_size
    extents = []
    for name, info in parsed.tensors.items():
        assert info.offset >= parsed.data_offset and info.offset + info.nbytes <= size, name
        assert info.nbytes == math.prod(info.shape) // info.block_size * info.type_size
        if info.nbytes:
            extents.append((info.offset, info.offset + info.nbytes))
    extents.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(extents, extents[1:]))
    if compare:
        _compare_with_gguf_py(path, parsed)
    for info in parsed.tensors.values():
        if not info.readable or not math.prod(info.shape):
            continue
        if len(info.shape) == 1:  # rows are the first axis of a matrix; a vector is read whole
            assert info.read().shape == info.shape
        else:
            assert info.read(slice(0, 2)).shape == (min(2, info.shape[0]),) + info.shape[1:]
    if whole_model:
        check_gguf_model(path)
    return "accepted"


def _compare_with_gguf_py(path, parsed):
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception:  # gguf-py refuses it (it wants tensors in file order, for one): nothing to compare
        return
    keys = [key for key in reader.fields if not key.startswith("GGUF.")]
    assert keys == list(parsed.metadata)
    for key in keys:
        theirs, ours = reader.fields[key].contents(), parsed.metadata[key]
        if isinstance(theirs, float) and math.isnan(theirs):
            assert math.isnan(ours)
        elif isinstance(theirs, list):
            assert len(theirs) == len(ours) and all(
                a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)) for a, b in zip(theirs, ours))
        else:
            assert theirs == ours, key
    assert [t.name for t in reader.tensors] == list(parsed.tensors)
    for tensor in reader.tensors:
        info = parsed.tensors[tensor.name]
        assert int(tensor.data_offset) == info.offset and int(tensor.n_bytes) == info.nbytes
        assert tuple(int(n) for n in reversed(tensor.shape)) == info.shape
        assert tensor.tensor_type.name == info.dtype


def check_gguf_model(path):
    """open_gguf, its tokenizer and a forward pass: a SwtoolError or a result, never another exception."""
    try:
        model = load_model(path)
        model.checkpoint.directory  # the tokenizer, rebuilt from the metadata
    except SwtoolError:
        return
    with np.errstate(all="ignore"):
        logits = forward(model, TOKENS)
    assert logits.shape[-1] == model.arch.vocab_size


@pytest.fixture(scope="module")
def gguf_base(good):
    return bad_files.read_layout(good.gguf)


gguf_values = {
    bad_files.U8: st.integers(0, 255), bad_files.I8: st.integers(-128, 127), bad_files.U16: st.integers(0, 2 ** 16 - 1),
    bad_files.I16: st.integers(-2 ** 15, 2 ** 15 - 1), bad_files.U32: st.sampled_from(BOUNDARY_INTS[:15]),
    bad_files.I32: st.integers(-2 ** 31, 2 ** 31 - 1), bad_files.F32: st.floats(width=32),
    bad_files.BOOL: st.booleans(), bad_files.STRING: st.text(max_size=12),
    bad_files.U64: st.sampled_from(BOUNDARY_INTS[:20]), bad_files.I64: st.integers(-2 ** 63, 2 ** 63 - 1),
    bad_files.F64: st.floats(),
}


@st.composite
def gguf_value(draw):
    """(type, value, element type) of a well-encoded GGUF metadata value of any type."""
    kind = draw(st.sampled_from(sorted(gguf_values) + [bad_files.ARRAY]))
    if kind != bad_files.ARRAY:
        return kind, draw(gguf_values[kind]), None
    sub = draw(st.sampled_from(sorted(gguf_values)))
    return kind, draw(st.lists(gguf_values[sub], max_size=5)), sub


def test_gguf_metadata_and_tensor_table_replaced(gguf_base, tmp_path):
    run_and_count(400, lambda data: _gguf_fields(gguf_base, tmp_path / "model.gguf", data))


def _gguf_fields(gguf_base, path, data):
    import copy

    layout = copy.deepcopy(gguf_base)
    for _ in range(data.draw(st.integers(1, 3))):
        target = data.draw(st.sampled_from(["kv", "kv", "tensor", "tensor", "counts", "drop"]))
        if target == "kv":
            entry = data.draw(st.sampled_from(layout.kv))
            entry[1], entry[2], entry[3] = data.draw(gguf_value())
        elif target == "drop" and layout.kv:
            layout.kv.remove(data.draw(st.sampled_from(layout.kv)))
        elif target == "tensor":
            entry = data.draw(st.sampled_from(layout.tensors))
            index = data.draw(st.sampled_from([1, 2, 3]))
            if index == 1:
                entry[1] = data.draw(st.lists(st.sampled_from(BOUNDARY_INTS[:20]) | st.integers(0, 600), max_size=5))
            elif index == 2:
                entry[2] = data.draw(st.integers(0, 45))
            else:
                entry[3] = data.draw(st.sampled_from(BOUNDARY_INTS[:20]) | st.integers(0, len(layout.data)))
        elif data.draw(st.booleans()):
            layout.version = data.draw(st.sampled_from([0, 1, 2, 3, 4, 0x03000000, 2 ** 32 - 1]))
        else:
            setattr(layout, data.draw(st.sampled_from(["n_tensors", "n_kv"])), data.draw(st.sampled_from(BOUNDARY_INTS[:20])))
    path.write_bytes(layout.to_bytes())
    return check_gguf(path)


def test_gguf_bytes_overwritten_or_cut(good, gguf_base, tmp_path):
    original = good.gguf.read_bytes()
    header_end = len(original) - len(gguf_base.data)
    run_and_count(400, lambda data: _gguf_bytes(original, header_end, tmp_path / "model.gguf", data))


def _gguf_bytes(raw, header_end, path, data):
    if data.draw(st.booleans()):
        raw = apply_edits(raw, data.draw(byte_edits(header_end)))
    else:
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    path.write_bytes(raw)
    return check_gguf(path)


def test_real_smollm2_gguf_header_mutated(smollm2_gguf, tmp_path):
    """The real Q4_1 file's header (49k-token vocabulary, 272 tensors), bytes overwritten; the data
    section is left as a sparse hole of the original size, so offsets keep their meaning."""
    run_and_count(80, lambda data: _smollm2_bytes(*smollm2_gguf, tmp_path / "model.gguf", data))


def _smollm2_bytes(header, size, path, data):
    # mostly the structure (counts, the first keys, the tensor table at the end), sometimes anywhere
    table = max(0, len(header) - 20_000)
    position = st.integers(0, 600) | st.integers(table, len(header) - 1) | st.integers(0, len(header) - 1)
    edits = data.draw(st.lists(st.tuples(position, st.binary(min_size=1, max_size=8)), min_size=1, max_size=4))
    with open(path, "wb") as f:
        f.write(apply_edits(header, edits))
        f.truncate(size)
    return check_gguf(path, compare=False, whole_model=False)


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2):
    from fixtures import smollm2 as builder

    path = builder.fetch_gguf()
    parsed = read_gguf(path)
    with open(path, "rb") as f:
        return f.read(parsed.data_offset), path.stat().st_size

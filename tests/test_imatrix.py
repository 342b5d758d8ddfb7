"""swtool imatrix and swtool/imatrix.py: llama.cpp's importance matrices, computed, written and read.

Oracles:
  - values: transformers itself. Every matrix product of its forward pass goes through
    torch.nn.functional.linear (nn.Linear, the routers, and the eager experts of transformers 5's
    stacked mixtures), which is wrapped here to add up x² per input column and count rows per
    weight (per expert for a stacked one); swtool's sums and counts must equal them;
  - names and layout: llama.cpp's own converter (fixtures/converted.py) says which tensors a model
    has: every blk.* tensor that is a matrix is multiplied, so llama-imatrix writes NAME.in_sum2
    [ne0(, experts)] and NAME.counts [1(, experts)] for it; gguf-py's GGUFReader reads the file;
  - bytes: libggml's own GGUF writer (llama-cpp-python's libggml-base.so through ctypes), driven as
    IMatrixCollector::save_imatrix drives it, writes the same file byte for byte.
"""

import ctypes
import struct

import numpy as np
import pytest

from fixtures.cli_run import one_line_error, swtool_in_process
from fixtures.gguf_compare import read_contents
from fixtures.tiny import random_tokens, stacked_copy
from fixtures.torch_importance import torch_importance
from swtool import imatrix as im
from swtool.errors import SwtoolError
from swtool.model import load_model

FAMILIES = ("llama", "qwen2", "phi3", "mixtral")  # GQA (llama's tiny config has 4/2 heads, qwen2 with biases),
# fused QKV and gate/up (phi3), a mixture of experts (mixtral)


def sequences(n=3, length=40, seed=5, vocab=300):
    return [list(map(int, random_tokens(length, seed=seed + i, vocab=vocab))) for i in range(n)]


@pytest.fixture(params=FAMILIES)
def family_dir(request, tiny_factory, tmp_path):
    family = request.param
    directory, _ = tiny_factory(family)
    return family, directory


def compare(importance, expected):
    """The largest |swtool - transformers| over the largest sum, per tensor; counts must be equal."""
    assert set(importance.entries) == set(expected)
    gaps = {}
    for name, (sums, counts) in expected.items():
        entry = importance.entries[name]
        np.testing.assert_array_equal(entry.counts, counts, err_msg=name)
        gaps[name] = float(np.abs(entry.sums - sums).max() / sums.max())
    return gaps


def test_sums_and_counts_are_transformers(family_dir):
    """Every linear's input, every expert's routed rows: swtool's sums of x² equal transformers' to 1e-5 of
    the largest (float32 forward passes computed in another order; measured: at most 4.2e-7), counts exactly."""
    family, directory = family_dir
    seqs = sequences()
    got = im.collect(load_model(directory), seqs, ["test"], 16)
    gaps = compare(got, torch_importance(directory, family, seqs))
    assert max(gaps.values()) < 1e-5, sorted(gaps.items(), key=lambda kv: -kv[1])[:3]
    assert got.chunk_count == 3 * 40 // 16 and got.chunk_size == 16
    if family == "mixtral":  # experts are counted over the tokens routed to them: top 2 of 4 per token
        down = got.entries["blk.0.ffn_down_exps.weight"]
        assert down.n_mat == 4 and down.counts.sum() == 2 * 3 * 40 and (down.counts < 3 * 40).all()


def test_stacked_mixture_layout_gives_the_same_matrix(tiny_factory, tmp_path):
    """transformers 5's stacked experts (fused gate_up_proj) and the per-expert files: one importance matrix."""
    directory, _ = tiny_factory("mixtral")
    seqs = sequences()
    per_expert = im.collect(load_model(directory), seqs, ["test"], 16)
    stacked = im.collect(load_model(stacked_copy(directory, tmp_path / "stacked")), seqs, ["test"], 16)
    assert list(per_expert.entries) == list(stacked.entries)
    for name, entry in per_expert.entries.items():
        np.testing.assert_allclose(stacked.entries[name].sums, entry.sums, rtol=1e-6)
        np.testing.assert_array_equal(stacked.entries[name].counts, entry.counts)


# --- the file as llama.cpp writes it ------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_has_llama_imatrix_keys_names_shapes_and_types(converted, family, tmp_path):
    import gguf

    model_dir, converter_gguf = converted(family)
    out = tmp_path / "imatrix.gguf"
    result = swtool_in_process("imatrix", model_dir, "--random-tokens", 100, "--ctx", 32, "-o", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    reader = gguf.GGUFReader(out)
    fields = {name: field for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert list(fields) == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    T = gguf.GGUFValueType
    assert [f.types for f in fields.values()] == [[T.STRING], [T.ARRAY, T.STRING], [T.UINT32], [T.UINT32]]
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.datasets"].contents() == ["swtool:random-tokens:100:seed=0"]
    assert (fields["imatrix.chunk_count"].contents(), fields["imatrix.chunk_size"].contents()) == (100 // 32, 32)
    # what llama.cpp's converter wrote for this model: every block matrix is some product's weight
    # (fixtures/gguf_compare's reader, held to gguf-py's by test_gguf_converter: GGUFReader would spend seconds
    # on the vocabulary this test does not read)
    matrices = {name: list(shape) for name, (shape, _, _) in read_contents(converter_gguf).tensors.items()
                if name.startswith("blk.") and len(shape) >= 2}
    expected = []
    for name in sorted(matrices):
        ne = matrices[name]
        experts = ne[2:] if len(ne) == 3 else []
        expected += [(name + ".in_sum2", [ne[0], *experts]), (name + ".counts", [1, *experts])]
    got = [(t.name, [int(n) for n in t.shape]) for t in reader.tensors]
    assert got == expected
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    # swtool reading llama.cpp's converted file computes the same matrix as from the checkpoint (the same
    # tokens: the two tokenizers need not agree on BOS)
    seqs = sequences(2, 30, vocab=300)
    a, b = (im.collect(load_model(path), seqs, ["t"], 32) for path in (model_dir, converter_gguf))
    assert list(a.entries) == [t.name.removesuffix(".in_sum2") for t in reader.tensors][::2]
    for name, entry in a.entries.items():
        np.testing.assert_array_equal(b.entries[name].counts, entry.counts)
        np.testing.assert_allclose(b.entries[name].sums, entry.sums, rtol=1e-4)


class GgmlGguf:
    """libggml's GGUF writer through ctypes, as imatrix.cpp's save_imatrix calls it."""

    class InitParams(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

    def __init__(self):
        from fixtures.ggml_oracle import library_path

        lib = self.lib = ctypes.CDLL(str(library_path()))
        lib.ggml_init.argtypes, lib.ggml_init.restype = [self.InitParams], ctypes.c_void_p
        lib.ggml_free.argtypes = [ctypes.c_void_p]
        lib.ggml_tensor_overhead.restype = ctypes.c_size_t
        lib.ggml_new_tensor_2d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        lib.ggml_new_tensor_2d.restype = ctypes.c_void_p
        lib.ggml_set_name.argtypes, lib.ggml_set_name.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p
        lib.ggml_get_data.argtypes, lib.ggml_get_data.restype = [ctypes.c_void_p], ctypes.c_void_p
        lib.gguf_init_empty.restype = ctypes.c_void_p
        lib.gguf_free.argtypes = [ctypes.c_void_p]
        lib.gguf_set_val_str.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
        lib.gguf_set_arr_str.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p),
                                         ctypes.c_size_t]
        lib.gguf_set_val_u32.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
        lib.gguf_add_tensor.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.gguf_write_to_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_bool]
        lib.gguf_write_to_file.restype = ctypes.c_bool

    def save_imatrix(self, path, importance):
        lib = self.lib
        size = sum(2 * lib.ggml_tensor_overhead() + 4 * (e.sums.size + e.n_mat) + 64
                   for e in importance.entries.values())
        ctx = lib.ggml_init(self.InitParams(size, None, False))
        gguf_ctx = lib.gguf_init_empty()
        try:
            lib.gguf_set_val_str(gguf_ctx, b"general.type", b"imatrix")
            datasets = (ctypes.c_char_p * len(importance.datasets))(*[d.encode() for d in importance.datasets])
            lib.gguf_set_arr_str(gguf_ctx, b"imatrix.datasets", datasets, len(importance.datasets))
            lib.gguf_set_val_u32(gguf_ctx, b"imatrix.chunk_count", importance.chunk_count)
            lib.gguf_set_val_u32(gguf_ctx, b"imatrix.chunk_size", importance.chunk_size)
            for name in sorted(importance.entries):
                entry = importance.entries[name]
                for suffix, values, ne0 in ((".in_sum2", entry.sums, entry.n_cols), (".counts", entry.counts, 1)):
                    tensor = lib.ggml_new_tensor_2d(ctx, 0, ne0, entry.n_mat)  # GGML_TYPE_F32
                    lib.ggml_set_name(tensor, (name + suffix).encode())
                    data = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
                    ctypes.memmove(lib.ggml_get_data(tensor), data.ctypes.data, data.nbytes)
                    lib.gguf_add_tensor(gguf_ctx, tensor)
            assert lib.gguf_write_to_file(gguf_ctx, str(path).encode(), False)
        finally:
            lib.gguf_free(gguf_ctx)
            lib.ggml_free(ctx)


def test_gguf_bytes_are_libggml_writers(tiny_factory, tmp_path):
    """The same matrix through libggml's gguf_write_to_file, as save_imatrix drives it: the same bytes
    (a mixture's per-expert tensors and an expert no token reached included)."""
    directory, _ = tiny_factory("mixtral")
    importance = im.collect(load_model(directory), sequences(1, 20), ["prose.txt", "two"], 8)
    importance.entries["blk.1.ffn_down_exps.weight"].counts[3] = 0  # as if expert 3 saw no token
    importance.entries["blk.1.ffn_down_exps.weight"].sums[3] = 0
    GgmlGguf().save_imatrix(tmp_path / "ggml.gguf", importance)
    im.write_imatrix_gguf(tmp_path / "swtool.gguf", importance)
    assert (tmp_path / "swtool.gguf").read_bytes() == (tmp_path / "ggml.gguf").read_bytes()


# --- round trips ---------------------------------------------------------------------------------------------

def ulps(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return int(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64)).max())


def test_round_trips_through_gguf_and_dat(tiny_factory, tmp_path):
    """GGUF -> read -> GGUF and .dat -> read -> .dat: the same bytes. Across formats the importance
    llama-quantize passes (in_sum2 / counts, or value / ncall) is the same to 1 float32 ulp (.dat stores
    sum / count x ncall, a rounding each way); exactly the same where ncall is a power of two."""
    directory, _ = tiny_factory("mixtral")
    importance = im.collect(load_model(directory), sequences(3, 40), ["data.txt"], 16)  # 120 tokens: ncall 8
    gguf_path, dat_path = tmp_path / "a.gguf", tmp_path / "a.dat"
    im.write_imatrix_gguf(gguf_path, importance)
    im.write_imatrix_dat(dat_path, importance)
    from_gguf, from_dat = im.read_imatrix(gguf_path), im.read_imatrix(dat_path)
    assert not from_gguf.legacy and from_dat.legacy
    assert im.gguf_bytes(from_gguf) == gguf_path.read_bytes() and im.dat_bytes(from_dat) == dat_path.read_bytes()
    assert (from_dat.chunk_count, from_dat.datasets) == (importance.chunk_count, ["data.txt"])
    assert from_gguf.datasets == ["data.txt"] and from_gguf.chunk_size == 16
    worst = 0
    for name in importance.entries:
        expected = importance.importance_for(name)
        assert from_gguf.importance_for(name).tobytes() == expected.tobytes()  # GGUF keeps float32 sums exactly
        worst = max(worst, ulps(from_dat.importance_for(name), expected))
        # .dat -> GGUF (llama-imatrix --in-file's conversion, chunk size 16) -> the same importance again
        back = im.read_imatrix(im.write_imatrix_gguf(tmp_path / "b.gguf", from_dat, chunk_size=16))
        assert ulps(back.importance_for(name), expected) <= 1
    assert worst <= 1
    # dense tensors: ncall = ceil(120 / 16) = 8, a power of two: x 8 and / 8 are exact in float32
    exact = [n for n, e in from_dat.entries.items() if e.counts[0] & (e.counts[0] - 1) == 0]
    assert "blk.0.attn_q.weight" in exact and from_dat.entries["blk.0.attn_q.weight"].counts[0] == 8
    assert all(from_dat.importance_for(n).tobytes() == importance.importance_for(n).tobytes() for n in exact)


def test_importance_for_is_llama_quantizes(tmp_path):
    """Per expert in_sum2 / counts in float32, and 1 for an expert with count 0 (quantize.cpp's load_imatrix)."""
    sums = np.array([[4.0, 2.0], [9.0, 3.0], [0.0, 0.0]])
    importance = im.Importance({"blk.0.ffn_down_exps.weight": im.Entry(sums, np.array([2, 3, 0]))}, ["d"], 1, 2)
    got = importance.importance_for("blk.0.ffn_down_exps.weight", 2)
    np.testing.assert_array_equal(got, np.float32([[2, 1], [3, 1], [1, 1]]))
    assert got.dtype == np.float32 and importance.importance_for("blk.0.attn_q.weight") is None


# --- the command ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_text(tiny_factory, tmp_path_factory):
    from fixtures.tiny import Plant

    directory, _ = tiny_factory("llama", plants=(Plant(1, 41, 101),))
    text = tmp_path_factory.mktemp("imatrix-text") / "text.txt"
    text.write_text(open(im.__file__.replace("swtool/imatrix.py", "fixtures/prose.txt")).read()[:2000])
    return directory, text


def test_text_chunks_follow_llama_imatrix(tiny_text, tmp_path):
    """Whole chunks of --ctx only, the first token of each replaced by BOS (the byte tokenizer adds <s>=256);
    --chunks N takes the first N; the planted super weight's column tops its down projection."""
    directory, text = tiny_text
    out = tmp_path / "i.gguf"
    result = swtool_in_process("imatrix", directory, "--text", text, "--ctx", 64, "--chunks", 5, "-o", out,
                               "--no-progress", "--json")
    assert result.returncode == 0, result.stderr
    import json

    summary = json.loads(result.stdout)
    assert (summary["sequences"], summary["tokens"], summary["chunk_count"]) == (5, 320, 5)
    down = next(t for t in summary["tensors"] if t["name"] == "blk.1.ffn_down.weight")
    assert down["top_columns"][0]["column"] == 101 and down["top_columns"][0]["share"] > 0.9
    assert im.read_imatrix(out).datasets == [str(text)]
    assert im.text_sequences(list(range(10, 140)), 64, 256) == [[256, *range(11, 74)], [256, *range(75, 138)]]
    assert im.text_sequences(list(range(130)), 64, None, max_chunks=1) == [list(range(64))]


def test_sources_prompts_random_self_generated(tiny_text, tmp_path):
    directory, _ = tiny_text
    for argv, kind, tokens in [(["--prompt", "hello there", "--prompt", "a much longer prompt"], "prompts", 33),
                               (["--random-tokens", 50, "--ctx", 20], "random-tokens", 50),
                               (["--self-generated", 12, "--ctx", 8, "--seed", 3], "self-generated", 12)]:
        out = tmp_path / f"{kind}.dat"
        result = swtool_in_process("imatrix", directory, *argv, "-o", out, "--no-progress", "--json")
        assert result.returncode == 0, result.stderr
        import json

        summary = json.loads(result.stdout)
        assert (summary["source"]["kind"], summary["tokens"], summary["format"]) == (kind, tokens, "dat")
        assert im.read_imatrix(out).legacy
    model = load_model(directory)
    a = im.self_generated_sequences(model, 12, 8, 256, seed=3)
    assert a == im.self_generated_sequences(model, 12, 8, 256, seed=3) and [len(s) for s in a] == [8, 4]
    assert all(s[0] == 256 for s in a)


def test_in_file_adds_up(tiny_text, tmp_path):
    """--in-file: sums and counts added, datasets listed, as llama-imatrix --in-file."""
    directory, _ = tiny_text
    first = tmp_path / "first.gguf"
    assert swtool_in_process("imatrix", directory, "--random-tokens", 64, "--ctx", 32, "-o", first,
                             "--no-progress").returncode == 0
    both = tmp_path / "both.gguf"
    assert swtool_in_process("imatrix", directory, "--random-tokens", 64, "--ctx", 32, "--in-file", first,
                             "-o", both, "--no-progress").returncode == 0
    a, b = im.read_imatrix(first), im.read_imatrix(both)
    assert b.datasets == a.datasets * 2 and b.chunk_count == 4
    for name, entry in a.entries.items():
        np.testing.assert_array_equal(b.entries[name].counts, 2 * entry.counts)
        np.testing.assert_allclose(b.entries[name].sums, 2 * entry.sums, rtol=1e-6)


# --- hostile files -------------------------------------------------------------------------------------------

def good_files(tmp_path):
    sums = np.array([[1.0, 2.0, 3.0, 4.0]])
    importance = im.Importance({"blk.0.attn_q.weight": im.Entry(sums, np.array([4]))}, ["d"], 1, 4)
    return im.gguf_bytes(importance), im.dat_bytes(importance), importance


def hostile_cases(tmp_path):
    gguf_data, dat_data, importance = good_files(tmp_path)
    nan = im.Importance({"x": im.Entry(np.array([[np.nan, 1.0]]), np.array([1]))}, [], 0, 1)
    negative = im.Importance({"x": im.Entry(np.array([[1.0, 1.0]]), np.array([-3]))}, [], 0, 1)
    dat_header = struct.pack("<ii", 1, 5) + b"abcde"
    return {
        "truncated gguf": (gguf_data[:-40], "truncated"),
        "truncated dat": (dat_data[:30], "truncated"),
        "wrong magic": (b"GGUG" + gguf_data[4:], "not an imatrix file"),
        "empty": (b"", "not an imatrix file"),
        "nan sums": (im.gguf_bytes(nan), "not finite"),
        "negative counts": (im.gguf_bytes(negative), "not a whole number"),
        "dat negative ncall": (dat_header + struct.pack("<ii", -2, 1) + struct.pack("<f", 1.0), "not a whole number"),
        "dat huge nval": (dat_header + struct.pack("<ii", 1, 1 << 30), "truncated or corrupt"),
        "dat name length": (struct.pack("<ii", 1, 1 << 30) + b"x" * 20, "corrupt entry 0's name"),
        "dat nan": (dat_header + struct.pack("<ii", 1, 1) + struct.pack("<f", float("nan")), "not finite"),
        "dat trailing": (dat_data + b"\0", "after the end"),
        "model gguf": (im.gguf_bytes(importance).replace(b"imatrix.chunk_size", b"imatrix.chunk_sizf"),
                       "no imatrix.chunk_size"),
    }


@pytest.mark.parametrize("case", ["truncated gguf", "truncated dat", "wrong magic", "empty", "nan sums",
                                  "negative counts", "dat negative ncall", "dat huge nval", "dat name length",
                                  "dat nan", "dat trailing", "model gguf"])
def test_hostile_files_are_one_line_errors(case, tmp_path):
    data, message = hostile_cases(tmp_path)[case]
    path = tmp_path / "bad.imatrix"
    path.write_bytes(data)
    with pytest.raises(SwtoolError, match=message):
        im.read_imatrix(path)


def test_hostile_in_file_exits_2_before_reading_the_model(tmp_path):
    data, _ = hostile_cases(tmp_path)["nan sums"]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    result = swtool_in_process("imatrix", tmp_path / "no-model", "--random-tokens", 10, "--in-file", path,
                               "-o", tmp_path / "out.gguf", "--no-progress")
    assert result.returncode == 2
    assert one_line_error(result).startswith(f"error: {path}: x: the sums hold values that are not finite")
    assert not (tmp_path / "out.gguf").exists()


def test_options_are_checked(tiny_text, tmp_path):
    directory, text = tiny_text
    for argv, message in [([], "give exactly one of"), (["--text", text, "--random-tokens", 5], "got --text, --random"),
                          (["--random-tokens", 5, "--chunks", 2], "--chunks counts chunks of --text"),
                          (["--text", text, "--ctx", 4096], "fewer than one chunk")]:
        result = swtool_in_process("imatrix", directory, *argv, "-o", tmp_path / "x.gguf", "--no-progress")
        assert result.returncode == 2 and message in one_line_error(result), result.stderr

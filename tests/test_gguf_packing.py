"""export's metadata arrays are packed at once (gguf_export.whole_array_packing): the bytes, and the errors,
must be those of gguf-py's GGUFWriter, which packs element by element."""

import gguf
import numpy as np
import pytest

from swtool.gguf_export import whole_array_packing

T = gguf.GGUFValueType


class Kind(int):  # as gguf.TokenType, an int subclass
    pass


CASES = [
    (["a", "bé", "", "\u0120the", "\U0001F600"], None), ([b"x\x00y", bytearray(b"z")], None), (["a", b"b"], None),
    ([1, 2, -3], None), ([1.5, -2.25, 1e30, 0.1], None), ([True, False], None), ([1, True], None), ([1, 2.0], None),
    ([Kind(1), Kind(5)], None), ([gguf.TokenType.NORMAL, gguf.TokenType.CONTROL], None), ([1, 2**40], None),
    ([2**31 - 1, -2**31], None), ([2**31], None), ([[1, 2], [3]], None), ([1.5, 2], None), ([None], None),
    ([1, 2, 3], T.UINT32), ([-1], T.UINT32), ([2**64 - 1], T.UINT64), ([2**63], T.UINT64), ([-5, 7], T.INT64),
    ([np.uint32(4), np.int64(9)], T.UINT32), ([1.0, 2.0], T.UINT32), ([0.1, 1e39], T.FLOAT32),
    ([float("inf"), -1.0], T.FLOAT32), ([float("nan")], T.FLOAT32), ([0.1, 3], T.FLOAT64), ([np.float32(0.3)], T.FLOAT32),
    (["1.5"], T.FLOAT32), ([0, 3, 1], T.BOOL), ([1, 2], T.UINT8), ([-1], T.INT8), ([300], T.UINT8), ([1, 2], T.INT16),
    ([70000], T.UINT16), (["a", "b"], T.STRING), ([1, "b"], T.STRING),
]


def packed(writer, values, sub_type):
    try:
        return writer._pack_val(values, T.ARRAY, add_vtype=True, sub_type=sub_type)
    except Exception as e:  # gguf-py's refusal, which the fast path must leave to it
        return type(e).__name__


@pytest.mark.parametrize("values, sub_type", CASES, ids=[f"{c[0]!r:.30}-{c[1]}" for c in CASES])
def test_arrays_pack_as_gguf_py_packs_them(values, sub_type):
    expected = packed(gguf.GGUFWriter(None, "llama"), values, sub_type)
    assert packed(whole_array_packing(gguf)(None, "llama"), values, sub_type) == expected


def test_a_vocabulary_packs_as_gguf_py_packs_it():
    rng = np.random.default_rng(0)
    tokens = ["".join(map(chr, rng.integers(32, 0x3000, rng.integers(1, 12)))) for _ in range(20000)]
    scores = [float(x) for x in rng.standard_normal(20000)]
    kinds = [gguf.TokenType(int(k)) for k in rng.integers(1, 7, 20000)]
    plain, fast = gguf.GGUFWriter(None, "llama"), whole_array_packing(gguf)(None, "llama")
    for values in (tokens, scores, kinds):
        assert fast._pack_val(values, T.ARRAY, True) == plain._pack_val(values, T.ARRAY, True)


def test_the_readers_arrays_pack_as_gguf_py_packs_them(tmp_path):
    """quantize copies a GGUF's metadata as swtool's reader holds it (NumberArray, LazyStrings, not lists):
    those pack into gguf-py's bytes too, read back from a file gguf-py wrote."""
    from swtool.checkpoint.gguf_file import read_gguf

    rng = np.random.default_rng(1)
    arrays = {"t.tokens": (["".join(map(chr, rng.integers(32, 0x3000, rng.integers(1, 9)))) for _ in range(3000)], None),
              "t.types": ([int(k) for k in rng.integers(1, 7, 3000)], T.INT32),
              "t.scores": ([float(x) for x in rng.standard_normal(3000).astype(np.float32)], T.FLOAT32),
              "t.ids": ([int(k) for k in rng.integers(0, 2**32, 50)], T.UINT32)}
    writer = gguf.GGUFWriter(str(tmp_path / "arrays.gguf"), "llama")
    for key, (values, sub_type) in arrays.items():
        writer.add_array(key, values) if sub_type is None else writer.add_key_value(key, values, T.ARRAY, sub_type=sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    meta = read_gguf(tmp_path / "arrays.gguf").metadata
    plain, fast = gguf.GGUFWriter(None, "llama"), whole_array_packing(gguf)(None, "llama")
    for key, (values, sub_type) in arrays.items():
        read = meta[key]
        assert not isinstance(read, (list, tuple)) and list(read) == values
        expected = plain._pack_val(values, T.ARRAY, True, sub_type=sub_type)
        assert plain._pack_val(read, T.ARRAY, True, sub_type=sub_type) == expected
        assert fast._pack_val(read, T.ARRAY, True, sub_type=sub_type) == expected

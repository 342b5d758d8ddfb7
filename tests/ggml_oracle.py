"""libggml through ctypes: the reference swtool's quantizers are held to.

llama-cpp-python ships libggml-base.so (llama_cpp/lib/). From it:
  - ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix=NULL):
    what llama-quantize calls; with no importance matrix it runs ggml's
    `quantize_row_*_ref` reference quantizers;
  - ggml_get_type_traits(type)->to_float: the row dequantizer of each type.
The struct layout is ggml.h's `struct ggml_type_traits` (llama-cpp-python 0.3.36).
Same pattern as gguf-py's tests/test_quants.py.
"""

import ctypes
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

c_float_p = ctypes.POINTER(ctypes.c_float)
TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, c_float_p, ctypes.c_int64)


class TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


class GgmlUnavailable(RuntimeError):
    pass


def library_path():
    """libggml-base.so inside the installed llama_cpp package."""
    try:
        import llama_cpp
    except ImportError as e:
        raise GgmlUnavailable(
            f"llama-cpp-python is not importable ({e}); it is the ggml oracle for the quantizer tests: "
            "pip install llama-cpp-python==0.3.36 (CMAKE_ARGS='-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF')") from e
    lib = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not lib.is_file():
        raise GgmlUnavailable(f"llama_cpp is installed but {lib} is missing")
    return lib


class Ggml:
    def __init__(self, path=None):
        self.lib = ctypes.CDLL(str(path or library_path()))
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = (ctypes.c_int, c_float_p, ctypes.c_void_p, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_int64, c_float_p)
        self.lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        self.lib.ggml_quantize_requires_imatrix.argtypes = (ctypes.c_int,)
        self.lib.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
        self.lib.ggml_get_type_traits.argtypes = (ctypes.c_int,)
        self.lib.ggml_quantize_init.restype = None
        self.lib.ggml_quantize_init.argtypes = (ctypes.c_int,)

    def traits(self, qtype):
        traits = self.lib.ggml_get_type_traits(int(qtype)).contents
        # the struct layout is assumed, so check it against gguf's table before trusting a pointer in it
        assert (traits.blck_size, traits.type_size) == GGML_QUANT_SIZES[qtype], (qtype, traits.blck_size)
        assert traits.type_name.decode().upper() == qtype.name, traits.type_name
        return traits

    def quantize(self, values, qtype):
        """float32 [rows, cols] -> uint8 [rows, row_bytes], ggml_quantize_chunk without imatrix (one thread)."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        rows, cols = values.shape
        elements, nbytes = GGML_QUANT_SIZES[qtype]
        out = np.zeros((rows, cols // elements * nbytes), dtype=np.uint8)
        assert not self.lib.ggml_quantize_requires_imatrix(int(qtype))
        written = self.lib.ggml_quantize_chunk(int(qtype), values.ctypes.data_as(c_float_p),
                                               out.ctypes.data_as(ctypes.c_void_p), 0, rows, cols, None)
        assert written == out.size
        return out

    def dequantize(self, data, qtype, shape):
        """uint8 bytes -> float32 of `shape`, through the type's to_float."""
        rows, cols = shape
        data = np.ascontiguousarray(data, dtype=np.uint8)
        out = np.zeros((rows, cols), dtype=np.float32)
        if qtype == GGMLQuantizationType.F32:
            return data.view(np.float32).reshape(rows, cols).copy()  # ggml has no to_float for F32
        to_float = TO_FLOAT(self.traits(qtype).to_float)
        to_float(data.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(c_float_p), rows * cols)
        return out

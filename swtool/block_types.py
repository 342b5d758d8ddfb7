"""Every GGUF tensor type swtool writes and reads, in one table: the one place a type's facts live.

swtool.quant (quantize, dequantize, the export policy, super-weight isolation) and
swtool.kernels (the fused products) derive everything they know about a type from
TYPES below. The sizes are ggml's (gguf.GGML_QUANT_SIZES; tests/test_gguf_kernels.py and
test_quant.py check that they agree, fixtures/ggml_oracle.py that gguf-py's agree with libggml's).

A leaf, importing nothing: a bf16 scan reads BLOCK_TYPES to know which dtypes the
fused kernels multiply from their blocks, and must not pay for importing gguf or
swtool.quant to learn it. So the quantizer and decoder are named as text
("module.function" inside swtool.quant) and swtool.quant imports them when a type
is first used. Numba needs a block's size as a compile-time constant in its loops,
so the modules with one loop per type (quant/simple.py, kquants.py, blocks.py) copy
a type's shape into module-level ints (`block_shape`), which Numba freezes.

Adding a type: docs/adding-a-block-type.md.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockType:
    name: str  # ggml's name: gguf.GGMLQuantizationType's member, a GGUF reader's dtype
    ggml_type: int  # enum ggml_type (gguf.GGMLQuantizationType's value)
    block_values: int  # values per block (ggml's blck_size; 1 for the float types)
    block_bytes: int  # bytes per block (ggml's type_size)
    file_type: int  # llama_ftype written as general.file_type for a file whose weights are mostly this type
    code_bits: int  # bits of a value's code in a block (0 for the float types): the grid of isolate.py
    # (for the IQ4 types, whose 16 levels are not evenly spaced, only the grid's coarseness)
    fallback: str  # llama.cpp's tensor_type_fallback for rows its block does not fit; None: F16
    # swtool.quant.<module>.<function>(values, importance, out, bad): float32 rows -> this type's bytes
    # (ggml's bytes), weighted by `importance` (float32 [cols]; empty for none) where ggml's type uses it
    quantizer: str
    # swtool.quant.<module>.<function>: a float type's row decoder (what dequantize calls), or a block
    # type's segment loop in blocks.py (Numba needs its branch in decode_segment, at the type's kind)
    decoder: str


TYPES = (
    #         name    ggml values bytes ftype bits fallback quantizer                decoder
    BlockType("F32",  0,   1,     4,    0,    0,   None,    "floats.quantize_f32",   "floats.dequantize_f32"),
    BlockType("F16",  1,   1,     2,    1,    0,   None,    "floats.quantize_f16",   "floats.dequantize_f16"),
    BlockType("BF16", 30,  1,     2,    32,   0,   None,    "floats.quantize_bf16",  "floats.dequantize_bf16"),
    BlockType("Q8_0", 8,   32,    34,   7,    8,   None,    "simple.quantize_q8_0",  "blocks.segment_q8_0"),
    BlockType("Q4_0", 2,   32,    18,   2,    4,   None,    "simple.quantize_q4_0",  "blocks.segment_q4_0"),
    BlockType("Q4_1", 3,   32,    20,   3,    4,   None,    "simple.quantize_q4_1",  "blocks.segment_q4_1"),
    BlockType("Q5_0", 6,   32,    22,   8,    5,   None,    "simple.quantize_q5_0",  "blocks.segment_q5_0"),
    BlockType("Q5_1", 7,   32,    24,   9,    5,   None,    "simple.quantize_q5_1",  "blocks.segment_q5_1"),
    BlockType("Q2_K", 10,  256,   84,   10,   2,   "Q4_0",  "kquants.quantize_q2_k", "blocks.segment_q2_k"),
    BlockType("Q3_K", 11,  256,   110,  11,   3,   "Q4_0",  "kquants.quantize_q3_k", "blocks.segment_q3_k"),
    BlockType("Q4_K", 12,  256,   144,  14,   4,   "Q5_0",  "kquants.quantize_q4_k", "blocks.segment_q4_k"),
    BlockType("Q5_K", 13,  256,   176,  16,   5,   "Q5_1",  "kquants.quantize_q5_k", "blocks.segment_q5_k"),
    BlockType("Q6_K", 14,  256,   210,  18,   6,   "Q8_0",  "kquants.quantize_q6_k", "blocks.segment_q6_k"),
    BlockType("IQ4_NL", 20, 32,   18,   25,   4,   None,    "iquants.quantize_iq4_nl", "blocks.segment_iq4_nl"),
    BlockType("IQ4_XS", 23, 256,  136,  30,   4,   "IQ4_NL", "iquants.quantize_iq4_xs", "blocks.segment_iq4_xs"),
)

BY_NAME = {block_type.name: block_type for block_type in TYPES}

# The types stored in blocks of several values behind a scale, in TYPES' order: the fused
# kernels multiply from their blocks, and a type's index here is its `kind`, the number
# quant/blocks.py's decode_segment branches on.
BLOCK_TYPES = tuple(block_type.name for block_type in TYPES if block_type.block_values > 1)
KIND = {name: kind for kind, name in enumerate(BLOCK_TYPES)}


def block_shape(name):
    """(values, bytes) of one block of type `name`."""
    block_type = BY_NAME[name]
    return block_type.block_values, block_type.block_bytes

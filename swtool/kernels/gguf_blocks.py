"""Numba kernels: y = x @ W.T reading W in its GGUF block format, for the few tokens of a scan.

A GGUF weight is a run of blocks per row (swtool/quant/simple.py, kquants.py and
iquants.py give the layouts): Q8_0 ... Q5_1 hold 32 values behind one or two half scales,
the K-quants (Q2_K ... Q6_K) 256 values in sub-blocks with small integer scales,
IQ4_NL and IQ4_XS codes of 16 uneven levels (32 values a block, 256 a super-block).
The plain reader decodes the whole matrix to float32 and then calls BLAS, which
touches every weight three times (read the block, write f32, read f32) and, with
gguf-py's NumPy dequantizer, makes a dozen temporary arrays per tensor.

Here each worker owns four weight rows at a time. It decodes one segment of 256
columns of those rows into a small float32 tile (4 x 256 floats, 4 KB, which
stays in L1), and multiplies the tile into every input row with common.py's 4 x 4
register block, accumulating in float32. So each stored block is read once from
the memory map, decoded once, and the decoded floats serve all input rows before
they are dropped; the matrix never exists as float32.

The decoders are swtool.quant.blocks', the ones behind swtool.quant.dequantize
(Numba's disk cache of matmul_blocks_rows holds them compiled in: after adding a
branch to decode_segment, delete swtool/kernels/__pycache__/*.nb* too):
they give the same floats as ggml's `dequantize_row_*` (compiled without fastmath,
so no fused multiply-add changes a rounding); only the dot products use FAST
(reassociation and contraction), so results differ from dequantize + a float64
matmul by float32 accumulation error alone (tests/test_gguf_kernels.py).

Long inputs (eval's many tokens) go through swtool.quant.dequantize, Numba's
parallel decoder, and BLAS instead (checkpoint/gguf_file.py); swtool.kernels.fused_pays_off
chooses, by BLOCK_MAX_ROWS (measured by bench/gguf_scan.py).
"""

import numba
import numpy as np

from swtool.block_types import KIND, block_shape
from swtool.kernels.common import BLOCK, FAST, padded_rows, tile_block_4x4
from swtool.kernels.jit import read_only
from swtool.quant.blocks import decode_segment

SEGMENT = 256  # columns decoded at a time per weight row: a multiple of every block size


@numba.njit(parallel=True, fastmath=FAST, cache=True)
def matmul_blocks_rows(x, w, kind, block_values, n_cols, out):
    """out[n, o] = sum_k x[n, k] * W[o, k]; x [N, n_cols] float32 with N a multiple of 4,
    w [M, row_bytes] uint8 the stored blocks of `kind`, out [N, M] float32."""
    n_out = w.shape[0]
    for quad in numba.prange((n_out + 3) // 4):
        # four weight rows; the last quad repeats its last row (written twice, same value)
        o = np.empty(4, dtype=np.int64)
        for r in range(4):
            o[r] = min(4 * quad + r, n_out - 1)
        tile = np.empty((4, SEGMENT), dtype=np.float32)
        acc = np.zeros((x.shape[0], 4), dtype=np.float32)
        for start in range(0, n_cols, SEGMENT):
            # 1. decode these 256 columns of the four rows (each stored byte read once)
            width = min(SEGMENT, n_cols - start)
            for r in range(4):
                decode_segment(kind, w[o[r]], start, width, tile[r], block_values)
            # 2. multiply them into every input row, four at a time
            for g in range(0, x.shape[0], BLOCK):
                tile_block_4x4(x, g, start, width, tile, acc)
        for n in range(x.shape[0]):
            for r in range(4):
                out[n, o[r]] = acc[n, r]


def matmul_blocks(x, stored, dtype):
    """x [N, K] float32 times W.T, W [M, K] stored as `stored` [M, row_bytes] uint8 blocks of ggml type `dtype`."""
    values, nbytes = block_shape(dtype)
    n_cols = x.shape[1]
    if stored.ndim != 2 or stored.shape[1] * values != n_cols * nbytes:
        raise ValueError(f"{dtype} rows of {stored.shape[-1]} bytes do not hold {n_cols} columns")
    padded = padded_rows(x)
    out = np.empty((padded.shape[0], stored.shape[0]), dtype=np.float32)
    matmul_blocks_rows(padded, read_only(np.ascontiguousarray(stored)), KIND[dtype], values, n_cols, out)
    return out[:x.shape[0]]

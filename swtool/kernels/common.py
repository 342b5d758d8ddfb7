"""What every kernel module shares: the fastmath flags, the register block, input alignment,
the decode of one stored weight and the two 4 x 4 register blocks.

A leaf: it imports numba (after swtool.kernels.jit has set it up) and nothing else of swtool,
so the kernel modules import it and never each other's private names.

The 4 x 4 register block: four weight rows against four input rows. Each decoded weight
then serves four input rows and each loaded input value four weights, so the loop is bound
by the multiply-adds rather than by loads; LLVM vectorises it over k (16 lanes with
swtool.kernels.jit's 512-bit setting). Its two forms sit side by side below: `block_4x4`
decodes the stored bits as it goes (dense.py) and writes its sums out; `tile_block_4x4`
reads a tile already decoded to float32 (gguf_blocks.py) and adds its sums to accumulators.
"""

import swtool.kernels.jit  # noqa: F401  (512-bit vectors; before numba compiles anything)
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# fastmath: only reassociation and fused multiply-add, so the dot products vectorise;
# no NaN/Inf assumptions. Results move at float32 rounding level (tests hold them to transformers).
FAST = {"reassoc", "contract"}
BLOCK = 4  # input rows per register block; x is padded to a multiple of it
ALIGN = 64  # bytes: x rows start on cache lines, so 512-bit loads never straddle two


@intrinsic
def decode_weight(typingctx, bits):
    """One stored weight as float32. The array's dtype says how its bits decode, as numba
    has no float16 on the CPU: uint16 = bf16 (the top half of a float32), int16 = IEEE
    half (the bits of np.float16, converted by the CPU), float32 = itself."""
    i32, f32 = ir.IntType(32), ir.FloatType()
    if bits == types.uint16:
        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16)), f32)
    elif bits == types.int16:
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), f32)
    elif bits == types.float32:
        def codegen(context, builder, signature, args):
            return args[0]
    else:
        return None
    return types.float32(bits), codegen


def aligned_zeros(n_rows, n_columns):
    """A new float32 zero array [n_rows, n_columns] starting on a cache line."""
    size = n_rows * n_columns
    raw = np.zeros(size + ALIGN // 4, dtype=np.float32)
    skip = (-raw.ctypes.data % ALIGN) // 4
    return raw[skip:skip + size].reshape(n_rows, n_columns)


def padded_rows(x):
    """x [N, K] as a new float32 array of ceil(N / 4) * 4 rows (the extra ones zero), starting on a cache line."""
    padded = aligned_zeros(-(-x.shape[0] // BLOCK) * BLOCK, x.shape[1])
    padded[:x.shape[0]] = x
    return padded


# --- the 4 x 4 register blocks -----------------------------------------------------------------
# Written out twice rather than shared: one decodes stored bits inside its loop, the other reads
# float32 slices (with the column offset in the slice, not the index: with `x[g, start + k]` the
# loop did not vectorise).

@numba.njit(fastmath=FAST, cache=True, inline="always")
def block_4x4(x, g, w, o, out):
    """out[g:g+4, o[r]] = x[g:g+4] . W[o[r]] for the four weight rows o[0..3] (float32 accumulation),
    w the stored bits (see `decode_weight`)."""
    xa, xb, xc, xd = x[g], x[g + 1], x[g + 2], x[g + 3]
    w0, w1, w2, w3 = w[o[0]], w[o[1]], w[o[2]], w[o[3]]
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = np.float32(0.0)
    for k in range(x.shape[1]):
        va, vb, vc, vd = xa[k], xb[k], xc[k], xd[k]
        v = decode_weight(w0[k])
        a0 += va * v; a1 += vb * v; a2 += vc * v; a3 += vd * v  # noqa: E702
        v = decode_weight(w1[k])
        b0 += va * v; b1 += vb * v; b2 += vc * v; b3 += vd * v  # noqa: E702
        v = decode_weight(w2[k])
        c0 += va * v; c1 += vb * v; c2 += vc * v; c3 += vd * v  # noqa: E702
        v = decode_weight(w3[k])
        d0 += va * v; d1 += vb * v; d2 += vc * v; d3 += vd * v  # noqa: E702
    for r, (s0, s1, s2, s3) in enumerate(((a0, a1, a2, a3), (b0, b1, b2, b3),
                                          (c0, c1, c2, c3), (d0, d1, d2, d3))):
        out[g, o[r]] = s0
        out[g + 1, o[r]] = s1
        out[g + 2, o[r]] = s2
        out[g + 3, o[r]] = s3


@numba.njit(fastmath=FAST, cache=True, inline="always")
def tile_block_4x4(x, g, start, width, tile, acc):
    """acc[g:g+4, r] += x[g:g+4, start:start+width] . tile[r, :width] for the 4 decoded rows r (float32)."""
    xa, xb, xc, xd = x[g, start:start + width], x[g + 1, start:start + width], \
        x[g + 2, start:start + width], x[g + 3, start:start + width]
    w0, w1, w2, w3 = tile[0], tile[1], tile[2], tile[3]
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = np.float32(0.0)
    for k in range(width):
        va, vb, vc, vd = xa[k], xb[k], xc[k], xd[k]
        v = w0[k]
        a0 += va * v; a1 += vb * v; a2 += vc * v; a3 += vd * v  # noqa: E702
        v = w1[k]
        b0 += va * v; b1 += vb * v; b2 += vc * v; b3 += vd * v  # noqa: E702
        v = w2[k]
        c0 += va * v; c1 += vb * v; c2 += vc * v; c3 += vd * v  # noqa: E702
        v = w3[k]
        d0 += va * v; d1 += vb * v; d2 += vc * v; d3 += vd * v  # noqa: E702
    acc[g, 0] += a0; acc[g + 1, 0] += a1; acc[g + 2, 0] += a2; acc[g + 3, 0] += a3  # noqa: E702
    acc[g, 1] += b0; acc[g + 1, 1] += b1; acc[g + 2, 1] += b2; acc[g + 3, 1] += b3  # noqa: E702
    acc[g, 2] += c0; acc[g + 1, 2] += c1; acc[g + 2, 2] += c2; acc[g + 3, 2] += c3  # noqa: E702
    acc[g, 3] += d0; acc[g + 1, 3] += d1; acc[g + 2, 3] += d2; acc[g + 3, 3] += d3  # noqa: E702

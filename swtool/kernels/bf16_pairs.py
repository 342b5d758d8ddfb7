"""y = x @ W.T for bf16 weights, decoded two at a time (CPUs with AVX-512).

A bf16 weight is the top half of a float32, so decoding one is moving 16 bits.
dense.py's loop widens 16 bf16 weights into 16 float32 lanes and shifts them
up: two instructions per 16 weights, on the two ports the multiply-adds use. This
kernel loads the stored bits as 32-bit pairs instead, w[2p] in the low half and
w[2p+1] in the high half of each lane:

  - the odd weight is the pair with its low half cleared: one AND;
  - the even weight is the pair shifted up by 16: one shift;

one instruction per 16 weights, as cheap as any pair decode can be (bench/decode_ports.py
times them). The inputs are split once into their even and odd columns, so both halves
of a pair meet their input in the same lane.

The loop is written in LLVM IR (vectors of 16 lanes, llvm.fma) rather than left to
LLVM's vectoriser, which made the same pair decode slower than dense.py's loop.
It works on 4 weight rows x 4 or 5 input rows and prefetches each weight row ahead
of its loads. Every product is a float32 multiply-add of the exact weight: only the
order of the additions differs from dense.py (each lane sums its even products, then
its odd ones).

Measured with `python -m bench.kernels_bf16` (docs/performance.md; the numbers
behind the constants below: docs/kernel-measurements.md).
"""

import numpy as np

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from swtool.kernels.common import FAST, aligned_zeros, decode_weight

LANES = 16  # float32 lanes of a 512-bit register: 16 pairs, 32 weights per load
WEIGHT_ROWS = 4  # the register block: 4 weight rows x 4 or 5 input rows (see _pair_dots_4 below)
# Each weight row is prefetched this far ahead of its loads: the four rows of a block are four
# streams per core, more than the hardware prefetcher keeps up with (bench/kernels_bf16.py --prefetch).
PREFETCH_BYTES = 1024

_F32, _I32, _I64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
_V16F, _V16I = ir.VectorType(_F32, LANES), ir.VectorType(_I32, LANES)
_ODD_MASK = -(1 << 16)  # 0xFFFF0000 as a signed 32-bit constant


def available():
    """Does numba compile for a CPU with AVX-512 here? The kernel's 16-lane vectors are one
    register there; elsewhere dense.py's loop (vectorised by LLVM for the CPU) is used.

    The features numba compiles for, not only the host's: a user who sets NUMBA_CPU_NAME
    (say, "generic" for a portable cache) gets dense.py's loop too."""
    from numba.core import config
    from numba.core.codegen import get_host_cpu_features

    if config.CPU_NAME not in (None, "host"):
        return False
    return "+avx512f" in (config.CPU_FEATURES or get_host_cpu_features()).split(",")


def _row_address(builder, array, row):
    """The address of array[row, 0] as an integer (array: a numba array struct)."""
    row_stride = cgutils.unpack_tuple(builder, array.strides, 2)[0]
    return builder.add(builder.ptrtoint(array.data, _I64), builder.mul(row, row_stride))


def _vector_address(builder, row_address, vector_index):
    """row_address + 64 * vector_index: where vector `vector_index` of a row starts."""
    return builder.add(row_address, builder.mul(vector_index, ir.Constant(_I64, 64)))


def _load_vector(builder, row_address, vector_index, vector_type):
    """The 64 bytes at vector `vector_index` of a row (no alignment assumed)."""
    address = _vector_address(builder, row_address, vector_index)
    return builder.load(builder.inttoptr(address, vector_type.as_pointer()), align=1)


def _prefetch(builder, row_address, vector_index):
    """Ask for the cache line PREFETCH_BYTES past vector `vector_index` of a weight row (a hint:
    it never faults, so reading past the row or the mapping is harmless)."""
    if not PREFETCH_BYTES:
        return  # bench/kernels_bf16.py compiles a variant without it
    i8_pointer, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    prefetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8_pointer, i32, i32, i32]),
                                              "llvm.prefetch.p0")
    address = builder.add(_vector_address(builder, row_address, vector_index), ir.Constant(_I64, PREFETCH_BYTES))
    # read (0), keep in all cache levels (3), data (1)
    builder.call(prefetch, [builder.inttoptr(address, i8_pointer), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])


def _pair_dots_for(input_rows):
    """An intrinsic for one register block: WEIGHT_ROWS weight rows x `input_rows` input rows."""

    @intrinsic
    def pair_dots(typingctx, x_even, x_odd, first, w, rows, n_vectors):
        """The dot products of input rows first.. first + input_rows - 1 (split into even and odd
        columns) with weight rows rows[0..3] of w (bf16 bits as uint16), over the first
        32 * n_vectors columns, as a tuple ordered [weight row r * input_rows + input row i]."""
        signature = types.UniTuple(types.float32, WEIGHT_ROWS * input_rows)(x_even, x_odd, first, w, rows, n_vectors)

        def codegen(context, builder, sig, args):
            xe, xo, w_array, rows_array = (context.make_array(sig.args[i])(context, builder, args[i])
                                           for i in (0, 1, 3, 4))
            inputs = [builder.add(args[2], ir.Constant(_I64, i)) for i in range(input_rows)]
            even_rows = [_row_address(builder, xe, n) for n in inputs]
            odd_rows = [_row_address(builder, xo, n) for n in inputs]
            weight_rows = [_row_address(builder, w_array, builder.load(builder.gep(rows_array.data, [ir.Constant(_I64, r)])))
                           for r in range(WEIGHT_ROWS)]
            sums = [cgutils.alloca_once_value(builder, ir.Constant(_V16F, [0.0] * LANES))
                    for _ in range(WEIGHT_ROWS * input_rows)]
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
            shift, odd_mask = ir.Constant(_V16I, [16] * LANES), ir.Constant(_V16I, [_ODD_MASK] * LANES)
            with cgutils.for_range(builder, args[5]) as loop:
                x_evens = [_load_vector(builder, a, loop.index, _V16F) for a in even_rows]
                x_odds = [_load_vector(builder, a, loop.index, _V16F) for a in odd_rows]
                for r, row in enumerate(weight_rows):
                    pairs = _load_vector(builder, row, loop.index, _V16I)
                    _prefetch(builder, row, loop.index)
                    even = builder.bitcast(builder.shl(pairs, shift), _V16F)
                    odd = builder.bitcast(builder.and_(pairs, odd_mask), _V16F)
                    for i in range(input_rows):
                        total = builder.call(fma, [x_evens[i], even, builder.load(sums[input_rows * r + i])])
                        builder.store(builder.call(fma, [x_odds[i], odd, total]), sums[input_rows * r + i])
            reduce_add = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, _V16F]),
                                                        "llvm.vector.reduce.fadd.v16f32")
            totals = []
            for lanes in sums:
                total = builder.call(reduce_add, [ir.Constant(_F32, 0.0), builder.load(lanes)])
                total.fastmath.add("reassoc")  # a tree of adds, not 16 in a row
                totals.append(total)
            return context.make_tuple(builder, sig.return_type, totals)

        return signature, codegen

    return pair_dots


# 4 x 4 (16 accumulators) or 4 x 5 (20): the most that fit the 32 vector registers with the inputs
# (6 x 4 spilled). Ten-token prompts give 10 or 20 input rows, which 5 divides: 4 x 5 pads nothing.
_pair_dots_4 = _pair_dots_for(4)
_pair_dots_5 = _pair_dots_for(5)


def input_rows_for(n_rows):
    """The block's input rows for n_rows rows: 5 when that pads nothing, else 4."""
    return 5 if n_rows % 5 == 0 else 4


@numba.njit(fastmath=FAST, cache=True, inline="always")
def _store_block(sums, x_even, x_odd, first, w, rows, n_vectors, out):
    """out[first + i, rows[r]] = sums[r * inputs + i] plus the columns past the last whole vector."""
    inputs = len(sums) // WEIGHT_ROWS
    n_columns = w.shape[1]
    for r in range(WEIGHT_ROWS):
        weights = w[rows[r]]
        for i in range(inputs):
            total = sums[inputs * r + i]
            for k in range(2 * LANES * n_vectors, n_columns):
                xk = x_even[first + i, k // 2] if k % 2 == 0 else x_odd[first + i, k // 2]
                total += xk * decode_weight(weights[k])
            out[first + i, rows[r]] = total


@numba.njit(parallel=True, fastmath=FAST, cache=True)
def matmul_pairs(x_even, x_odd, w, out):
    """out[n, o] = sum_k x[n, k] * W[o, k]; x given as its even and odd columns
    (x_even[n, p] = x[n, 2p], x_odd[n, p] = x[n, 2p + 1], rows a multiple of 4 or 5, see
    `input_rows_for`), w [M, K] bf16 bits as uint16, out [N, M] float32."""
    n_out, n_columns = w.shape
    n_vectors = n_columns // (2 * LANES)
    n_rows = x_even.shape[0]
    for block in numba.prange((n_out + WEIGHT_ROWS - 1) // WEIGHT_ROWS):
        rows = np.empty(WEIGHT_ROWS, dtype=np.int64)  # the last block repeats its last row (same value written twice)
        for r in range(WEIGHT_ROWS):
            rows[r] = min(WEIGHT_ROWS * block + r, n_out - 1)
        if n_rows % 5 == 0:
            for first in range(0, n_rows, 5):
                sums5 = _pair_dots_5(x_even, x_odd, first, w, rows, n_vectors)
                _store_block(sums5, x_even, x_odd, first, w, rows, n_vectors, out)
        else:
            for first in range(0, n_rows, 4):
                sums4 = _pair_dots_4(x_even, x_odd, first, w, rows, n_vectors)
                _store_block(sums4, x_even, x_odd, first, w, rows, n_vectors, out)


def split_columns(x):
    """x [N, K] float32 -> (even columns, odd columns), each [N rounded up to the block's input
    rows, ceil(K / 2)], rows padded with zeros and starting on a cache line (the odd half of an
    odd K ends in a zero)."""
    inputs = input_rows_for(x.shape[0])
    n_rows = -(-x.shape[0] // inputs) * inputs
    half = -(-x.shape[1] // 2)
    stride = -(-half // LANES) * LANES  # a whole number of vectors per row
    halves = []
    for start in (0, 1):
        half_x = aligned_zeros(n_rows, stride)[:, :half]
        columns = x[:, start::2]
        half_x[:x.shape[0], :columns.shape[1]] = columns
        halves.append(half_x)
    return halves


def matmul(x, stored):
    """x [N, K] float32 times stored.T, stored the [M, K] uint16 bits of a bf16 matrix (rows contiguous)."""
    x_even, x_odd = split_columns(x)
    out = np.empty((x_even.shape[0], stored.shape[0]), dtype=np.float32)
    matmul_pairs(x_even, x_odd, stored, out)
    return out[:x.shape[0]]


"""Scalar helpers every quantizer shares, each a Numba port of one ggml macro or function.

Bit-exactness with ggml comes down to doing the same float32 operations in the
same order. ggml's reference quantizers are plain C compiled without -ffast-math
and, in libggml-base, without FMA, so each `a*b + c` rounds twice. Numba without
fastmath does the same. The traps are Python's number typing:
  - float32 * int64 is float64 in Numba: every int that meets a float is wrapped
    in np.float32() first, as C converts it to float;
  - float literals are float64: constants are np.float32(...);
  - uint32 + uint32 is 64-bit: bit patterns are handled as int64 and masked.
`as_bits` and `from_bits` only accept float32 / integers, so a value that
silently became float64 fails to compile instead of rounding differently.
"""

import swtool.kernels.jit  # noqa: F401  (numba set-up, as for the kernels: before numba compiles anything)
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

JIT = dict(cache=True)  # every kernel: compiled once per machine, kept in __pycache__


# ---------------------------------------------------------------------------
# float32 <-> its 32 bits, as C's memcpy / union does

@intrinsic
def _f32_to_i32(typingctx, value):
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _i32_to_f32(typingctx, bits):
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@numba.njit(**JIT)
def as_bits(value):
    """The 32 bits of a float32, as a non-negative int64 (0 .. 2**32 - 1)."""
    return np.int64(_f32_to_i32(value)) & 0xFFFFFFFF


@numba.njit(**JIT)
def from_bits(bits):
    """The float32 whose bit pattern is the low 32 bits of `bits`."""
    return _i32_to_f32(np.int32(np.uint32(bits & 0xFFFFFFFF)))


# ---------------------------------------------------------------------------
# rounding to integers

@numba.njit(**JIT)
def nearest_int(value):
    """ggml's nearest_int: add 1.5 * 2**23 so the float32 sum rounds half to even, read the mantissa.

    ggml asserts |value| <= 4194303; beyond that it returns the same wrapped bits as here.
    """
    shifted = value + np.float32(12582912.0)
    return (as_bits(shifted) & 0x007FFFFF) - 0x00400000


INT_MIN = -2147483648  # what x86's cvttss2si gives for NaN and out-of-range floats


@numba.njit(**JIT)
def _fits_int32(value):
    return np.float32(-2147483648.0) <= value < np.float32(2147483648.0)  # False for NaN


@numba.njit(**JIT)
def trunc_int(value):
    """C's (int)float, toward zero, as compiled for x86 (cvttss2si).

    Out of range is undefined in C; in ggml it happens when d underflows and
    1/d is inf (blocks of float32 denormals), and x86 then gives INT_MIN.
    """
    if not _fits_int32(value):
        return INT_MIN
    return np.int64(np.int32(value))


@numba.njit(**JIT)
def roundf_int(value):
    """C's roundf, half away from zero, as an int (Q8_0 stores roundf(x / d)).

    value - trunc(value) is exact in float32, so the half-way test is too
    (trunc(value + 0.5) is not: 0.49999997 + 0.5 rounds up to 1.0).
    """
    if not _fits_int32(value):
        return INT_MIN
    whole = trunc_int(value)
    rest = value - np.float32(whole)
    if rest >= np.float32(0.5):
        return whole + 1
    if rest <= np.float32(-0.5):
        return whole - 1
    return whole


@numba.njit(**JIT)
def to_int8(value):
    """C's (int8_t) of an int: keep the low 8 bits, signed."""
    return ((value + 128) & 0xFF) - 128


# ---------------------------------------------------------------------------
# half precision and bfloat16, as ggml-impl.h computes them (ggml_compute_fp32_to_fp16 ...)

@numba.njit(**JIT)
def fp32_to_fp16(value):
    """float32 -> IEEE half bits, round to nearest even; overflow gives inf, NaN gives 0x7E00."""
    # scaling by 2**112 then 2**-110 rounds the mantissa at the half's precision
    base = (abs(value) * np.float32(2.0 ** 112)) * np.float32(2.0 ** -110)
    w = as_bits(value)
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = from_bits((bias >> 1) + 0x07800000) + base
    bits = as_bits(base)
    exp_bits = (bits >> 13) & 0x00007C00
    mantissa_bits = bits & 0x00000FFF
    nonsign = 0x7E00 if shl1_w > 0xFF000000 else exp_bits + mantissa_bits
    return (sign >> 16) | nonsign


@numba.njit(**JIT)
def fp16_to_fp32(half):
    """IEEE half bits -> float32 (exact)."""
    w = (np.int64(half) & 0xFFFF) << 16
    sign = w & 0x80000000
    two_w = (w + w) & 0xFFFFFFFF
    normalized = from_bits((two_w >> 4) + (0xE0 << 23)) * np.float32(2.0 ** -112)
    denormalized = from_bits((two_w >> 17) | (126 << 23)) - np.float32(0.5)
    if two_w < (1 << 27):
        return from_bits(sign | as_bits(denormalized))
    return from_bits(sign | as_bits(normalized))


@numba.njit(**JIT)
def fp32_to_bf16(value):
    """float32 -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN."""
    bits = as_bits(value)
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        return (bits >> 16) | 64
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFFFFFF) >> 16


@numba.njit(**JIT)
def bf16_to_fp32(half):
    return from_bits((np.int64(half) & 0xFFFF) << 16)


# ---------------------------------------------------------------------------
# little-endian fields inside a block's bytes

@numba.njit(**JIT)
def put_u16(out, offset, value):
    out[offset] = value & 0xFF
    out[offset + 1] = (value >> 8) & 0xFF


@numba.njit(**JIT)
def get_u16(data, offset):
    return np.int64(data[offset]) | (np.int64(data[offset + 1]) << 8)


@numba.njit(**JIT)
def put_fp16(out, offset, value):
    """Store float32 `value` as a half at out[offset:offset + 2]; return the half read back as float32.

    ggml rounds d and dmin to half and then quantizes against the rounded value,
    so the caller needs both.
    """
    half = fp32_to_fp16(value)
    put_u16(out, offset, half)
    return fp16_to_fp32(half)


@numba.njit(**JIT)
def get_fp16(data, offset):
    return fp16_to_fp32(get_u16(data, offset))


# ---------------------------------------------------------------------------
# input check

@numba.njit(**JIT)
def has_nonfinite(row):
    """True if the float32 row holds a NaN or an infinity (exponent bits all ones)."""
    bits = row.view(np.uint32)
    top = np.uint32(0)
    for i in range(bits.shape[0]):
        top = max(top, bits[i] & np.uint32(0x7F800000))  # an integer max: vectorises
    return top == np.uint32(0x7F800000)

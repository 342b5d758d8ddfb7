"""Why bf16_pairs decodes pairs: loops of AVX-512 instructions, timed.

    python -m bench.decode_ports

Each loop is a block of the bf16 product with its loads taken out: per 32 bf16
weights of a row, its decode instructions and the 32 multiply-adds of a 4 x 4 block
(16 accumulators), all in registers, so only the execution ports count. Also
timed: multiply-adds alone, and `vdpbf16ps` (AVX-512 BF16's dot product of bf16
pairs, 32 multiply-adds per instruction). One core; G multiply-adds per second
(for vdpbf16ps, 32 per instruction). Registers hold 1.0 and 0.0, so no
subnormals slow anything down. Results go to bench/results/decode_ports.json.
"""

import json
import time
from pathlib import Path

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from bench.run import machine
from swtool.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]

llvm.initialize_native_asmparser()  # numba compiles inline assembly only with it

# zmm16-19: inputs (1.0); zmm0-15: accumulators (0.0); zmm29: the AND mask (and widened weights);
# zmm30: the "loaded" weights; zmm20-27: decoded weights
SETUP = ("mov $$0x3f800000, %eax\n" + "".join(f"vpbroadcastd %eax, %zmm{i}\n" for i in range(16, 31)) +
         "".join(f"vpxord %zmm{i}, %zmm{i}, %zmm{i}\n" for i in range(16)))
# per 32 bf16 weights of one row: the decode instructions, each writing one of zmm20-27 ({a}, {b})
DECODES = {
    "widen + shift, twice (kernels.py's loop)": ["vpmovzxwd %ymm30, %zmm{a}", "vpslld $$16, %zmm{a}, %zmm{a}",
                                                 "vpmovzxwd %ymm29, %zmm{b}", "vpslld $$16, %zmm{b}, %zmm{b}"],
    "shift + AND (bf16_pairs)": ["vpslld $$16, %zmm30, %zmm{a}", "vpandd %zmm29, %zmm30, %zmm{b}"],
    "AND + AND (no cheaper pair exists)": ["vpandd %zmm29, %zmm30, %zmm{a}", "vpandd %zmm29, %zmm30, %zmm{b}"],
}


def block(decode):
    """4 weight rows x 4 inputs, 32 weights per row: the row's decode, then 8 multiply-adds."""
    lines = []
    for r in range(4):
        lines += [op.format(a=20 + r, b=24 + r) for op in decode]
        lines += [f"vfmadd231ps %zmm{20 + r}, %zmm{16 + c}, %zmm{4 * r + c}" for c in range(4)]
        lines += [f"vfmadd231ps %zmm{24 + r}, %zmm{16 + c}, %zmm{4 * r + c}" for c in range(4)]
    return lines


def timed_loop(lines):
    """A numba function running `lines` n times: seconds per run of the block, best of 5."""
    body = SETUP + "mov $0, %rcx\n1:\n" + "\n".join(lines) + "\ndec %rcx\njnz 1b\n"
    clobbers = ",".join(["r"] + [f"~{{xmm{i}}}" for i in range(31)] + ["~{rcx}", "~{rax}", "~{cc}"])

    @intrinsic
    def loop(typingctx, n):
        def codegen(context, builder, signature, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [ir.IntType(64)]), body, clobbers, side_effect=True)
            builder.call(asm, [args[0]])
            return context.get_dummy_value()
        return types.none(n), codegen

    @numba.njit
    def run(n):
        loop(n)

    n = 2_000_000
    run(10)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        run(n)
        best = min(best, time.perf_counter() - start)
    return best / n


def main():
    results = []
    for name, decode in DECODES.items():
        seconds = timed_loop(block(decode))
        results.append({"loop": name, "g_multiply_adds_per_s": 512 / seconds / 1e9})
    fma_only = [f"vfmadd231ps %zmm20, %zmm{16 + c}, %zmm{4 * r + c}" for r in range(4) for c in range(4)]
    results.append({"loop": "multiply-adds alone", "g_multiply_adds_per_s": 256 / timed_loop(fma_only) / 1e9})
    dot = [f"vdpbf16ps %zmm30, %zmm{16 + c}, %zmm{4 * r + c}" for r in range(4) for c in range(4)]
    results.append({"loop": "vdpbf16ps (bf16 pairs, 32 per instruction)",
                    "g_multiply_adds_per_s": 16 * 32 / timed_loop(dot) / 1e9})
    for r in results:
        print(f"{r['loop']:45s} {r['g_multiply_adds_per_s']:6.1f} G multiply-adds/s")
    report = {"machine": machine(), "command": "bench/decode_ports.py", "results": results}
    out = ROOT / "bench" / "results" / "decode_ports.json"
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"results written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""The bf16 product of a scan, kernel against kernel: swtool/kernels/bf16_pairs.py against dense.py's loop.

    python -m bench.kernels_bf16 [--tensors 16] [--repeats 3] [--prefetch 0,1024]

The matrices are Llama-7B MLP shaped (11008 x 4096 bf16, random), --tensors of them,
so every pass streams them from memory as a scan does (1.4 GB for 16, more than the
L3 cache); the input is 20 rows, two worlds of a 10-token prompt. Each kernel runs
over all of them, best of --repeats, with one and with two threads. bf16_pairs is
compiled once per --prefetch distance (0 = no software prefetch); the distance the
module ships with is marked. Results go to bench/results/kernels_bf16.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numba
import numpy as np

from bench.run import machine
from swtool.kernels import bf16_pairs, common, dense
from swtool.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]

SHAPE = (11008, 4096)
ROWS = 20


def pairs_kernel(prefetch):
    """bf16_pairs.matmul_pairs compiled (uncached) with this prefetch distance."""
    shipped, bf16_pairs.PREFETCH_BYTES = bf16_pairs.PREFETCH_BYTES, prefetch
    try:
        kernel = numba.njit(parallel=True, fastmath=common.FAST)(bf16_pairs.matmul_pairs.py_func)
        x_even, x_odd = bf16_pairs.split_columns(np.ones((4, 64), np.float32))
        kernel(x_even, x_odd, np.ones((4, 64), np.uint16), np.empty((4, 4), np.float32))  # compile now
    finally:
        bf16_pairs.PREFETCH_BYTES = shipped
    return kernel


def best_pass(multiply, tensors, repeats):
    multiply(tensors[0])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for w in tensors:
            multiply(w)
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefetch", default=f"0,{bf16_pairs.PREFETCH_BYTES}")
    args = parser.parse_args()
    if not bf16_pairs.available():
        sys.exit("bench: this CPU (or NUMBA_CPU_NAME) has no AVX-512: bf16_pairs does not run here")
    rng = np.random.default_rng(0)
    tensors = [rng.integers(0x3C00, 0x4000, SHAPE, dtype=np.uint16) ^ rng.integers(0, 2, SHAPE, dtype=np.uint16) << 15
               for _ in range(args.tensors)]
    x = rng.standard_normal((ROWS, SHAPE[1])).astype(np.float32)
    padded = common.padded_rows(x)
    x_even, x_odd = bf16_pairs.split_columns(x)
    out = np.empty((padded.shape[0], SHAPE[0]), np.float32)
    variants = {"kernels.py loop (4 x 4, widen + shift)": lambda w: dense.matmul_rows(padded, w, out)}
    for distance in map(int, args.prefetch.split(",")):
        kernel = pairs_kernel(distance)
        shipped = " (shipped)" if distance == bf16_pairs.PREFETCH_BYTES else ""
        variants[f"bf16_pairs, prefetch {distance} B{shipped}"] = \
            lambda w, kernel=kernel: kernel(x_even, x_odd, w, out)
    multiply_adds = ROWS * SHAPE[0] * SHAPE[1] * len(tensors)
    results = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        for name, multiply in variants.items():
            seconds = best_pass(multiply, tensors, args.repeats)
            results.append({"kernel": name, "threads": threads, "seconds": seconds,
                            "gfma_per_s": multiply_adds / seconds / 1e9,
                            "gb_per_s": 2 * multiply_adds / ROWS / seconds / 1e9})
            print(f"{threads} thread(s)  {name:45s} {results[-1]['gfma_per_s']:6.1f} G multiply-adds/s  "
                  f"{results[-1]['gb_per_s']:5.1f} GB/s of weights", flush=True)
    report = {"machine": machine(), "command": " ".join(["bench/kernels_bf16.py"] + sys.argv[1:]),
              "shape": list(SHAPE), "rows": ROWS, "tensors": len(tensors), "results": results}
    out_path = ROOT / "bench" / "results" / "kernels_bf16.json"
    write_text_atomic(out_path, json.dumps(report, indent=2) + "\n")
    print(f"results written to {out_path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

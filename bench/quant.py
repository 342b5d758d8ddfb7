"""Quantizer throughput: swtool's Numba kernels vs gguf-py's NumPy and ggml's C, side by side.

    python -m bench.quant [--shape 4096x4096] [--types q8_0,q4_k,...] [--repeats 3]

One float32 matrix (N(0, 0.02) with a super-weight-sized outlier every 64 rows),
quantized to every type by:
  - swtool.quant.quantize, with all Numba threads and with one thread;
  - gguf-py's gguf.quants.quantize (NumPy; it has no K-quant quantizer);
  - ggml's ggml_quantize_chunk through ctypes, one thread (libggml-base.so from
    llama-cpp-python, the same call llama-quantize makes per chunk).
The types that use an importance matrix are timed with one as well (an
imatrix-shaped vector, one weight per column: swtool.quant.quantize(..., importance=)
against ggml_quantize_chunk with that imatrix), in a second table.
Throughput is MB of float32 input per second of wall time, best of --repeats;
CPU time per MB is recorded too (the machine is shared: wall times move with
its load, CPU times much less). swtool's bytes are also checked against ggml's.
Results go to bench/results/quant.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numba
import numpy as np
import gguf

from bench.run import machine
from fixtures.ggml_oracle import Ggml
from swtool.atomic import write_text_atomic
from swtool.quant import TYPES, quant_type, quantize

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats):
    """(best wall seconds, CPU seconds of that run, result) over `repeats` calls."""
    best = (float("inf"), 0.0, None)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if wall < best[0]:
            best = (wall, cpu, result)
    return best


def test_matrix(rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.normal(0.0, 0.02, (rows, cols)).astype(np.float32)
    values[::64, rng.integers(cols)] = -2.5  # a super-weight-sized value in one block of every 64th row
    return values


def importance_vector(cols, seed=1):
    """An imatrix-like weight per column: mean squares, chi-square spread, a few columns 1e4 times the rest."""
    rng = np.random.default_rng(seed)
    weights = rng.chisquare(1, cols) * 1e-2 + 1e-6
    weights[rng.choice(cols, 4, replace=False)] *= 1e4
    return weights.astype(np.float32)


# the types whose ggml quantizer reads an imatrix (Q8_0 and the float types ignore it)
WEIGHTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


def bench_importance(qtype, values, ggml, repeats):
    """swtool vs ggml with an importance vector, for a type that uses one; None for the others."""
    if qtype.name not in WEIGHTED:
        return None
    megabytes = values.nbytes / 1e6
    threads = numba.get_num_threads()
    importance = importance_vector(values.shape[1])
    quantize(values[:2], qtype, importance=importance)  # compile outside the timing
    wall, cpu, ours = timed(lambda: quantize(values, qtype, importance=importance), repeats)
    row = {"swtool": {"threads": threads, "mb_per_s": megabytes / wall, "cpu_s_per_mb": cpu / megabytes}}
    numba.set_num_threads(1)
    try:
        wall, cpu, _ = timed(lambda: quantize(values, qtype, importance=importance), repeats)
    finally:
        numba.set_num_threads(threads)
    row["swtool_1_thread"] = {"mb_per_s": megabytes / wall, "cpu_s_per_mb": cpu / megabytes}
    wall, cpu, reference = timed(lambda: ggml.quantize(values, qtype, importance), repeats)
    row["ggml_c_1_thread"] = {"mb_per_s": megabytes / wall, "cpu_s_per_mb": cpu / megabytes}
    row["same_bytes_as_ggml"] = bool(np.array_equal(ours, reference))
    return row


def bench_type(qtype, values, ggml, repeats):
    megabytes = values.nbytes / 1e6
    threads = numba.get_num_threads()
    quantize(values[:2], qtype)  # compile (or load the cache) outside the timing
    row = {"type": qtype.name}

    wall, cpu, ours = timed(lambda: quantize(values, qtype), repeats)
    row["swtool"] = {"threads": threads, "mb_per_s": megabytes / wall, "cpu_s_per_mb": cpu / megabytes}
    numba.set_num_threads(1)
    try:
        wall, cpu, _ = timed(lambda: quantize(values, qtype), repeats)
    finally:
        numba.set_num_threads(threads)
    row["swtool_1_thread"] = {"mb_per_s": megabytes / wall, "cpu_s_per_mb": cpu / megabytes}

    row["gguf_py"] = None  # no K-quant quantizer; and F32 returns its input, nothing to time
    if qtype != gguf.GGMLQuantizationType.F32:
        try:
            wall, cpu, _ = timed(lambda: gguf.quants.quantize(values, qtype), repeats)
            row["gguf_py"] = {"mb_per_s": megabytes / wall, "cpu_s_per_mb": cpu / megabytes}
        except NotImplementedError:
            pass

    wall, cpu, reference = timed(lambda: ggml.quantize(values, qtype), repeats)
    row["ggml_c_1_thread"] = {"mb_per_s": megabytes / wall, "cpu_s_per_mb": cpu / megabytes}
    row["same_bytes_as_ggml"] = bool(np.array_equal(ours, reference))
    row["with_importance"] = bench_importance(qtype, values, ggml, repeats)
    return row


def print_importance_table(rows, threads):
    header = (f"{'type':<6} {f'swtool ({threads} thr)':>15} {'swtool (1 thr)':>15} {'ggml C (1 thr)':>15} | "
              f"{'1 thr vs C':>10} {'CPU vs C':>8} | same bytes")
    print("\nwith an importance vector (imatrix):")
    print(header)
    print("-" * len(header))
    for r in rows:
        w = r.get("with_importance")
        if not w:
            continue
        ours, one, c = w["swtool"], w["swtool_1_thread"], w["ggml_c_1_thread"]
        print(f"{r['type']:<6} {ours['mb_per_s']:>10.0f} MB/s {one['mb_per_s']:>10.0f} MB/s "
              f"{c['mb_per_s']:>10.0f} MB/s | {one['mb_per_s'] / c['mb_per_s']:>9.2f}x "
              f"{c['cpu_s_per_mb'] / one['cpu_s_per_mb']:>7.2f}x | {'yes' if w['same_bytes_as_ggml'] else 'NO'}")


def print_table(rows, threads):
    header = (f"{'type':<5} {f'swtool ({threads} thr)':>15} {'swtool (1 thr)':>15} {'gguf-py':>12} "
              f"{'ggml C (1 thr)':>15} | {'vs gguf-py':>10} {'1 thr vs C':>10} | {'CPU: vs py':>10} "
              f"{'vs C':>6} | same bytes")
    print(header)
    print("-" * len(header))
    for r in rows:
        ours, one, c, py = r["swtool"], r["swtool_1_thread"], r["ggml_c_1_thread"], r["gguf_py"]
        py_speed = f"{py['mb_per_s']:.0f} MB/s" if py else "n/a"
        vs_py = f"{ours['mb_per_s'] / py['mb_per_s']:.1f}x" if py else "n/a"
        cpu_vs_py = f"{py['cpu_s_per_mb'] / one['cpu_s_per_mb']:.1f}x" if py else "n/a"
        print(f"{r['type']:<5} {ours['mb_per_s']:>10.0f} MB/s {one['mb_per_s']:>10.0f} MB/s {py_speed:>12} "
              f"{c['mb_per_s']:>10.0f} MB/s | {vs_py:>10} {one['mb_per_s'] / c['mb_per_s']:>9.2f}x | "
              f"{cpu_vs_py:>10} {c['cpu_s_per_mb'] / one['cpu_s_per_mb']:>5.2f}x | "
              f"{'yes' if r['same_bytes_as_ggml'] else 'NO'}")
    print("MB/s: MB of float32 input per second of wall time, best of the repeats. vs gguf-py: swtool with all "
          "threads; CPU: CPU seconds per MB of gguf-py / ggml over swtool's, one thread each.")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x4096", help="rows x cols of the float32 matrix (cols % 256 == 0)")
    parser.add_argument("--types", default=",".join(t.name.lower() for t in TYPES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows, cols = (int(n) for n in args.shape.lower().split("x"))
    values = test_matrix(rows, cols)
    ggml = Ggml()
    load_before = machine()["load_average"]
    results = []
    for name in args.types.split(","):
        results.append(bench_type(quant_type(name), values, ggml, args.repeats))
        print(f"  {name}: done", file=sys.stderr, flush=True)
    print(f"{rows}x{cols} float32 ({values.nbytes / 1e6:.0f} MB), best of {args.repeats}; "
          f"load average {load_before[0]:.1f} before, {machine()['load_average'][0]:.1f} after")
    print_table(results, numba.get_num_threads())
    print_importance_table(results, numba.get_num_threads())
    out = ROOT / "bench" / "results" / "quant.json"
    out.parent.mkdir(exist_ok=True)
    report = {"machine": machine(), "load_average_before": load_before,
              "command": " ".join(["bench/quant.py"] + sys.argv[1:]), "shape": [rows, cols],
              "numba_threads": numba.get_num_threads(), "threading_layer": numba.threading_layer(),
              "results": results}
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"results written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

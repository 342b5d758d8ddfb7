"""`make bench`: swtool against the bytes it reads and against its peers, side by side in one run.

    python -m bench.run [--shapes smollm2,llama-1b,llama-7b] [--runs 3] [--skip peer,eval,imatrix,quant,kernels,gguf]

The machine is shared and its load moves, so every comparison is made between
numbers measured next to each other in this run, and both numbers are kept:
  - startup: `swtool --help`, best of 5 (no NumPy or Numba at import);
  - per checkpoint (the SmolLM2 fixture, synthetic Llama shapes from synth.py, each
    with one planted super weight):
      read once: every weight file read start to end, from disk after evicting it from the page
      cache, then warm (best of 3; see read_once_seconds for why the bench reads them first);
      `swtool scan` under /usr/bin/time -v: wall time and maximum resident set size
      (mapped file pages count), best of --runs, and whether the planted weight was
      found, exactly (the synthetic checkpoints); the same scan inside this process, Python's
      and Numba's start-up excluded; then once more from disk, cache evicted;
      the peer: transformers + torch load the model and hook down_proj
      (bench/peer_transformers.py), under /usr/bin/time -v the same way;
  - Numba: the first scan with an empty kernel cache (everything compiled) against
    the cached ones (NUMBA_CACHE_DIR of this run);
  - eval tokens/s against transformers on SmolLM2 (bench/eval.py), `swtool imatrix --text` tokens/s on
    8192 tokens against transformers' forward pass (bench/imatrix.py), quantizer MB/s
    against gguf-py and ggml's C (bench/quant.py), the bf16 product alone, swtool/kernels/bf16_pairs.py
    against dense.py's loop (bench/kernels_bf16.py, bench/decode_ports.py), and GGUF scans with the fused block
    kernels against the old decode-everything path (bench/gguf_scan.py, one thread), each
    run here and read back.
One table of ratios at the end; everything goes to bench/results/bench.json with a
description of the machine.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.timing import timed

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SWTOOL = BIN / "swtool"
RESULTS = ROOT / "bench" / "results"
TARGET_RATIO = 1.5  # issue 7: scan wall time <= 1.5 x read-once ...
TARGET_RSS = 1.5e9  # ... and peak RSS <= 1.5 GB


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "python": platform.python_version(),
            "kernel": platform.release(), "avx512": "avx512f" in flags, "load_average": os.getloadavg()}


def environment(cache_dir=None):
    """The subprocesses' environment: Python writes and uses .pyc files as it normally does
    (this sandbox sets PYTHONDONTWRITEBYTECODE), Numba caches in `cache_dir` if given."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    return env


# --- measurements -----------------------------------------------------------------------

def startup_seconds(repeats=5):
    """Best wall time of `swtool --help`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([str(SWTOOL), "--help"], capture_output=True, check=True, env=environment())
        best = min(best, time.perf_counter() - start)
    return best


def evict(files):
    """Drop these files' pages from the page cache (POSIX_FADV_DONTNEED: only ours, only clean pages)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(files):
    """(wall seconds, CPU seconds) to read every byte of `files`, start to end, into one reused
    1 MiB buffer: what `cat files > /dev/null` does (and as fast, measured: 3.72 vs 3.55 s for the
    7B shape; reading into a new 16 MiB object each time took 4.03 s)."""
    buffer = bytearray(1 << 20)
    start, cpu = time.perf_counter(), cpu_seconds()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - start, cpu_seconds() - cpu


def cpu_seconds():
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def read_once_seconds(files, repeats=3):
    """(cold, warm): the files read from disk after evicting them, then the best of `repeats` reads
    from the page cache.

    The first read also sets the state every warm measurement starts from. How pages entered the
    cache matters: read sequentially, a file lands in large folios (2 MB pages) that a memory map
    can map with one entry each, while pages left by the writer of the file are often small ones,
    which cost a scan ~10x more page-table work. So the bench reads its files once itself first."""
    evict(files)
    cold = read_all(files)
    return cold, min(read_all(files) for _ in range(repeats))  # (wall, CPU), the best wall


def checkpoint_for(shape):
    """(directory, planted super weight or None) of a benchmark checkpoint, built if missing."""
    if shape == "smollm2":
        from fixtures import smollm2

        directory = ROOT / "fixtures" / "build" / "smollm2"
        smollm2.build(directory)
        return directory, None
    from bench import synth

    directory = ROOT / "bench" / "build" / shape
    return directory, synth.generate(directory, shape, int(2e9), 0)


def memory_available():
    """Bytes the kernel could give a new process now (MemAvailable)."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))


def prompt_ids(directory):
    from swtool.tokenizer import DEFAULT_PROMPT, encode

    return [int(i) for i in encode(Path(directory), DEFAULT_PROMPT)]


def bench_scan(shape, runs, cache_dir, peer):
    directory, planted = checkpoint_for(shape)
    files = sorted(directory.glob("*.safetensors"))
    row = {"checkpoint": shape, "bytes": sum(p.stat().st_size for p in files),
           "memory_available_bytes": memory_available()}
    (row["cold_read_s"], _), (row["read_once_s"], row["read_once_cpu_s"]) = read_once_seconds(files)
    scans = []
    for _ in range(runs):
        wall, rss, out, cpu = timed([SWTOOL, "scan", directory, "--json", "--no-progress"], environment(cache_dir))
        scans.append((wall, rss, json.loads(out), cpu))
    best = min(scans, key=lambda s: s[0])
    catalog = best[2]
    row["scan_cpu_s"] = best[3]
    found = [[sw["layer"], sw["row"], sw["col"]] for sw in catalog["super_weights"]]
    row["scan_in_process_s"] = scan_in_process(directory, runs)
    row.update(scan_s=best[0], scan_runs_s=[s[0] for s in scans], scan_over_read=best[0] / row["read_once_s"],
               peak_rss_bytes=max(s[1] for s in scans), found=found, passes=catalog["detection"]["passes"])
    if planted:
        row["planted"] = [planted["layer"], planted["row"], planted["col"]]
        row["planted_found"] = found == [row["planted"]]
    evict(files)  # the same scan from disk: against the cold read above
    row["cold_scan_s"], _, _, _ = timed([SWTOOL, "scan", directory, "--json", "--no-progress"], environment(cache_dir))
    if peer and memory_available() < 1.2 * row["bytes"] + 2e9:
        # transformers holds the whole model in RAM: on a shared machine, do not push others into swap or OOM
        print(f"  {shape}: transformers skipped, {memory_available() / 1e9:.1f} GB available for a "
              f"{row['bytes'] / 1e9:.1f} GB model", file=sys.stderr)
        row["transformers"] = {"skipped": f"{memory_available() / 1e9:.1f} GB available"}
    elif peer:
        wall, rss, out, cpu = timed([sys.executable, "-m", "bench.peer_transformers", directory,
                                     "--ids", ",".join(map(str, prompt_ids(directory)))], environment())
        result = json.loads(out.strip().splitlines()[-1])
        row["transformers"] = {"wall_s": wall, "peak_rss_bytes": rss, "cpu_s": cpu, **result}
    print(f"  {shape}: read once {row['read_once_s']:.2f} s, scan {row['scan_s']:.2f} s, "
          f"peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB" +
          (f", transformers {row['transformers']['wall_s']:.2f} s" if peer else ""), file=sys.stderr, flush=True)
    return row


def scan_in_process(directory, runs):
    """Best seconds of load + tokenize + scan inside this process, after one untimed scan: the
    scan without Python's and Numba's start-up, as a library user scanning several models pays it."""
    from swtool.detect import Settings, scan
    from swtool.model import load_model
    from swtool.tokenizer import DEFAULT_PROMPT, encode

    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        model = load_model(directory)
        scan(model, encode(model.directory, DEFAULT_PROMPT), Settings(DEFAULT_PROMPT))
        times.append(time.perf_counter() - start)
    return min(times[1:])


def bench_first_run(shape, runs, cache_dir):
    """(first scan with the empty Numba cache `cache_dir`, best cached scan) in seconds, on `shape`."""
    directory, _ = checkpoint_for(shape)
    first = timed([SWTOOL, "scan", directory, "--json", "--no-progress"], environment(cache_dir))[0]
    cached = min(timed([SWTOOL, "scan", directory, "--json", "--no-progress"], environment(cache_dir))[0]
                 for _ in range(runs))
    return {"checkpoint": shape, "first_s": first, "cached_s": cached}


def run_script(name, *args):
    """Run bench/<name>.py (python -m bench.<name>), then read the results it wrote to bench/results/<name>.json
    (None if it failed)."""
    done = subprocess.run([sys.executable, "-m", f"bench.{name}", *args], env=environment())
    if done.returncode != 0:
        print(f"bench: bench/{name}.py failed (exit {done.returncode}); its rows are left out", file=sys.stderr)
        return None
    return json.loads((RESULTS / f"{name}.json").read_text())


def peers_installed():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# --- the table ----------------------------------------------------------------------------

def summary_rows(results):
    """[(what, swtool, reference, ratio, note)] for the one table."""
    rows = []
    start = results.get("startup_s")
    if start is not None:
        rows.append(("startup: swtool --help", f"{start:.3f} s", "target 0.3 s", f"{start / 0.3:.2f}x of target",
                     "yes" if start < 0.3 else "NO"))
    for r in results.get("scans", []):
        size = f"{r['checkpoint']} ({r['bytes'] / 1e9:.2f} GB)"
        ratio = r["scan_over_read"]
        found = ("planted found" if r["planted_found"] else "planted NOT found") if "planted" in r else \
            f"{len(r['found'])} found"
        rows.append((f"scan {size} / read once", f"{r['scan_s']:.2f} s", f"{r['read_once_s']:.2f} s",
                     f"{ratio:.2f}x", f"target 1.5x: {'yes' if ratio <= TARGET_RATIO else 'NO'}; {found}; "
                                      f"{r['passes']} pass over the weights"))
        rows.append(("  CPU seconds (all threads)", f"{r['scan_cpu_s']:.2f} s", f"{r['read_once_cpu_s']:.2f} s",
                     f"{r['scan_cpu_s'] / r['read_once_cpu_s']:.2f}x", "steadier than wall time on a loaded machine"))
        rows.append(("  start-up excluded (in process)", f"{r['scan_in_process_s']:.2f} s",
                     f"{r['read_once_s']:.2f} s", f"{r['scan_in_process_s'] / r['read_once_s']:.2f}x",
                     "load + tokenize + scan in a warm process"))
        rows.append(("  peak RSS", f"{r['peak_rss_bytes'] / 2**20:.0f} MiB", f"{r['bytes'] / 2**20:.0f} MiB file",
                     f"{r['peak_rss_bytes'] / r['bytes']:.2f}x",
                     f"target 1.5 GB: {'yes' if r['peak_rss_bytes'] <= TARGET_RSS else 'NO'}"))
        rows.append(("  from disk (cache evicted): scan / read", f"{r['cold_scan_s']:.2f} s",
                     f"{r['cold_read_s']:.2f} s", f"{r['cold_scan_s'] / r['cold_read_s']:.2f}x", ""))
        peer = r.get("transformers")
        if peer and "skipped" in peer:
            rows.append(("  vs transformers", "", "", "skipped", f"not enough free memory ({peer['skipped']})"))
        elif peer:
            same = "same weight" if peer["found"] == r["found"][:1] or peer["found"] in r["found"] else \
                f"found {peer['found']}"
            rows.append(("  vs transformers: wall", f"{r['scan_s']:.2f} s", f"{peer['wall_s']:.2f} s",
                         f"{peer['wall_s'] / r['scan_s']:.1f}x faster", same))
            rows.append(("  vs transformers: CPU seconds", f"{r['scan_cpu_s']:.2f} s", f"{peer['cpu_s']:.2f} s",
                         f"{peer['cpu_s'] / r['scan_cpu_s']:.1f}x less", ""))
            rows.append(("  vs transformers: peak RSS", f"{r['peak_rss_bytes'] / 2**20:.0f} MiB",
                         f"{peer['peak_rss_bytes'] / 2**20:.0f} MiB",
                         f"{peer['peak_rss_bytes'] / r['peak_rss_bytes']:.1f}x less", ""))
    first = results.get("numba_first_run")
    if first:
        rows.append((f"Numba: first scan vs cached ({first['checkpoint']})", f"{first['cached_s']:.2f} s",
                     f"{first['first_s']:.2f} s", f"{first['first_s'] / first['cached_s']:.1f}x",
                     "first run compiles the kernels, later runs load them"))
    ev = results.get("eval")
    if ev:
        by = {r["what"]: r for r in ev["results"]}
        ours = next(r for w, r in by.items() if w.startswith("swtool evaluate"))
        theirs = next(r for w, r in by.items() if w.startswith("transformers"))
        rows.append(("eval SmolLM2 tokens/s vs transformers", f"{ours['tokens_per_s']:.0f}",
                     f"{theirs['tokens_per_s']:.0f}", f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x",
                     f"ppl {ours['perplexity']:.3f} vs {theirs['perplexity']:.3f}"))
    imatrix = results.get("imatrix")
    if imatrix:
        by = {r["what"]: r for r in imatrix["results"]}
        ours = next(r for w, r in by.items() if w.startswith("swtool imatrix --text"))
        theirs = next(r for w, r in by.items() if w == "transformers float32 (forward)")
        rows.append((f"imatrix --text SmolLM2 tokens/s vs transformers forward ({imatrix['tokens']} tokens)",
                     f"{ours['tokens_per_s']:.0f}", f"{theirs['tokens_per_s']:.0f}",
                     f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x",
                     "target >= 1x; swtool end to end (start-up, load, write), transformers the forward alone"))
    quant = results.get("quant")
    if quant:
        for r in quant["results"]:
            py, c, one, ours = r["gguf_py"], r["ggml_c_1_thread"], r["swtool_1_thread"], r["swtool"]
            if r["type"] == "Q8_0" and py:
                rows.append(("quant Q8_0 MB/s vs gguf-py", f"{ours['mb_per_s']:.0f}", f"{py['mb_per_s']:.0f}",
                             f"{ours['mb_per_s'] / py['mb_per_s']:.1f}x", "target >= 10x"))
            if r["type"] in ("Q8_0", "Q4_K", "Q6_K"):
                rows.append((f"quant {r['type']} MB/s, 1 thread vs ggml C", f"{one['mb_per_s']:.0f}",
                             f"{c['mb_per_s']:.0f}", f"{one['mb_per_s'] / c['mb_per_s']:.2f}x",
                             "target >= 0.8x" if r["type"] != "Q8_0" else ""))
    products = results.get("kernels_bf16")
    if products:
        by = {(r["kernel"], r["threads"]): r for r in products["results"]}
        for threads in (1, 2):
            loop = next(r for (k, t), r in by.items() if t == threads and k.startswith("kernels.py"))
            pairs = next(r for (k, t), r in by.items() if t == threads and k.endswith("(shipped)"))
            rows.append((f"bf16 product, {threads} thread(s): bf16_pairs vs the widen + shift loop",
                         f"{pairs['gfma_per_s']:.1f} G/s", f"{loop['gfma_per_s']:.1f} G/s",
                         f"{pairs['gfma_per_s'] / loop['gfma_per_s']:.2f}x",
                         f"multiply-adds; {products['tensors']} 7B MLP matrices streamed, {products['rows']} rows"))
    ports = results.get("decode_ports")
    if ports:
        by = {r["loop"].split(" (")[0]: r["g_multiply_adds_per_s"] for r in ports["results"]}
        rows.append(("bf16 decode, registers only, 1 core: shift + AND vs widen + shift", f"{by['shift + AND']:.1f} G/s",
                     f"{by['widen + shift, twice']:.1f} G/s", f"{by['shift + AND'] / by['widen + shift, twice']:.2f}x",
                     f"multiply-adds of a 4 x 4 block; multiply-adds alone {by['multiply-adds alone']:.1f} G/s"))
        rows.append(("AVX-512 BF16 vdpbf16ps vs vfmadd231ps, 1 core", f"{by['vdpbf16ps']:.1f} G/s",
                     f"{by['multiply-adds alone']:.1f} G/s", f"{by['vdpbf16ps'] / by['multiply-adds alone']:.2f}x",
                     "multiply-adds; why swtool does not use it"))
    gguf = results.get("gguf_scan")
    if gguf:
        # the setting run_script ran: one thread, OpenMP workers as swtool leaves them (swtool/kernels/jit.py)
        policy = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
        run = next((r for r in gguf["runs"] if r["threads"] == 1 and r.get("omp_wait_policy") == policy),
                   gguf["runs"][-1])
        for f in run["files"]:
            rows.append((f"scan GGUF {f['file']}, in process: fused vs old", f"{f['new']['in_process_s']:.2f} s",
                         f"{f['old']['in_process_s']:.2f} s", f"{f['ratio_in_process']:.2f}x faster",
                         "same super weights" if f["same_super_weights"] else "DIFFERENT super weights"))
    return rows


def print_summary(rows):
    widths = [max(len(str(row[i])) for row in rows + [("what", "swtool", "reference", "ratio", "")])
              for i in range(5)]
    header = ("what", "swtool", "reference", "ratio", "")
    for row in [header] + rows:
        print("  ".join(str(cell).ljust(width) if i in (0, 4) else str(cell).rjust(width)
                        for i, (cell, width) in enumerate(zip(row, widths))).rstrip())


def print_markdown(results):
    """The table of bench/results/bench.json as Markdown, for docs/performance.md."""
    m = results["machine"]
    print(f"`{results['command']}` on {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB, "
          f"load average {m['load_average'][0]:.1f} before and {results['machine_after']['load_average'][0]:.1f} "
          f"after (other work on the machine):\n")
    print("| what | swtool | reference | ratio | |")
    print("|---|---|---|---|---|")
    for row in summary_rows(results):
        what = "↳ " + row[0].strip() if row[0].startswith("  ") else row[0]  # Markdown drops indentation
        print("| " + " | ".join(str(cell).strip() for cell in (what, *row[1:])) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2,llama-1b,llama-7b")
    parser.add_argument("--runs", type=int, default=3, help="scans per checkpoint (best is kept)")
    parser.add_argument("--skip", default="", help="comma-separated: peer, eval, imatrix, quant, kernels, gguf, first-run, "
                                                   "startup")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table of bench/results/bench.json as Markdown (runs nothing)")
    args = parser.parse_args()
    if args.markdown:
        print_markdown(json.loads((RESULTS / "bench.json").read_text()))
        return
    skip = set(filter(None, args.skip.split(",")))
    peer = "peer" not in skip and peers_installed()
    results = {"machine": machine(), "command": " ".join(["bench/run.py"] + sys.argv[1:])}
    if "startup" not in skip:
        results["startup_s"] = startup_seconds()
    with tempfile.TemporaryDirectory(prefix="swtool-numba-") as cache_dir:
        shapes = args.shapes.split(",")
        if "first-run" not in skip:  # first, while this run's Numba cache is empty: it fills here
            first_shape = "llama-1b" if "llama-1b" in shapes else shapes[0]
            results["numba_first_run"] = bench_first_run(first_shape, args.runs, cache_dir)
        results["scans"] = [bench_scan(shape, args.runs, cache_dir, peer) for shape in shapes]
    if "eval" not in skip and peer:
        results["eval"] = run_script("eval", "--runs", str(args.runs))  # one run was too noisy: 0.6x-1.2x
    if "imatrix" not in skip and peer:
        results["imatrix"] = run_script("imatrix", "--runs", str(args.runs))
    if "quant" not in skip:
        results["quant"] = run_script("quant")
    if "kernels" not in skip:  # the bf16 product alone: bf16_pairs against dense.py's loop
        results["kernels_bf16"] = run_script("kernels_bf16")
        results["decode_ports"] = run_script("decode_ports")
    if "gguf" not in skip:  # GGUF block types: fused kernels against the old decode-everything path
        results["gguf_scan"] = run_script("gguf_scan", "--runs", str(args.runs), "--threads", "1", "--no-crossover")
    results["machine_after"] = machine()
    print()
    print(f"{results['machine']['cpu']}, {results['machine']['cores']} cores, "
          f"{results['machine']['memory_bytes'] / 2**30:.0f} GiB; load average {results['machine']['load_average'][0]:.1f} "
          f"before, {results['machine_after']['load_average'][0]:.1f} after")
    print_summary(summary_rows(results))
    RESULTS.mkdir(exist_ok=True)
    from swtool.atomic import write_text_atomic

    write_text_atomic(RESULTS / "bench.json", json.dumps(results, indent=2) + "\n")
    print(f"results written to {(RESULTS / 'bench.json').relative_to(ROOT)}")


if __name__ == "__main__":
    main()

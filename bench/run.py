"""Scan benchmark: wall time against reading the same bytes once, and peak RSS.

    python bench/run.py [--shapes smollm2,llama-1b,llama-7b] [--runs 2]

For each checkpoint (the SmolLM2 fixture, synthetic Llama shapes from synth.py):
  - read-once: the weight files read start to end, warm page cache (best of 3);
  - `swtool scan` under /usr/bin/time -v: wall time and maximum resident set
    size (mapped file pages count), the first run and the best later run;
  - whether the scan found the planted super weight (synthetic checkpoints).
Results go to bench/results/scan.json with a description of the machine.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "fixtures"))
SWTOOL = Path(sys.executable).parent / "swtool"


def checkpoint_for(shape):
    if shape == "smollm2":
        import smollm2

        directory = ROOT / "fixtures" / "build" / "smollm2"
        smollm2.build(directory)
        return directory, None
    import synth

    directory = ROOT / "bench" / "build" / shape
    planted = synth.generate(directory, shape, int(2e9), 0)
    return directory, planted


def read_once_seconds(files, repeats=3):
    """Best time to read every byte of `files` (the first pass warms the page cache)."""
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while f.read(16 << 20):
                    pass
        best = min(best, time.perf_counter() - start)
    return best


def timed_scan(directory):
    """(wall seconds, peak RSS bytes, catalog) of one `swtool scan --json` run."""
    result = subprocess.run(["/usr/bin/time", "-v", str(SWTOOL), "scan", str(directory), "--json", "--no-progress"],
                            capture_output=True, text=True, check=True)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", result.stderr)
    hours, minutes, seconds = int(wall.group(1) or 0), int(wall.group(2)), float(wall.group(3))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return hours * 3600 + minutes * 60 + seconds, rss_kb * 1024, json.loads(result.stdout)


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "python": platform.python_version(),
            "load_average": os.getloadavg()}


def bench_shape(shape, runs):
    directory, planted = checkpoint_for(shape)
    files = sorted(directory.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in files)
    read_s = read_once_seconds(files)
    scans = [timed_scan(directory) for _ in range(runs)]
    first_wall, first_rss, catalog = scans[0]
    best_wall = min(s[0] for s in scans[1:]) if runs > 1 else first_wall
    peak_rss = max(s[1] for s in scans)
    found = [(sw["layer"], sw["row"], sw["col"]) for sw in catalog["super_weights"]]
    row = {"checkpoint": shape, "bytes": size, "read_once_s": read_s, "scan_first_s": first_wall,
           "scan_s": best_wall, "scan_over_read": best_wall / read_s, "peak_rss_bytes": peak_rss,
           "rss_over_size": peak_rss / size, "found": found}
    if planted:
        row["planted"] = (planted["layer"], planted["row"], planted["col"])
        row["planted_found"] = found == [row["planted"]]
    return row


def print_table(rows):
    print(f"{'checkpoint':<10} {'weights':>9} {'read once':>9} {'scan 1st':>9} {'scan':>7} {'scan/read':>9} "
          f"{'peak RSS':>9} {'RSS/size':>8}  found")
    for r in rows:
        found = ("planted: yes" if r["planted_found"] else "planted: NO") if "planted" in r else str(r["found"])
        print(f"{r['checkpoint']:<10} {r['bytes'] / 1e9:>7.2f}GB {r['read_once_s']:>8.2f}s {r['scan_first_s']:>8.2f}s "
              f"{r['scan_s']:>6.2f}s {r['scan_over_read']:>8.1f}x {r['peak_rss_bytes'] / 2**20:>6.0f}MiB "
              f"{r['rss_over_size']:>8.2f}  {found}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2,llama-1b")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    rows = [bench_shape(shape, args.runs) for shape in args.shapes.split(",")]
    print_table(rows)
    out = ROOT / "bench" / "results" / "scan.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "command": " ".join(["bench/run.py"] + sys.argv[1:]),
                               "results": rows}, indent=2) + "\n")
    print(f"results written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""Audit benchmark: how long `swtool audit` takes when the coordinates are known.

    python -m bench.audit [--runs 20]

For the SmolLM2 fixture (bf16 safetensors), its original Q4_1 GGUF and the
synthetic Llama-3.2-1B-shape checkpoint (2 shards, if bench/build/llama-1b exists),
with a scan catalog and with the known-coordinates table:
  - in process, warm: `swtool.audit.audit()` median over --runs calls: the whole
    audit (opening and validating headers, reading the catalog) and the reads alone;
  - the command line, `swtool audit ...`, median wall time over 5 runs (Python
    start-up and imports included).
Results go to bench/results/audit.json.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWTOOL = Path(sys.executable).parent / "swtool"


def catalog_for(model, out):
    """A scan catalog of `model` (made once)."""
    if not out.is_file():
        subprocess.run([str(SWTOOL), "scan", str(model), "-o", str(out), "--no-progress"], check=True,
                       capture_output=True)
    return out


def in_process(model, runs, **options):
    from swtool.audit import audit

    audit(model, **options)  # warm: imports, page cache
    reports = [audit(model, **options) for _ in range(runs)]
    assert all(not r.failed for r in reports), reports[0]
    return (statistics.median(r.elapsed_ms for r in reports), statistics.median(r.read_ms for r in reports),
            reports[0].bytes_read, len(reports[0].findings))


def command_line(args, runs=5):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = subprocess.run([str(SWTOOL), "audit", *map(str, args)], capture_output=True, text=True)
        times.append((time.perf_counter() - started) * 1000)
        assert result.returncode == 0, result.stdout + result.stderr
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    from fixtures import smollm2

    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    smol = ROOT / "fixtures" / "build" / "smollm2"
    smollm2.build(smol)
    q4_1 = smollm2.fetch_gguf()
    smol_catalog = catalog_for(smol, results_dir / "smollm2.catalog.json")
    cases = [("SmolLM2 bf16 safetensors", smol, "catalog", {"catalog": smol_catalog}),
             ("SmolLM2 bf16 safetensors", smol, "known", {"known": True}),
             ("SmolLM2 Q4_1 GGUF", q4_1, "catalog", {"catalog": smol_catalog}),
             ("SmolLM2 Q4_1 GGUF", q4_1, "known", {"known": True})]
    one_b = ROOT / "bench" / "build" / "llama-1b"
    if (one_b / "model.safetensors.index.json").is_file():
        cases.append(("synthetic Llama-1B shape, 2 shards", one_b, "catalog",
                      {"catalog": catalog_for(one_b, results_dir / "llama-1b.catalog.json")}))
    rows = []
    for label, model, source, options in cases:
        total, reads, nbytes, count = in_process(model, runs, **options)
        flags = ["--catalog", options["catalog"]] if "catalog" in options else ["--known"]
        wall = command_line([model, *flags])
        rows.append({"checkpoint": label, "coordinates": source, "super_weights": count, "bytes_read": nbytes,
                     "audit_ms": round(total, 2), "reads_ms": round(reads, 3), "command_ms": round(wall, 1)})
        print(f"{label:36s} {source:8s} {count} weights, {nbytes:6d} bytes: audit {total:7.2f} ms "
              f"(reads {reads:.3f} ms), command line {wall:6.0f} ms")
    machine = {"python": platform.python_version(), "machine": platform.machine(), "cpus": __import__("os").cpu_count()}
    (results_dir / "audit.json").write_text(json.dumps({"machine": machine, "runs": runs, "results": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Importance in exports: `swtool export --type TYPE` with its defaults against llama-quantize, in llama.cpp.

    python -m bench.importance [--type q4_0] [--text fixtures/prose.txt] [--windows N] [--ctx 512] [--out DIR]

On the SmolLM2 fixture: the F16 GGUF (`swtool export --type f16 --no-scan`: the file convert_hf_to_gguf
writes, tests/test_export.py), llama-quantize's TYPE made from it by llama.cpp's own llama_model_quantize
(no imatrix), swtool's default export of TYPE (scan, keep:q8_0, importance from the scan's prompt), and
swtool's export with --importance none. Each file is scored in llama.cpp (llama-cpp-python, one thread)
on the same windows of ctx tokens of the text, every prediction of a window, against the F16 file's own
distributions in llama.cpp (KL divergence as swtool/kld.py computes it: mean, 99th percentile, same top).
The text must not be what an importance was computed from (the default's is the scan's prompt alone).
Results go to bench/results/importance.json, one run per type and text.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fixtures.llama_oracle import quantize as llama_quantize

ROOT = Path(__file__).resolve().parents[1]
SWTOOL = [sys.executable, "-m", "swtool"]
MODEL = ROOT / "fixtures" / "build" / "smollm2"


def run_swtool(*args):
    subprocess.run([*SWTOOL, *map(str, args), "--no-progress", "--force"], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def make_files(out, qtype):
    """{label: path} of the files compared (made once; an existing file is reused)."""
    files = {"f16": out / "smollm2-f16.gguf", "llama-quantize": out / f"smollm2-{qtype}-llama-quantize.gguf",
             "swtool default": out / f"smollm2-{qtype}-default.gguf",
             "swtool --importance none": out / f"smollm2-{qtype}-no-importance.gguf"}
    if not files["f16"].exists():
        run_swtool("export", MODEL, "-o", files["f16"], "--type", "f16", "--no-scan")
    if not files["llama-quantize"].exists():
        llama_quantize(files["f16"], files["llama-quantize"], qtype)
    if not files["swtool default"].exists():
        run_swtool("export", MODEL, "-o", files["swtool default"], "--type", qtype)
    if not files["swtool --importance none"].exists():
        run_swtool("export", MODEL, "-o", files["swtool --importance none"], "--type", qtype, "--importance", "none")
    return files


def score(files, windows, ctx, reference=None):
    """{label: {perplexity, kld stats, bytes}}: every file on the windows, KLD against the f16 file's logits.
    `reference`: (the f16 file's logits per window, its perplexity, predictions) when they were decoded
    already (tests/test_export_importance.py shares them with other tests), else f16_reference's."""
    from swtool import llama_score

    reference_logits, f16_ppl, count = reference if reference is not None else f16_reference(files["f16"], windows, ctx)
    results = {"f16": {"bytes": files["f16"].stat().st_size, "perplexity": f16_ppl, "predictions": count, "kld": None}}
    for label, path in files.items():
        if label == "f16":
            continue
        llm = llama_score.load(path, ctx, 1)
        try:
            ppl, count, kld = llama_score.score(llm, windows, lambda i: reference_logits[i])
        finally:
            llama_score.close(llm)
        results[label] = {"bytes": path.stat().st_size, "perplexity": ppl, "predictions": count,
                          "kld": kld.to_json()}
    return results


def f16_reference(path, windows, ctx):
    """(the f16 file's logits per window, its perplexity, predictions): one pass gives the f16 file's
    perplexity and the logits the others are held to."""
    from swtool import llama_score

    reference = llama_score.load(path, ctx, 1)
    reference_logits, total, count = [], 0.0, 0
    try:
        for window in windows:
            nll, predictions, logits = llama_score._window(reference, window)
            total, count = total + nll, count + predictions
            reference_logits.append(logits)
    finally:
        llama_score.close(reference)
    return reference_logits, float(np.exp(total / count)), count  # as llama_score.score reduces it


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--type", default="q4_0")
    parser.add_argument("--text", default=str(ROOT / "fixtures" / "prose.txt"))
    parser.add_argument("--windows", type=int, default=None, help="default: every full window of the text")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--out", default="/tmp/swtool-bench-importance")
    args = parser.parse_args()
    from swtool import llama_score
    from swtool.evaluate import read_text
    from swtool.tokenizer import encode

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = make_files(out, args.type)
    ids = encode(MODEL, read_text(args.text))
    windows = llama_score.windows(ids, args.ctx, args.windows or len(ids) // args.ctx)
    results = score(files, windows, args.ctx)
    stock = results["llama-quantize"]
    for label, row in results.items():
        kld = row["kld"]
        print(f"{label:26s} {row['bytes'] / 1e6:8.2f} MB ({100 * (row['bytes'] / stock['bytes'] - 1):+.2f} % vs "
              f"llama-quantize)  perplexity {row['perplexity']:.3f}"
              + (f"  KLD mean {kld['mean']:.4f} p99 {kld['p99']:.4f} same top {100 * kld['same_top']:.2f} %" if kld else ""))
    record = {"type": args.type, "text": args.text, "ctx": args.ctx, "windows": len(windows), "results": results}
    path = ROOT / "bench" / "results" / "importance.json"  # one run per (type, text), the latest kept
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    runs = [run for run in runs if (run["type"], run["text"]) != (args.type, args.text)] + [record]
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()

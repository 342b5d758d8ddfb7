"""Perplexity in llama.cpp of SmolLM2 GGUF exports, each type with and without super-weight handling.

    python bench/export_ppl.py [--types f16,q8_0,q5_0,q4_0,q4_k,q3_k,q2_k] [--handlings none,keep:f16,...] [--windows 4]

For every type, `swtool export` writes SmolLM2 (fixtures/build/smollm2, bf16) as:
  none       plain llama-quantize-style quantization (the super weights only recorded);
  keep:q8_0  the two ffn_down tensors holding super weights (layers 2 and 11) in Q8_0 (the default);
  keep:f16   the same two tensors in F16;
  isolate    every tensor in the file's type, the MLP channels of layers 2 and 11 reordered
             so each super weight governs a block of near-zero weights (quant/isolate.py);
  control    the paper's control for keep:f16: the same bytes spent on two ffn_down tensors
             that hold no super weight (layers 3 and 12) in F16.
Each file is loaded in llama.cpp (llama-cpp-python, one thread) and scored on the same
token windows of two texts: fixtures/prose.txt and /usr/share/common-licenses/GPL-3,
`--windows` windows of 512 tokens each (every prediction of a window scored, as
`swtool eval`; tests/llama_oracle.py). The source checkpoint is scored by swtool's own
`eval` code on the same windows. Results: bench/results/export_ppl.json and a table on stdout;
with --handlings, only those rows are measured and replace their rows in the existing results.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "fixtures"))
SOURCE = ROOT / "fixtures" / "build" / "smollm2"
BUILD = ROOT / "bench" / "build" / "export"
TEXTS = {"prose": ROOT / "fixtures" / "prose.txt", "GPL-3": Path("/usr/share/common-licenses/GPL-3")}
CTX = 512


def variants(qtype, catalog):
    """(label, export Options) for one type; variants that would equal another are left out."""
    from swtool.gguf_export import Options
    from swtool.quant.policy import bits_per_weight, parse_target

    base = dict(type=qtype, catalog=str(catalog), progress=False)
    out = [("none", Options(handling="none", **base))]
    bits = bits_per_weight(parse_target(qtype).qtype)
    if bits < 16:
        out.append(("keep:f16", Options(handling="keep", keep_type="f16", **base)))
        out.append(("control", Options(handling="none", tensor_types=(r"blk\.(3|12)\.ffn_down=f16",), **base)))
        out.append(("isolate", Options(handling="isolate", **base)))
    if bits < 8.5:
        out.append(("keep:q8_0", Options(handling="keep", keep_type="q8_0", **base)))
    return out


def scan_catalog(path):
    """The SmolLM2 catalog, made by `swtool scan` (the library call behind it)."""
    from swtool.catalog import build_catalog, write_catalog
    from swtool.detect import Settings, scan
    from swtool.model import load_model
    from swtool.tokenize import DEFAULT_PROMPT, encode

    model = load_model(SOURCE)
    settings = Settings(DEFAULT_PROMPT)
    ids = encode(model.directory, DEFAULT_PROMPT)
    found, report = scan(model, ids, settings)
    write_catalog(build_catalog(model, DEFAULT_PROMPT, ids, settings, found, report), path)
    return path


def main():
    import llama_oracle
    from swtool.evaluate import perplexity
    from swtool.gguf_export import export
    from swtool.model import load_model
    from swtool.tokenize import encode

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="f16,q8_0,q5_0,q4_0,q4_k,q3_k,q2_k")
    parser.add_argument("--handlings", default=None, help="only these variants (comma-separated labels)")
    parser.add_argument("--windows", type=int, default=4, help="windows of 512 tokens per text (prose has 2)")
    args = parser.parse_args()
    wanted = set(args.handlings.split(",")) if args.handlings else None
    out = ROOT / "bench" / "results" / "export_ppl.json"
    BUILD.mkdir(parents=True, exist_ok=True)
    catalog = scan_catalog(BUILD / "smollm2.catalog.json")
    ids = {name: encode(SOURCE, path.read_text()) for name, path in TEXTS.items()}
    n_windows = {name: min(args.windows, len(text_ids) // CTX) for name, text_ids in ids.items()}

    model = load_model(SOURCE)
    source = {name: perplexity(model, text_ids[:n_windows[name] * CTX], ctx=CTX)[0] for name, text_ids in ids.items()}
    rows = [{"type": "bf16 source", "handling": "swtool eval", "MB": None, **source}]
    print(f"source (swtool eval): {source}", flush=True)
    for qtype in args.types.split(","):
        for label, options in variants(qtype, catalog):
            if wanted is not None and label not in wanted:
                continue
            path = BUILD / f"smollm2-{qtype}-{label.replace(':', '-')}.gguf"
            start = time.time()
            report = export(SOURCE, path, options)
            llm = llama_oracle.load(path)
            row = {"type": qtype, "handling": label, "MB": round(report.file_size / 1e6, 2),
                   "super_tensor_types": sorted({t.qtype.name for t in report.tensors
                                                 if t.name in {sw.tensor for sw in report.super_weights}})}
            for name, text_ids in ids.items():
                row[name] = llama_oracle.perplexity(llm, text_ids, CTX, n_windows[name])[0]
            del llm
            row["seconds"] = round(time.time() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            path.unlink()
    if wanted is not None:  # replace the re-measured rows, keep the others
        fresh = {(row["type"], row["handling"]): row for row in rows}
        old_rows = json.loads(out.read_text())["rows"]
        rows = [fresh.pop((row["type"], row["handling"]), row) for row in old_rows] + list(fresh.values())
    results = {"texts": {name: f"{TEXTS[name]}: first {n_windows[name]} windows of {CTX} tokens" for name in TEXTS},
               "rows": rows}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(rows))


def markdown(rows):
    lines = ["| type | super weights | MB | ppl prose | ppl GPL-3 |", "|---|---|---|---|---|"]
    for row in rows:
        size = "" if row["MB"] is None else f"{row['MB']:.1f}"
        lines.append(f"| {row['type']} | {row['handling']} | {size} | {row['prose']:.3f} | {row['GPL-3']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Calibration text against data-free importance, at every type, scored on two kinds of text.

    python -m bench.importance_sources [--types q2_k,...] [--sources text,scan,random,self] [--out DIR]

On the SmolLM2 fixture, one importance matrix per source, written by `swtool imatrix`:
  text    /usr/share/common-licenses/LGPL-2.1, chunks of 512 (the sweep's importance:text in docs/gguf.md);
  scan    the paper's prompt alone (what export's scan collects, importance:scan);
  random  2,048 uniformly random tokens, seed 0 (importance:random);
  self    512 tokens the model samples itself from BOS, seed 0, sequences of 128 (importance:self);
and, named with --sources, calibration text of other kinds (Apache-2.0; Python's documentation,
characters 0-40,000) and other self-generated samples (SOURCES).
Each type is exported with each matrix (`swtool export --imatrix F --no-scan`: no super weight kept, so only
the importance differs) and scored in llama.cpp against the F16 file (bench.importance.score: mean KLD,
99th percentile, same top) on the first 4 windows of 512 tokens of two texts the importance never saw:
  gpl3    /usr/share/common-licenses/GPL-3: a licence, the kind of text the calibration text is;
  python  Python's own documentation (pydoc_data.topics, characters 200,000-260,000 of its topics in
          name order): English of another kind.
Files are reused when they exist in --out. Results: bench/results/importance_sources.json.
"""

import argparse
import json
import sys
from pathlib import Path

from bench.importance import MODEL, ROOT, run_swtool, score
from bench.run import machine

PAPER_PROMPT = "Apple Inc. is a worldwide tech company."
SOURCES = {"text": ["--text", "/usr/share/common-licenses/LGPL-2.1"],
           "scan": ["--prompt", PAPER_PROMPT],
           "random": ["--random-tokens", 2048, "--seed", 0],
           "self": ["--self-generated", 512, "--ctx", 128, "--seed", 0],
           # not in the default run: calibration text of other kinds, and other self-generated samples
           "text-apache": ["--text", "/usr/share/common-licenses/Apache-2.0"],
           "text-python": ["--text", "python-docs-calibration.txt"],  # written by python_docs, in --out
           "self256": ["--self-generated", 256, "--ctx", 128, "--seed", 0],
           "self256-seed1": ["--self-generated", 256, "--ctx", 128, "--seed", 1],
           "self1024": ["--self-generated", 1024, "--ctx", 128, "--seed", 0]}
DEFAULT_SOURCES = "text,scan,random,self"
TYPES = "q4_0,q4_1,q5_0,q5_1,iq4_nl,q2_k,q3_k,q4_k,q5_k,q6_k"


def python_docs(out, start, stop):
    """Characters start..stop of Python's pydoc topics in name order, written to `out`."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    out.write_text("\n\n".join(topics[name] for name in sorted(topics))[start:stop])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=TYPES)
    parser.add_argument("--sources", default=DEFAULT_SOURCES, help=f"of {', '.join(SOURCES)}")
    parser.add_argument("--out", default="/tmp/swtool-bench-importance-sources")
    args = parser.parse_args()
    from swtool import llama_score
    from swtool.evaluate import read_text
    from swtool.tokenizer import encode

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = {"gpl3": Path("/usr/share/common-licenses/GPL-3"),
             "python": python_docs(out / "python-docs.txt", 200_000, 260_000)}
    python_docs(out / "python-docs-calibration.txt", 0, 40_000)
    windows = {name: llama_score.windows(encode(MODEL, read_text(path)), 512, 4) for name, path in texts.items()}
    sources = args.sources.split(",")
    for source in sources:
        if not (out / f"{source}.imatrix.gguf").exists():
            arguments = [out / a if str(a).startswith("python-docs") else a for a in SOURCES[source]]
            run_swtool("imatrix", MODEL, "-o", out / f"{source}.imatrix.gguf", *arguments)
    if not (out / "f16.gguf").exists():
        run_swtool("export", MODEL, "-o", out / "f16.gguf", "--type", "f16", "--no-scan")
    rows = []
    for qtype in args.types.split(","):
        files = {"f16": out / "f16.gguf"}
        for source in sources:
            files[source] = out / f"{qtype}-{source}.gguf"
            if not files[source].exists():
                run_swtool("export", MODEL, "-o", files[source], "--type", qtype, "--no-scan",
                           "--imatrix", out / f"{source}.imatrix.gguf")
        for text, text_windows in windows.items():
            scored = score(files, text_windows, 512)
            for source in sources:
                kld = scored[source]["kld"]
                rows.append({"type": qtype, "text": text, "source": source, "bytes": scored[source]["bytes"],
                             "perplexity": scored[source]["perplexity"], "kld_mean": kld["mean"],
                             "kld_p99": kld["p99"], "same_top": kld["same_top"]})
                print(f"{text:6s} {qtype:6s} {source:6s} KLD {kld['mean']:.5f}", flush=True)
    record = {"machine": machine(), "command": " ".join(sys.argv), "model": str(MODEL.relative_to(ROOT)),
              "texts": {name: str(path) for name, path in texts.items()}, "windows": 4, "ctx": 512,
              "sources": {source: SOURCES[source] for source in sources}, "rows": rows}
    path = ROOT / "bench" / "results" / "importance_sources.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()

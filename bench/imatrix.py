"""imatrix benchmark: `swtool imatrix --text` tokens per second against transformers' forward pass.

    python -m bench.imatrix [--chunks 16] [--ctx 512] [--runs 2] [--threads N]

On the SmolLM2 fixture (bf16 on disk, float32 arithmetic in both), the text fixtures/prose.txt
repeated until it holds --chunks x --ctx tokens (8192 by default; the file alone has about 1.4k):
  - swtool, end to end: `swtool imatrix MODEL --text TEXT --ctx N --chunks C -o F --json` under
    /usr/bin/time -v (wall time including start-up, loading, tokenizing and writing; peak RSS);
  - swtool, the passes alone: imatrix.collect() in this process on the same chunks;
  - transformers: the model loaded once as float32 (not timed), then the same chunks (llama-imatrix's:
    whole chunks, the first token of each BOS where the model adds one) through the forward pass with
    logits, --batch chunks at a time; and the same again with a forward pre-hook on every nn.Linear
    adding up x² per column (an importance matrix made with transformers).
Both use every core, or --threads N (OpenBLAS, Numba and torch alike). Tokens per second = chunk
tokens / wall seconds, best of --runs. Results go to bench/results/imatrix.json with the machine
and its load average.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.run import machine
from bench.timing import timed

ROOT = Path(__file__).resolve().parents[1]
SWTOOL = Path(sys.executable).parent / "swtool"
MODEL = ROOT / "fixtures" / "build" / "smollm2"


def swtool_cli(text, ctx, chunks, out):
    """(wall seconds, peak RSS bytes, summary JSON, CPU seconds) of one `swtool imatrix --json` run."""
    run = timed([SWTOOL, "imatrix", MODEL, "--text", text, "--ctx", ctx, "--chunks", chunks, "-o", out, "--force",
                 "--json", "--no-progress"])
    return run.wall_s, run.peak_rss_bytes, json.loads(run.stdout), run.cpu_s


def swtool_pass(sequences, ctx):
    """(seconds, CPU seconds) of imatrix.collect() alone."""
    from swtool.imatrix import collect
    from swtool.model import load_model

    model = load_model(MODEL)
    start, cpu = time.perf_counter(), time.process_time()
    collect(model, sequences, ["bench"], ctx)
    return time.perf_counter() - start, time.process_time() - cpu


def transformers_pass(sequences, batch, hooks):
    """(seconds, CPU seconds): transformers float32 forward (logits included) over the chunks; with
    `hooks`, a pre-hook on every nn.Linear adds up x² per input column as an imatrix does."""
    import torch
    import transformers

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    sums = {}
    if hooks:
        def record(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            sums[module] = sums.get(module, 0) + (x * x).sum(0, dtype=torch.float64)

        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
                module.register_forward_pre_hook(record)
    tokens = torch.tensor(sequences)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for first in range(0, len(tokens), batch):
            model(tokens[first:first + batch]).logits
    return time.perf_counter() - start, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="transformers: chunks per forward call")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, help="threads for BLAS, Numba and torch (default: all cores)")
    args = parser.parse_args()
    if args.threads:  # before NumPy, Numba or torch load; the swtool subprocess inherits it
        for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[variable] = str(args.threads)
    import torch  # noqa: F401  (first, as bench/eval.py explains)
    from fixtures import smollm2

    smollm2.build(MODEL)
    from swtool.imatrix import bos_id, text_sequences
    from swtool.tokenizer import encode, load_tokenizer

    prose = (ROOT / "fixtures" / "prose.txt").read_text()
    need = args.chunks * args.ctx
    with tempfile.TemporaryDirectory(prefix="bench-imatrix-") as work:
        text = prose
        while len(encode(MODEL, text)) < need:
            text += "\n" + prose
        text_path = Path(work) / "prose-repeated.txt"
        text_path.write_text(text)
        ids = encode(MODEL, text)
        sequences = text_sequences(ids, args.ctx, bos_id(MODEL, load_tokenizer(MODEL)), args.chunks)
        n = sum(len(s) for s in sequences)
        load_before = os.getloadavg()
        cli = min((swtool_cli(text_path, args.ctx, args.chunks, Path(work) / "imatrix.gguf")
                   for _ in range(args.runs)), key=lambda r: r[0])
        in_process = min((swtool_pass(sequences, args.ctx) for _ in range(args.runs)), key=lambda r: r[0])
        forward = min((transformers_pass(sequences, args.batch, False) for _ in range(args.runs)), key=lambda r: r[0])
        hooked = min((transformers_pass(sequences, args.batch, True) for _ in range(args.runs)), key=lambda r: r[0])
    rows = [
        {"what": "swtool imatrix --text (CLI, end to end)", "seconds": cli[0], "tokens_per_s": n / cli[0],
         "peak_rss_bytes": cli[1], "cpu_seconds": cli[3], "passes_tokens_per_s": cli[2]["tokens_per_second"]},
        {"what": "swtool imatrix.collect() (the passes)", "seconds": in_process[0], "tokens_per_s": n / in_process[0],
         "cpu_seconds": in_process[1]},
        {"what": "transformers float32 (forward)", "seconds": forward[0], "tokens_per_s": n / forward[0],
         "cpu_seconds": forward[1]},
        {"what": "transformers float32 (forward + x² hooks)", "seconds": hooked[0], "tokens_per_s": n / hooked[0],
         "cpu_seconds": hooked[1]},
    ]
    print(f"SmolLM2-135M, prose.txt repeated: {n} tokens, {args.chunks} chunks of {args.ctx}, best of {args.runs}, "
          f"{args.threads or 'all'} thread(s), load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'':42} {'seconds':>8} {'tokens/s':>9} {'CPU s':>7}")
    for r in rows:
        print(f"{r['what']:42} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.0f} {r['cpu_seconds']:>7.2f}")
    print(f"swtool imatrix / transformers forward: {rows[0]['tokens_per_s'] / rows[2]['tokens_per_s']:.2f}x end to end, "
          f"{rows[1]['tokens_per_s'] / rows[2]['tokens_per_s']:.2f}x the passes; "
          f"swtool CLI peak RSS {cli[1] / 2**20:.0f} MiB")
    out = ROOT / "bench" / "results" / "imatrix.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "load_average_before": load_before,
                               "command": " ".join(["bench/imatrix.py"] + sys.argv[1:]), "tokens": n,
                               "ctx": args.ctx, "chunks": args.chunks, "threads": args.threads, "results": rows},
                              indent=2) + "\n")
    print(f"results written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

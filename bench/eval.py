"""Eval benchmark: `swtool eval` tokens per second against transformers, same model, text and chunks.

    python -m bench.eval [--ctx 512] [--runs 2] [--text fixtures/prose.txt] [--threads N]

On the SmolLM2 fixture (bf16 on disk, float32 arithmetic in both):
  - swtool, end to end: `swtool eval MODEL --text TEXT --ctx N --json` under /usr/bin/time -v
    (wall time including start-up, tokenizing and scoring; peak RSS), best of --runs;
  - swtool, the pass alone: evaluate() in this process, the model opened, the text tokenized;
  - transformers: the model loaded once as float32 (not timed), then the same chunks, all the
    full ones as one batch and the last partial one alone, forward + loss.
Both use every core, or --threads N (OpenBLAS, Numba and torch alike).
Tokens per second = text tokens / wall seconds. CPU seconds (all threads) are printed too: on a
shared machine they move less than wall time. Both perplexities are printed: they must agree.
Results go to bench/results/eval.json with a description of the machine.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench.run import machine
from bench.timing import timed

ROOT = Path(__file__).resolve().parents[1]
SWTOOL = Path(sys.executable).parent / "swtool"
MODEL = ROOT / "fixtures" / "build" / "smollm2"


def swtool_cli(text, ctx):
    """(wall seconds, peak RSS bytes, result JSON, CPU seconds) of one `swtool eval --json` run."""
    run = timed([SWTOOL, "eval", MODEL, "--text", text, "--ctx", ctx, "--json", "--no-progress"])
    return run.wall_s, run.peak_rss_bytes, json.loads(run.stdout), run.cpu_s


def swtool_pass(ids, ctx):
    """(seconds, perplexity, CPU seconds) of evaluate() alone: one streaming pass over the chunks."""
    from swtool.evaluate import Plan, evaluate, make_chunks
    from swtool.forward import World
    from swtool.model import load_model

    model = load_model(MODEL)
    chunks = make_chunks(ids, ctx)
    start, cpu = time.perf_counter(), time.process_time()
    (score,) = evaluate(model, chunks, Plan([World("model")]), progress=False)
    return time.perf_counter() - start, score.perplexity, time.process_time() - cpu


def transformers_pass(ids, ctx):
    """(seconds, perplexity, load seconds, CPU seconds): transformers float32 on the same chunks."""
    import torch
    import transformers

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    load = time.perf_counter() - start
    n_full = len(ids) // ctx
    batches = []
    if n_full:
        batches.append(torch.tensor(ids[:n_full * ctx]).reshape(n_full, ctx))
    if len(ids) % ctx > 1:
        batches.append(torch.tensor([ids[n_full * ctx:]]))
    nll, count = 0.0, 0
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for batch in batches:
            logits = model(batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                     reduction="sum")
            nll += loss.item()
            count += batch[:, 1:].numel()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, float(torch.exp(torch.tensor(nll / count))), load, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--text", type=Path, default=ROOT / "fixtures" / "prose.txt")
    parser.add_argument("--threads", type=int, help="threads for BLAS, Numba and torch (default: all cores)")
    args = parser.parse_args()
    if args.threads:  # before NumPy, Numba or torch load; the swtool subprocess inherits it
        for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[variable] = str(args.threads)
    # torch first: swtool.kernels.jit sets OMP_WAIT_POLICY=PASSIVE for numba's OpenMP workers when it is imported,
    # and torch's own OpenMP runtime reads that variable when it loads; transformers runs as it would alone
    import torch  # noqa: F401
    from fixtures import smollm2

    smollm2.build(MODEL)
    from swtool.tokenizer import encode

    ids = encode(MODEL, args.text.read_text())
    n = len(ids)
    cli = min((swtool_cli(args.text, args.ctx) for _ in range(args.runs)), key=lambda r: r[0])
    in_process = min((swtool_pass(ids, args.ctx) for _ in range(args.runs)), key=lambda r: r[0])
    reference = min((transformers_pass(ids, args.ctx) for _ in range(args.runs)), key=lambda r: r[0])
    rows = [
        {"what": "swtool eval (CLI, end to end)", "seconds": cli[0], "tokens_per_s": n / cli[0],
         "perplexity": cli[2]["worlds"][0]["perplexity"], "peak_rss_bytes": cli[1], "cpu_seconds": cli[3]},
        {"what": "swtool evaluate() (the pass)", "seconds": in_process[0], "tokens_per_s": n / in_process[0],
         "perplexity": in_process[1], "cpu_seconds": in_process[2]},
        {"what": "transformers float32 (forward)", "seconds": reference[0], "tokens_per_s": n / reference[0],
         "perplexity": reference[1], "load_seconds": reference[2], "cpu_seconds": reference[3]},
    ]
    print(f"SmolLM2-135M, {args.text.name}: {n} tokens, ctx {args.ctx}, best of {args.runs}, "
          f"{args.threads or 'all'} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"{'':34} {'seconds':>8} {'tokens/s':>9} {'CPU s':>7} {'perplexity':>11}")
    for r in rows:
        print(f"{r['what']:34} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.0f} {r['cpu_seconds']:>7.2f} "
              f"{r['perplexity']:>11.4f}")
    print(f"swtool / transformers speed: {rows[1]['tokens_per_s'] / rows[2]['tokens_per_s']:.2f}x (pass vs forward, "
          f"wall), {rows[2]['cpu_seconds'] / rows[1]['cpu_seconds']:.2f}x (CPU time); "
          f"swtool CLI peak RSS {cli[1] / 2**20:.0f} MiB")
    out = ROOT / "bench" / "results" / "eval.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "command": " ".join(["bench/eval.py"] + sys.argv[1:]),
                               "tokens": n, "ctx": args.ctx, "threads": args.threads, "results": rows},
                              indent=2) + "\n")
    print(f"results written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

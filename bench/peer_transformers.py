"""The peer: finding a super weight as the paper's authors did, with transformers and torch.

    python -m bench.peer_transformers MODEL_DIR --ids 1,2,3 [--dtype bfloat16]

Loads the whole model with transformers (CPU, the checkpoint's bf16 kept), hooks
every layer's mlp.down_proj, runs the prompt once and locates the super weight
from the hooks, as in Yu et al. 2024 (section 3): the layer whose largest
|down_proj output| is largest, the output channel of that value (row) and the
largest |input| of the same token (column). Prints one JSON line: seconds to
import, load and run, and the coordinate found. bench/run.py runs it under
/usr/bin/time -v for the wall time and peak RSS of the whole process, next to
`swtool scan` on the same checkpoint and prompt.
"""

import argparse
import json
import os
import time

started = time.perf_counter()
import torch  # noqa: E402
import transformers  # noqa: E402


def locate(model_dir, ids, dtype):
    torch.set_num_threads(os.cpu_count())
    imported = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    loaded = time.perf_counter()
    peaks = {}  # layer -> (|output| max, token, row, input vector of that token)

    def hook(layer):
        def record(module, inputs, output):
            x, y = inputs[0][0].float(), output[0].float()  # [T, ff], [T, hidden]
            flat = int(torch.argmax(y.abs()))
            token, row = divmod(flat, y.shape[1])
            peaks[layer] = (float(y[token, row].abs()), token, row, x[token])
        return record

    for layer, block in enumerate(model.model.layers):
        block.mlp.down_proj.register_forward_hook(hook(layer))
    with torch.no_grad():
        model(torch.tensor([ids]))
    layer = max(peaks, key=lambda n: peaks[n][0])
    _, token, row, x = peaks[layer]
    col = int(torch.argmax(x.abs()))
    return {"import_s": imported - started, "load_s": loaded - imported, "forward_s": time.perf_counter() - loaded,
            "found": [layer, row, col], "token": token}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--ids", required=True, help="the prompt's token ids, comma separated")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    print(json.dumps(locate(args.model_dir, [int(i) for i in args.ids.split(",")], args.dtype)))


if __name__ == "__main__":
    main()

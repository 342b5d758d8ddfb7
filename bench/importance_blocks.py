"""What an importance does to the super weights' blocks: the exported values against the source's.

    python -m bench.importance_blocks --catalog CATALOG FILE.gguf [FILE.gguf ...]

For each super weight of the catalog and each GGUF file (e.g. `swtool sweep --out-dir`'s files), the
row of the weight's tensor is dequantized by gguf-py (an implementation independent of swtool's) and
compared with the source checkpoint (fixtures/build/smollm2, bf16 -> float32):
- the super weight's stored value and its relative change;
- the RMS error of the other weights in its quantization block (32 weights, or 256 for the K-types);
- the RMS error of its input column over every other row of the tensor: the column whose massive
  input activation dominates the importance, quantized in each row's block with that weight.
Results go to bench/results/importance_blocks.json.
"""

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "fixtures" / "build" / "smollm2"


def source_tensor(name):
    """The checkpoint's tensor as float32 (torch reads the bf16)."""
    from safetensors import safe_open

    with safe_open(str(MODEL / "model.safetensors"), framework="pt") as checkpoint:
        return checkpoint.get_tensor(name).float().numpy()


def stored_tensor(reader, name):
    """A GGUF tensor dequantized by gguf-py, as [rows, cols]; and its type's name and block size."""
    import gguf

    tensor = next(t for t in reader.tensors if t.name == name)
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    block = gguf.GGML_QUANT_SIZES[tensor.tensor_type][0]
    return values.reshape(int(tensor.shape[1]), int(tensor.shape[0])), tensor.tensor_type.name, block


def audit_file(path, weights, sources):
    import gguf

    reader = gguf.GGUFReader(str(path))
    rows = []
    for weight in weights:
        stored, type_name, block = stored_tensor(reader, weight["gguf_tensor"])
        source = sources[weight["tensor"]]
        row, col = weight["row"], weight["col"]
        error = stored - source
        start = col // block * block
        neighbours = np.delete(error[row, start:start + block], col - start)
        column = np.delete(error[:, col], row)
        rows.append({"file": Path(path).name, "tensor": weight["gguf_tensor"], "row": row, "col": col,
                     "stored_as": type_name, "block": block, "source": float(source[row, col]),
                     "stored": float(stored[row, col]),
                     "change": float(stored[row, col] / source[row, col] - 1),
                     "block_rms_error": float(np.sqrt(np.mean(neighbours ** 2))),
                     "block_rms": float(np.sqrt(np.mean(np.delete(source[row, start:start + block], col - start) ** 2))),
                     "column_rms_error": float(np.sqrt(np.mean(column ** 2)))})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", required=True)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    weights = json.loads(Path(args.catalog).read_text())["super_weights"]
    sources = {name: source_tensor(name) for name in {w["tensor"] for w in weights}}
    results = [entry for path in args.files for entry in audit_file(path, weights, sources)]
    for r in results:
        print(f"{r['file']:48s} {r['tensor']:24s} {r['col']:5d} {r['stored_as']:5s} {r['source']:+.5f} -> "
              f"{r['stored']:+.5f} ({100 * r['change']:+.2f} %)  block rms err {r['block_rms_error']:.5f} "
              f"(block rms {r['block_rms']:.5f})  column rms err {r['column_rms_error']:.5f}")
    out = ROOT / "bench" / "results" / "importance_blocks.json"
    out.write_text(json.dumps({"model": str(MODEL.relative_to(ROOT)), "catalog": Path(args.catalog).name,
                               "rows": results}, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()

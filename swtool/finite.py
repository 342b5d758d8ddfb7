"""NaN and Inf weights: counted per tensor from the stored bits, reported, never fatal.

A checkpoint with a NaN in one weight still loads; every activation after that
weight becomes NaN, and a scan then finds nothing, silently. So `swtool scan`
checks whether its activations stayed finite (`report_is_finite`, free: the
profile is already there) and, if not, or when asked (--check-finite), reads
every weight once more and names the tensors that hold non-finite values. The
scan itself completes and its catalog records them (`nonfinite_weights`).

How a value is recognised, without decoding to float32 where the bits suffice:
  - BF16: exponent bits all ones (0x7F80); mantissa zero = Inf, else NaN;
  - F16, F32: NumPy's isnan / isinf on the stored values;
  - GGUF block types: the dequantized rows (a NaN or Inf scale spoils its block).
Tensors of integer types hold no NaN and are skipped.
"""

import math

import numpy as np

CHUNK_ELEMENTS = 16 << 20  # rows are checked in pieces of about this many elements: bounded temporaries
FLOAT_KINDS = ("BF16", "F16", "F32")


def _count_bits(stored, dtype):
    """(NaN count, Inf count) of stored elements of a plain float type."""
    if dtype == "BF16":
        bits = stored.view(np.uint16)
        special = (bits & 0x7F80) == 0x7F80
        inf = int(np.count_nonzero(special & ((bits & 0x007F) == 0)))
        return int(np.count_nonzero(special)) - inf, inf
    return int(np.count_nonzero(np.isnan(stored))), int(np.count_nonzero(np.isinf(stored)))


def count_nonfinite(info):
    """(NaN count, Inf count) of one tensor (a safetensors TensorInfo or a GGUFTensor), in row chunks."""
    quantized = getattr(info, "quantized", False)
    if not quantized and info.dtype not in FLOAT_KINDS:
        return 0, 0
    if len(info.shape) == 0 or math.prod(info.shape) == 0:
        return 0, 0
    if len(info.shape) == 1:  # a vector (norm weights, biases): small, read whole (a GGUF block vector has no rows)
        values = info.read()
        return int(np.count_nonzero(np.isnan(values))), int(np.count_nonzero(np.isinf(values)))
    n_rows = info.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(info.shape[1:])))
    nan = inf = 0
    for start in range(0, n_rows, step):
        rows = slice(start, min(n_rows, start + step))
        if quantized:
            values = info.read(rows)
            counts = int(np.count_nonzero(np.isnan(values))), int(np.count_nonzero(np.isinf(values)))
        else:
            counts = info.with_stored(lambda stored: _count_bits(stored, info.dtype), rows)
        nan, inf = nan + counts[0], inf + counts[1]
    return nan, inf


def nonfinite_weights(checkpoint, names=None):
    """[{"tensor", "nan", "inf"}] for each tensor of `checkpoint` (or of `names`) holding NaN or Inf."""
    found = []
    for name in names if names is not None else checkpoint.names():
        nan, inf = count_nonfinite(checkpoint.tensor(name))
        if nan or inf:
            found.append({"tensor": name, "nan": nan, "inf": inf})
    return found


def report_is_finite(report):
    """Did a scan's activations stay finite? Its NLL and every per-layer peak of its profile."""
    values = [report.get("nll_intact")]
    for entry in report.get("profile", ()):
        values += [entry[point]["value"] for point in ("down_proj_input", "down_proj_output", "residual")]
    return all(v is None or math.isfinite(v) for v in values)


def describe_nonfinite(found, limit=4):
    """'2 tensors hold non-finite weights: model.layers.2.self_attn.q_proj.weight (1 NaN), ...'"""
    parts = []
    for entry in found[:limit]:
        counts = [f"{entry[key]} {label}" for key, label in (("nan", "NaN"), ("inf", "Inf")) if entry[key]]
        parts.append(f"{entry['tensor']} ({', '.join(counts)})")
    more = f", and {len(found) - limit} more" if len(found) > limit else ""
    noun = "tensor holds" if len(found) == 1 else "tensors hold"
    return f"{len(found)} {noun} non-finite weights: {', '.join(parts)}{more}"

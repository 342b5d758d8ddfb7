"""The `swtool.*` metadata keys of a GGUF file, defined once: the exporter writes them, audit and inspect read them.

llama.cpp loads files with unknown metadata keys (and llama-quantize copies them),
but rejects unknown tensors, so the super weights travel as flat metadata arrays,
one entry per super weight, in the catalog's order:

  swtool.format_version          UINT32          FORMAT_VERSION
  swtool.super_weights.layer     ARRAY[UINT32]   decoder layer
  swtool.super_weights.row       ARRAY[UINT32]   output channel j of down_proj (HF layout [out, in])
  swtool.super_weights.col       ARRAY[UINT32]   input channel m
  swtool.super_weights.value     ARRAY[FLOAT32]  the weight in the source checkpoint, exactly (bf16/f16 fit a float32)
  swtool.super_weights.tensor    ARRAY[STRING]   llama.cpp name of the tensor (blk.2.ffn_down.weight)
  swtool.super_weights.expert    ARRAY[INT32]    the mixture expert, -1 for none: the weight is element
                                                 [expert, row, col] of blk.N.ffn_down_exps (written only
                                                 when some super weight is in an expert)
  swtool.detection.prompt        STRING          the prompt the scan used (optional)
  swtool.export.handling         STRING          what `swtool export`/`quantize` did with them: "keep:F16", "isolate", "none"
  swtool.ffn_order.{L}           ARRAY[UINT32]   after "isolate" (quant/isolate.py): the source intermediate channel of
                                                 each stored one of layer L (rows of ffn_gate/ffn_up, columns of ffn_down)
  swtool.importance.source       STRING          the importance the weights were quantized with (export_importance.py):
                                                 "none", or "KIND: description", KIND one of scan, catalog,
                                                 gguf metadata, imatrix, text, random
  swtool.importance.sha256       STRING          sha256 of that importance (export_importance.digest)

With --imatrix FILE, the keys llama-quantize writes for the file are written too:
quantize.imatrix.file, .dataset (STRING), .entries_count and .chunks_count (UINT32).

Coordinates are those of the tensor in the file that holds the keys: after
"isolate", `col` is the stored column, and swtool.ffn_order.{L}[col] the source one.

Arrays are flat because whether llama.cpp reads nested arrays is unverified.
"""

from collections.abc import Sequence

from swtool.errors import SwtoolError

PREFIX = "swtool."
FORMAT_VERSION_KEY = "swtool.format_version"
FORMAT_VERSION = 1
LAYER = "swtool.super_weights.layer"
ROW = "swtool.super_weights.row"
COL = "swtool.super_weights.col"
VALUE = "swtool.super_weights.value"
TENSOR = "swtool.super_weights.tensor"
PROMPT = "swtool.detection.prompt"
PER_WEIGHT = (LAYER, ROW, COL, VALUE, TENSOR)
EXPERT = "swtool.super_weights.expert"
NO_EXPERT = -1  # EXPERT's entry for a dense MLP's or a shared expert's super weight
HANDLING = "swtool.export.handling"
FFN_ORDER_PREFIX = "swtool.ffn_order."
IMPORTANCE_SOURCE = "swtool.importance.source"
IMPORTANCE_SHA256 = "swtool.importance.sha256"
LLAMA_IMATRIX_PREFIX = "quantize.imatrix."  # llama-quantize's (tools/quantize/quantize.cpp)
LLAMA_IMATRIX_FILE = "quantize.imatrix.file"
LLAMA_IMATRIX_DATASET = "quantize.imatrix.dataset"
LLAMA_IMATRIX_ENTRIES = "quantize.imatrix.entries_count"
LLAMA_IMATRIX_CHUNKS = "quantize.imatrix.chunks_count"


def ffn_order_key(layer):
    return f"{FFN_ORDER_PREFIX}{int(layer)}"


def read_ffn_orders(metadata, source="GGUF file"):
    """{layer: [source channel of each stored channel]} of the layers an export reordered."""
    orders = {}
    for key, value in metadata.items():
        if key.startswith(FFN_ORDER_PREFIX) and key[len(FFN_ORDER_PREFIX):].isdecimal():
            if not is_array(value) or sorted(value) != list(range(len(value))):
                raise SwtoolError(f"{source}: metadata {key} is not a permutation of the channels")
            orders[int(key[len(FFN_ORDER_PREFIX):])] = list(value)
    return orders


def is_array(value):
    return isinstance(value, Sequence) and not isinstance(value, str)


def metadata_fields(super_weights, prompt=None):
    """[(key, value, GGUFValueType, element type)] for GGUFWriter.add_key_value, from catalog entries.

    Explicit types: GGUFWriter would store Python ints as INT32 and fail on NumPy scalars.
    """
    import gguf

    T = gguf.GGUFValueType
    fields = [
        (FORMAT_VERSION_KEY, FORMAT_VERSION, T.UINT32, None),
        (LAYER, [int(sw["layer"]) for sw in super_weights], T.ARRAY, T.UINT32),
        (ROW, [int(sw["row"]) for sw in super_weights], T.ARRAY, T.UINT32),
        (COL, [int(sw["col"]) for sw in super_weights], T.ARRAY, T.UINT32),
        (VALUE, [float(sw["value"]) for sw in super_weights], T.ARRAY, T.FLOAT32),
        (TENSOR, [str(sw["gguf_tensor"]) for sw in super_weights], T.ARRAY, T.STRING),
    ]
    if any(sw.get("expert") is not None for sw in super_weights):
        fields.append((EXPERT, [NO_EXPERT if sw.get("expert") is None else int(sw["expert"]) for sw in super_weights],
                       T.ARRAY, T.INT32))
    if prompt:
        fields.append((PROMPT, prompt, T.STRING, None))
    return fields


def has_swtool_metadata(metadata):
    return any(key.startswith(PREFIX) for key in metadata)


def read_super_weights(metadata, source):
    """The super weights a GGUF's metadata records, [{layer, row, col, value, gguf_tensor}] (and `expert`
    when the file records experts), or None.

    Inconsistent keys (arrays of different lengths, an unknown format version) are an error, not ignored.
    """
    if LAYER not in metadata:
        return None
    version = metadata.get(FORMAT_VERSION_KEY)
    if version != FORMAT_VERSION:
        raise SwtoolError(f"{source}: {FORMAT_VERSION_KEY} is {version!r}; this swtool reads version {FORMAT_VERSION}")
    columns, keys = [], PER_WEIGHT + ((EXPERT,) if EXPERT in metadata else ())
    for key in keys:
        value = metadata.get(key)
        if not is_array(value):
            raise SwtoolError(f"{source}: metadata {key} is missing or not an array")
        if not all(_element_ok(key, v) for v in value):
            raise SwtoolError(f"{source}: metadata {key} holds an element of the wrong type or out of range")
        columns.append(list(value))
    if len({len(column) for column in columns}) != 1:
        lengths = ", ".join(f"{key}: {len(column)}" for key, column in zip(keys, columns))
        raise SwtoolError(f"{source}: the swtool.super_weights arrays differ in length ({lengths})")
    recorded = [{"layer": layer, "row": row, "col": col, "value": value, "gguf_tensor": tensor}
                for layer, row, col, value, tensor in zip(*columns[:5])]
    if EXPERT in metadata:
        for sw, expert in zip(recorded, columns[5]):
            sw["expert"] = None if expert == NO_EXPERT else expert
    return recorded


def _element_ok(key, value):
    """Coordinates are non-negative ints, values finite numbers, tensors names."""
    import math

    if key == TENSOR:
        return isinstance(value, str)
    if type(value) is bool:
        return False
    if key == VALUE:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, int) and value >= (NO_EXPERT if key == EXPERT else 0)

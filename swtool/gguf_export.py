"""`swtool export` and `swtool quantize`: GGUF files for llama.cpp with the super weights recorded and protected.

export:   a Hugging Face checkpoint -> GGUF, as llama.cpp's convert_hf_to_gguf.py followed by
          llama-quantize would make it: what the family converts (arch/: llama.cpp tensor names,
          row orders such as Llama's Q/K permutation, added tensors, hyper-parameters), then
          the vocabulary (export_vocab.py).
quantize: an F32/F16/BF16 GGUF -> another type, every metadata key (the vocabulary included)
          copied from the input.

Both go the same way:
  1. list the output tensors (llama.cpp name, shape, how to read them), reading no data;
  2. choose each tensor's type (quant/policy.py: llama-quantize's rules, --tensor-type, and
     the --keep-type of the tensors that hold a super weight);
  3. with a catalog, read the super weights, check them against the model, and for
     `--sw-handling isolate` reorder their layers' MLP channels (quant/isolate.py);
  4. write the header (metadata and tensor table), then each tensor in row chunks: read,
     reorder, quantize, write. Memory holds one chunk of one tensor, never the model. The
     file is written under a temporary name and renamed when complete.

Super-weight handling (`--sw-handling`):
  keep     the tensors holding a super weight are stored in --keep-type (the default);
  isolate  they keep the file's type, and the layer's MLP channels are reordered so the
           super weights share their quantization block only with near-zero weights;
  none     plain quantization. In all three the super weights are recorded in the
           `swtool.*` metadata (gguf_keys.py).
"""

from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cache
from math import prod
from pathlib import Path

import numpy as np

from swtool import gguf_keys
from swtool.atomic import check_destination
from swtool.coordinate import Coordinate
from swtool.errors import SwtoolError
from swtool.quant.policy import KEPT, NOT_QUANTIZED, ModelFacts
from swtool.table import plural

HANDLINGS = ("keep", "isolate", "none")
DEFAULT_KEEP_TYPE = "q8_0"  # docs/gguf.md, "What --keep-type costs": as good as f16 in perplexity, at about half the bytes
KEEP_TYPES = ("f16", "bf16", "q8_0", "f32")
SCHEMA_ID = "swtool.export/1"  # what `swtool export/quantize --json` print: swtool/schema/export.schema.json
CHUNK_BYTES = 64 << 20  # float32 bytes read, reordered and quantized at a time


# --- the output tensors ------------------------------------------------------------

@dataclass
class OutTensor:
    """One tensor of the output file and how to produce its bytes.

    `read(rows)` gives float32 rows of the source (rows: None, a slice or an index array
    over the first axis). The stored tensor is the source with rows taken in `row_order`
    and columns in `col_order` (None: as they are).
    """

    name: str  # llama.cpp name
    shape: tuple  # logical shape, outermost first (ggml's ne reversed); rows run along the last axis
    read: object
    raw: object = None  # the GGUFTensor of a GGUF input, whose bytes are copied when its type stays
    row_order: object = None
    col_order: object = None
    qtype: object = None  # chosen ggml type
    reason: str = ""
    source_type: str = None  # the type it is stored in at the source ("BF16", "Q4_1" ...), for --leave-output-tensor
    importance: object = None  # float32 [n_mat, cols]: per stored column (and expert), the quantizers' weights

    @property
    def nbytes(self):
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[self.qtype]
        return prod(self.shape) // block * size

    def stored_rows(self, start, stop):
        """Rows [start, stop) of the stored tensor as float32, in the stored order."""
        rows = slice(start, stop) if self.row_order is None else self.row_order[start:stop]
        values = self.read(rows)
        return values if self.col_order is None else values[..., self.col_order]


def tensor_chunks(tensor):
    """The stored bytes of `tensor`, in chunks of rows: copied from a GGUF input, or quantized."""
    from swtool.quant import quantize

    n_rows = tensor.shape[0]  # chunks along the first axis (1-D tensors are never block-quantized)
    step = max(1, CHUNK_BYTES // (4 * (prod(tensor.shape) // max(n_rows, 1))))
    copy = (tensor.raw is not None and tensor.raw.dtype == tensor.qtype.name
            and tensor.row_order is None and tensor.col_order is None)
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        if copy:  # the type stays: the input's bytes, unchanged
            yield tensor.raw.with_stored(lambda stored: np.ascontiguousarray(stored).view(np.uint8).copy(),
                                         slice(start, stop))
        elif tensor.importance is None:
            yield quantize(tensor.stored_rows(start, stop), tensor.qtype)
        elif len(tensor.shape) == 3:  # stacked experts, a chunk of whole experts: each with its own importance
            values = tensor.stored_rows(start, stop)
            yield np.stack([quantize(expert, tensor.qtype, tensor.importance[start + i])
                            for i, expert in enumerate(values)])
        else:
            yield quantize(tensor.stored_rows(start, stop), tensor.qtype, tensor.importance[0])


class _Payload:
    """One tensor's bytes for GGUFWriter.write_tensor_data, made chunk by chunk as they are written.

    The writer needs only `nbytes` and `tofile(file)` of what it is given, so this stands
    in for a NumPy array that would hold the whole tensor.
    """

    def __init__(self, tensor, bar):
        self.tensor, self.bar, self.nbytes = tensor, bar, tensor.nbytes

    def tofile(self, out):
        written = 0
        for chunk in tensor_chunks(self.tensor):
            chunk.tofile(out)
            written += chunk.nbytes
            self.bar.update(chunk.nbytes)
        if written != self.nbytes:  # a wrong size would shift every later tensor
            raise AssertionError(f"{self.tensor.name}: wrote {written} bytes, the tensor table says {self.nbytes}")


# --- super weights ------------------------------------------------------------------

@dataclass
class ProtectedWeight:
    """A super weight as an export handles it."""

    at: Coordinate  # col: in the stored tensor of the output file (after any channel reordering)
    value: float  # in the source, float32
    tensor: str  # llama.cpp name


def super_weights_from_catalog(catalog_path, n_layers, orders):
    """The catalog's super weights, with columns in the source file's layout (`orders`: its swtool.ffn_order)."""
    from swtool.catalog import read_catalog

    return protected_weights(read_catalog(catalog_path), catalog_path, n_layers, orders)


def scanned_super_weights(model, options, orders, collect_importance=False):
    """(super weights, prompt, note, importance) of a scan of `model`: what export and quantize protect
    when given neither a catalog nor a file that records its own (--no-scan turns this off).
    With `collect_importance`, the importance of the scan's prompt comes with its pass over the
    weights (export_importance.UsedImportance), else None."""
    from swtool import export_importance
    from swtool.catalog import scan_catalog

    if not model.arch.runs:
        return [], None, (f"no --catalog, and swtool cannot scan a {model.arch.model_type} model: the super "
                          f"weights are neither recorded nor protected"), None
    if not (Path(model.directory) / "tokenizer.json").is_file():
        return [], None, ("no --catalog, and no tokenizer.json to tokenize the scan's prompt (a scan of a copy "
                          "with one makes the catalog): the super weights are neither recorded nor protected"), None
    collector = export_importance.scan_collector(model) if collect_importance else None
    catalog, _ = scan_catalog(model, None, progress=options.progress, linear_observer=collector)
    found, prompt = protected_weights(catalog, model.path, model.arch.n_layers, orders)
    importance = None
    if collector is not None:
        tokens = [p["tokens"] for p in catalog["detection"]["prompts"]]
        importance = export_importance.from_scan(collector, tokens, prompt)
    return found, prompt, (f"no --catalog: scanned the model with the default prompt, "
                           f"{plural(len(found), 'super weight')} found (--no-scan to skip)"), importance


def protected_weights(catalog, source, n_layers, orders):
    """(ProtectedWeight list, prompt) of a catalog dict (`source`: where it came from, for errors)."""
    catalog_path = source
    recorded_layers = catalog["model"].get("num_layers")
    if recorded_layers != n_layers:
        raise SwtoolError(f"{catalog_path}: the catalog is for a model with {plural(recorded_layers, 'layer')}; "
                          f"this one has {n_layers}")
    found = []
    for sw in catalog["super_weights"]:
        col = sw["col"]
        if sw["layer"] in orders:  # the input was reordered by an earlier export: where that column is now
            col = orders[sw["layer"]].index(col)
        at = Coordinate(sw["layer"], sw["row"], col, sw.get("expert"))
        found.append(ProtectedWeight(at, float(sw["value"]), sw["gguf_tensor"]))
    return found, catalog["detection"].get("prompt")


def check_super_weights(super_weights, tensors, source):
    """Each super weight's tensor exists and holds the catalog's value; the source's exact value is kept."""
    for sw in super_weights:
        tensor = tensors.get(sw.tensor)
        # an expert's weight is element [expert, row, col] of the stacked experts [experts, out, in]
        index = (sw.at.row, sw.at.col) if sw.at.expert is None else (sw.at.expert, sw.at.row, sw.at.col)
        if tensor is None or len(tensor.shape) != len(index):
            what = "a matrix" if sw.at.expert is None else "a stack of experts"
            raise SwtoolError(f"{source}: the catalog's tensor {sw.tensor!r} is not {what} of this model")
        if not all(0 <= i < n for i, n in zip(index, tensor.shape)):
            raise SwtoolError(f"{source}: {sw.tensor} of shape {list(tensor.shape)} has no element {list(index)}")
        actual = float(tensor.read(np.array([index[0]]))[(0,) + index[1:]])
        # bf16 -> f16 conversions move a value by < 0.1 %; a different model moves it much more
        if not abs(actual - sw.value) <= 0.01 * abs(sw.value) + 1e-6:
            raise SwtoolError(f"{source}: {sw.tensor}{list(index)} is {actual:.6g}, the catalog says "
                              f"{sw.value:.6g}: the catalog is not for this model")
        sw.value = actual


def isolate(tensors, super_weights, orders):
    """Reorder the MLP channels of each super-weight layer (quant/isolate.py); updates columns and `orders`."""
    from gguf import GGML_QUANT_SIZES

    from swtool.quant.isolate import isolation_order, stored_position

    for layer in sorted({sw.at.layer for sw in super_weights}):
        here = [sw for sw in super_weights if sw.at.layer == layer]
        down = tensors.get(f"blk.{layer}.ffn_down.weight")
        partners = [tensors.get(f"blk.{layer}.{kind}.{part}") for kind in ("ffn_gate", "ffn_up")
                    for part in ("weight", "bias")]
        if down is None or any(sw.tensor != down.name for sw in here) or partners[0] is None:
            raise SwtoolError(f"--sw-handling isolate needs the super weights in a gated MLP's ffn_down "
                              f"(blk.{layer}.ffn_gate/ffn_up/ffn_down)")
        if GGML_QUANT_SIZES[down.qtype][0] == 1:  # a float type: nothing shares a scale with the super weight
            continue
        rows = sorted({sw.at.row for sw in here})
        order = isolation_order(down.read(np.array(rows)), [sw.at.col for sw in here], down.qtype)
        if (order == np.arange(len(order))).all():  # no swap would lower the error
            continue
        down.col_order = order
        for partner in partners:
            if partner is not None:
                if partner.shape[0] != len(order):
                    raise SwtoolError(f"{partner.name} has {partner.shape[0]} rows, ffn_down {len(order)} columns")
                partner.row_order = order
        for sw in here:
            sw.at = replace(sw.at, col=stored_position(order, sw.at.col))
        previous = orders.get(layer)
        orders[layer] = [int(previous[i]) for i in order] if previous is not None else [int(i) for i in order]


def super_weight_fields(super_weights, prompt, handling, orders):
    """The swtool.* metadata: gguf_keys' per-weight arrays, how they were handled, channel orders."""
    import gguf

    T = gguf.GGUFValueType
    entries = [{"layer": sw.at.layer, "row": sw.at.row, "col": sw.at.col, "value": sw.value, "gguf_tensor": sw.tensor,
                "expert": sw.at.expert} for sw in super_weights]
    if not entries:  # nothing to record: no swtool.* keys at all
        return []
    fields = gguf_keys.metadata_fields(entries, prompt)
    fields.append((gguf_keys.HANDLING, handling, T.STRING, None))
    for layer, order in sorted(orders.items()):
        fields.append((gguf_keys.ffn_order_key(layer), [int(i) for i in order], T.ARRAY, T.UINT32))
    return fields


# --- importance (export_importance.py) ---------------------------------------------------

def importance_before_scan(options, model):
    """(UsedImportance or None, ImportanceSpec): the importance that needs no scan (--imatrix, text,
    random, self, or one given), made before any scan so a bad file fails first. `model()` gives the model
    to run, loaded only when needed."""
    from swtool import export_importance

    spec = export_importance.parse_importance(options.importance, options.imatrix)
    if spec.kind == "file":  # used and recorded whatever the types, as llama-quantize does with --imatrix
        return export_importance.from_file(spec.path), spec
    if not importance_matters(options):  # nothing to compute, nothing to record
        return None, export_importance.ImportanceSpec("none")
    if options.importance_given is not None:
        return options.importance_given, spec
    if spec.kind in ("text", "random", "self"):
        return export_importance.computed(spec, model(), options.progress), spec
    return None, spec


WHOSE = {"catalog": "the catalog's", "gguf metadata": "the input's recorded"}  # where prompts come from, in notes


def importance_matters(options):
    """False when every tensor will be a float type or Q8_0, whose quantizers do not read an importance
    (and no llama-quantize rule does): a float or Q8_0 --type with no per-tensor type option."""
    from swtool.export_importance import UNWEIGHTED_TYPES
    from swtool.quant.policy import parse_target

    plain = parse_target(options.type).qtype.name in UNWEIGHTED_TYPES
    return not (plain and not options.tensor_types and not options.output_tensor_type
                and not options.token_embedding_type)


def importance_of_prompts(model, source, prompts, notes):
    """--importance scan when no scan ran: `prompts` ([(text, token ids)], of the catalog or of the file's
    record: `source`) once more through the layers; None, with a note, when the model cannot run."""
    from swtool import export_importance

    if not model.arch.runs or not prompts:
        notes.append(f"quantized without importance: swtool cannot run a {model.arch.model_type} model"
                     if prompts else "quantized without importance: no prompt recorded to compute it from")
        return None
    tokens = [ids for _, ids in prompts]
    what = f"prompt {prompts[0][0]!r}" if len(prompts) == 1 else f"{len(prompts)} prompts"
    used = export_importance.collected(model, tokens, source, f"{WHOSE[source]} {what} "
                                       f"({sum(map(len, tokens))} tokens)")
    notes.append(f"importance from {WHOSE[source]} {what}: one more pass over the weights, as no scan ran "
                 f"(--importance none skips it)")
    return used


def catalog_prompts(catalog_path):
    """[(prompt, token ids)] a catalog's scan used (version 2 lists them all; version 1 has one)."""
    from swtool.catalog import read_catalog

    detection = read_catalog(catalog_path)["detection"]
    listed = detection.get("prompts") or [{"prompt": detection["prompt"], "tokens": detection["tokens"]}]
    return [(p["prompt"], [int(t) for t in p["tokens"]]) for p in listed]


def copy_identical_tensors(tensors, path):
    """Tensors that `path` (a GGUF of the same checkpoint, written without importance or reordering: `swtool
    sweep`'s `none` file of the type) stores in the same type: its bytes copied, not quantized again.

    A tensor's quantization reads only that tensor's values, so a tensor quantized here without importance
    and in the source's order gets those bytes; keep and control change the types of a few tensors only."""
    from swtool.checkpoint.gguf_file import read_gguf

    written = read_gguf(path).tensors
    for tensor in tensors.values():
        same = written.get(tensor.name)
        if (same is not None and same.row_order is None and tensor.raw is None and tensor.importance is None
                and tensor.row_order is None and tensor.col_order is None
                and same.dtype == tensor.qtype.name and tuple(same.shape) == tuple(tensor.shape)):
            tensor.raw = same


def attach_importance(tensors, used):
    """Each block-quantized tensor's importance as stored (columns in its col_order), where `used` has
    an entry for it; tensors whose bytes are copied or that stay float get none. Returns `used`, or None
    when no tensor got one (nothing was quantized with it: nothing to record) unless it is an --imatrix file."""
    from gguf import GGML_QUANT_SIZES

    for tensor in tensors.values():
        copied = tensor.raw is not None and tensor.raw.dtype == tensor.qtype.name and tensor.col_order is None
        if used is not None and GGML_QUANT_SIZES[tensor.qtype][0] > 1 and not copied:
            tensor.importance = used.for_tensor(tensor)
    if used is None or used.file is not None:  # --imatrix: recorded as llama-quantize records it, matched or not
        return used
    return used if any(t.importance is not None for t in tensors.values()) else None  # else none was used


# --- planning ------------------------------------------------------------------------

@dataclass
class ExportOptions:
    type: str
    keep_type: str = DEFAULT_KEEP_TYPE
    tensor_types: tuple = ()
    handling: str = "keep"
    catalog: str = None
    progress: bool = True
    allow_requantize: bool = False  # GGUF input: re-quantize tensors already block-quantized (llama-quantize's flag)
    scan: bool = True  # without a catalog or a swtool.* record, scan the model for the super weights
    importance: str = None  # --importance scan|none|text:FILE|random[:N] (None: scan), export_importance.py
    imatrix: str = None  # --imatrix FILE: a llama.cpp importance matrix
    importance_given: object = None  # an export_importance.UsedImportance made beforehand (sweep), used as it is
    output_tensor_type: str = None  # llama-quantize's names for the two tensors it lets one set apart
    token_embedding_type: str = None
    pure: bool = False  # llama-quantize --pure: no mix or output rule, every weight in --type
    leave_output_tensor: bool = False  # llama-quantize --leave-output-tensor: output.weight as stored
    dry_run: bool = False  # plan every tensor's type and size; write nothing
    same_bytes_as: str = None  # a GGUF of the same checkpoint written without importance (sweep's `none` file): copied


@dataclass
class ExportReport:
    """What an export wrote, for the CLI's summary and the tests."""

    path: Path
    arch: str
    target: str
    handling: str
    tensors: list  # OutTensor, with qtype and reason
    super_weights: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    dry_run: bool = False
    super_weights_from: str = "none"  # "catalog", "gguf metadata" (the input's swtool.* record), "scan" or "none"
    importance: object = None  # export_importance.UsedImportance, or None: quantized without importance
    shown_as: str | None = None  # how messages name the output, when not by `path` ("-": copied to stdout)

    @property
    def output_name(self):
        return str(self.path) if self.shown_as is None else self.shown_as

    @property
    def file_size(self):
        """Bytes of the file written, or of its tensors alone in a dry run."""
        return sum(t.nbytes for t in self.tensors) if self.dry_run else self.path.stat().st_size


def plan(tensors, options, super_weights, tied_output, model, has_imatrix=False):
    """Choose every tensor's type (model: the policy.ModelFacts its rules read; has_imatrix: quantized
    with an importance, which some of llama-quantize's rules read)."""
    from swtool.quant import quant_type
    from swtool.quant.policy import choose_type, named_tensor_rules, parse_target, parse_tensor_types

    target = parse_target(options.type)
    rules = named_tensor_rules(options.output_tensor_type, options.token_embedding_type)
    rules += parse_tensor_types(options.tensor_types)
    keep = quant_type(options.keep_type) if options.handling == "keep" else None
    holders = {sw.tensor for sw in super_weights}
    for tensor in tensors.values():
        choice = choose_type(tensor.name, tensor.shape, target, model, tied_output=tied_output,
                             has_imatrix=has_imatrix,
                             rules=rules, super_tensors=holders, keep_type=keep, pure=options.pure)
        tensor.qtype, tensor.reason = choice.qtype, choice.reason
        if options.leave_output_tensor and tensor.name == "output.weight" and tensor.source_type:
            tensor.qtype, tensor.reason = quant_type(tensor.source_type), "--leave-output-tensor: as stored"
    return target, rule_notes(rules, tensors)


def rule_notes(rules, tensors):
    """What each --tensor-type pattern matched: a pattern that matches nothing or more than it seems
    to ('output\\.weight' is also in every attn_output.weight) is easy to miss otherwise."""
    notes = []
    for pattern, text, _ in rules:
        matched = [t.name for t in tensors.values() if t.reason.startswith(text)]
        if not matched:
            notes.append(f"{text} matched no tensor")
        elif text.startswith("--tensor-type"):
            shown = ", ".join(matched[:3]) + (f" ... {matched[-1]}" if len(matched) > 3 else "")
            notes.append(f"{text} matched {plural(len(matched), 'tensor')}: {shown}")
    return notes


def check_options(options):
    """Every option's value, before anything is read (a scan is not run for a command that will fail)."""
    from swtool.export_importance import parse_importance
    from swtool.quant.policy import named_tensor_rules, parse_target, parse_tensor_types

    if options.handling not in HANDLINGS:
        raise SwtoolError(f"--sw-handling {options.handling!r}: expected one of {', '.join(HANDLINGS)}")
    if options.keep_type.lower() not in KEEP_TYPES:
        raise SwtoolError(f"--keep-type {options.keep_type!r}: expected one of {', '.join(KEEP_TYPES)}")
    parse_target(options.type)
    parse_importance(options.importance, options.imatrix)
    parse_tensor_types(options.tensor_types)
    named_tensor_rules(options.output_tensor_type, options.token_embedding_type)


@cache
def whole_array_packing(gguf):
    """gguf.GGUFWriter whose metadata arrays of strings or numbers are packed at once, into the same bytes.

    gguf-py packs an array element by element (a struct format built per element): a vocabulary's
    tokens, scores, types and merges are 10^5 to 10^6 elements, and packing them took longer than
    writing a small model's tensors. Anything else (big-endian files, nested or mixed arrays, a value
    the fast path would store differently) goes to gguf-py's own packing, which also raises its errors.
    """
    from collections.abc import Sequence
    from struct import Struct

    T = gguf.GGUFValueType
    formats = {T.UINT8: "<u1", T.INT8: "<i1", T.UINT16: "<u2", T.INT16: "<i2", T.UINT32: "<u4", T.INT32: "<i4",
               T.UINT64: "<u8", T.INT64: "<i8", T.FLOAT32: "<f4", T.FLOAT64: "<f8", T.BOOL: "<u1"}
    u32, u64 = Struct("<I"), Struct("<Q")

    def element_type(kinds):
        """What gguf-py's GGUFValueType.get_type gives every element of these types, or None where they differ."""
        if all(issubclass(k, (str, bytes, bytearray)) for k in kinds):
            return T.STRING
        if kinds == {float}:
            return T.FLOAT32
        if kinds == {bool}:
            return T.BOOL
        if all(issubclass(k, int) and not issubclass(k, bool) for k in kinds):
            return T.INT32
        return None

    def packed_numbers(values, kind):
        """The little-endian bytes of `values` as `kind`, or None if struct would store or refuse them otherwise."""
        allowed = (int, np.integer) if kind not in (T.FLOAT32, T.FLOAT64, T.BOOL) else (int, float, np.integer, np.floating)
        if kind != T.BOOL and not all(isinstance(v, allowed) for v in values):
            return None  # struct refuses a float as an integer and a string as a number; numpy would convert
        try:
            if kind == T.BOOL:
                return np.array([bool(v) for v in values], dtype=np.uint8).tobytes()
            exact = np.array(values, dtype=np.float64 if kind in (T.FLOAT32, T.FLOAT64) else np.int64)
        except (OverflowError, TypeError, ValueError):
            return None
        with np.errstate(over="ignore", invalid="ignore"):  # out of range: caught below, left to struct
            stored = exact.astype(formats[kind])
        if kind in (T.FLOAT32, T.FLOAT64):  # NaN payloads and float32 overflow: struct's own rules
            return stored.tobytes() if np.isfinite(stored).all() else None
        return stored.tobytes() if np.array_equal(stored.astype(np.int64), exact) else None

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            fast = None
            if vtype == T.ARRAY and isinstance(val, Sequence) and not isinstance(val, (str, bytes, bytearray, list, tuple)):
                # quantize copies the reader's arrays (NumberArray, LazyStrings): gguf-py packs any Sequence
                # element by element, the same elements as this list's
                val = list(val)
            if vtype == T.ARRAY and self.endianess == gguf.GGUFEndian.LITTLE and isinstance(val, (list, tuple)) and val:
                types = set(map(type, val))
                kind = sub_type if sub_type is not None else element_type(types)
                if kind == T.STRING and all(issubclass(t, (str, bytes, bytearray)) for t in types):
                    # map() over C functions: no Python frame per element of a 10^5-element vocabulary
                    encoded = (list(map(str.encode, val)) if all(issubclass(t, str) for t in types)
                               else [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val])
                    parts = [b""] * (2 * len(encoded))
                    parts[0::2], parts[1::2] = map(u64.pack, map(len, encoded)), encoded
                    fast = b"".join(parts)
                elif kind in formats:
                    fast = packed_numbers(val, kind)
                if fast is not None:
                    fast = u32.pack(kind) + u64.pack(len(val)) + fast
            if fast is None:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            return (u32.pack(vtype) if add_vtype else b"") + fast

    return Writer


def write_gguf(out_path, arch_name, add_metadata, tensors, progress):
    """Write the file: metadata and tensor table, then each tensor's bytes; atomically."""
    import gguf
    from swtool.atomic import atomic_path
    from swtool.progress import progress_bar

    total = sum(tensor.nbytes for tensor in tensors)
    with atomic_path(out_path, nbytes=total) as tmp:  # refuses at once if the disk cannot hold the tensors
        writer = whole_array_packing(gguf)(tmp, arch_name)
        try:
            add_metadata(writer)
            for tensor in tensors:  # the logical shape: raw_dtype with a float dtype keeps it as given
                writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes,
                                       raw_dtype=tensor.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with progress_bar(None, progress, total=total, unit="B", unit_scale=True, desc=Path(out_path).name,
                              leave=False) as bar:
                for tensor in tensors:
                    bar.set_postfix_str(f"{tensor.name} {tensor.qtype.name}", refresh=False)
                    writer.write_tensor_data(_Payload(tensor, bar), tensor_endianess=gguf.GGUFEndian.LITTLE)
        finally:
            writer.close()


def handle_super_weights(tensors, options, super_weights, orders, source):
    """Check the super weights against the model and apply --sw-handling isolate."""
    check_super_weights(super_weights, tensors, source)
    if options.handling == "isolate" and super_weights:
        isolate(tensors, super_weights, orders)


def same_path(a, b):
    a, b = Path(a), Path(b)
    return a.exists() and b.exists() and a.resolve() == b.resolve()


# --- export: Hugging Face checkpoint -> GGUF -----------------------------------------

def export(model_path, out_path, options):
    """Write `model_path` (a Hugging Face checkpoint) as a GGUF file at `out_path`; returns a Report."""
    from swtool.checkpoint.source import gguf_file_of, resolve_source
    from swtool.model import load_model

    check_options(options)
    check_destination(out_path, force=True)  # a directory to write in (the CLI has refused existing files)
    gguf = gguf_file_of(resolve_source(model_path))  # a GGUF file, a directory or Hub id holding one
    if gguf is not None:  # a GGUF changes type, its metadata copied
        return quantize_gguf(gguf, out_path, options)
    model = load_model(model_path)
    if not model.arch.gguf_exports:
        from swtool.arch import gguf_export_model_types

        raise SwtoolError(f"export supports model_type {', '.join(gguf_export_model_types())}; "
                          f"{model_path} is {model.arch.model_type!r}")
    arch_name = model.arch.gguf_arch_name()
    if model.arch.moe is not None:
        model.arch.moe.check_gguf_export(arch_name)
    from swtool.export_vocab import read_tokenizer_json

    directory = model.checkpoint.directory  # a vocabulary that cannot be written fails before a scan
    if (directory / "tokenizer.json").is_file() or not (directory / "tokenizer.model").is_file():
        read_tokenizer_json(directory)  # (a family may build its vocabulary from tokenizer.model alone)
    tensors = hf_tensors(model)
    n_layers = model.arch.n_layers
    super_weights, prompt, orders, notes, found_by = [], None, {}, [], "none"
    used, spec = importance_before_scan(options, lambda: model)
    from_scan = spec.kind == "scan" and used is None
    if options.catalog:
        super_weights, prompt = super_weights_from_catalog(options.catalog, n_layers, {})
        found_by = "catalog"
        if from_scan:
            used = importance_of_prompts(model, "catalog", catalog_prompts(options.catalog), notes)
    elif options.scan:
        super_weights, prompt, note, scanned = scanned_super_weights(model, options, {}, from_scan)
        notes.append(note)
        found_by = "scan" if prompt is not None else "none"  # None: it could not be scanned (the note says why)
        used = used or scanned
    else:
        notes.append("--no-scan and no --catalog: the super weights are neither recorded nor protected")
    if from_scan and used is None and not options.catalog:
        notes.append("quantized without importance: it comes from the scan's prompt, and no scan ran "
                     "(--importance text:FILE or random, or --imatrix FILE, give one without a scan)")
    facts = ModelFacts.of(arch_name, n_layers, model.arch.heads.n, model.arch.heads.n_kv,
                          model.arch.moe.n_experts if model.arch.moe is not None else 0)
    target, rules_matched = plan(tensors, options, super_weights, "output.weight" not in tensors, facts,
                                 has_imatrix=used is not None)
    notes += rules_matched
    handle_super_weights(tensors, options, super_weights, orders, model_path)
    handling = handling_label(options, super_weights, orders, tensors)
    used = attach_importance(tensors, used)
    if options.same_bytes_as:
        copy_identical_tensors(tensors, options.same_bytes_as)

    def add_metadata(writer):
        import gguf

        add_general(writer, model)
        model.arch.gguf_hyperparameters(writer)
        writer.add_file_type(target.file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        kind = model.arch.gguf_tokenizer(writer, model.checkpoint.directory)
        model.arch.gguf_vocabulary(writer, model.checkpoint.directory, kind)
        for key, value, kind, sub_type in output_fields(super_weights, prompt, handling, orders, used):
            writer.add_key_value(key, value, kind, sub_type=sub_type)

    ordered = sorted(tensors.values(), key=tensor_order)
    if not options.dry_run:
        write_gguf(out_path, arch_name, add_metadata, ordered, options.progress)
    window = model.arch.sliding_window(0)
    if window is not None and not model.arch.gguf_windows and window < int(model.checkpoint.config["max_position_embeddings"]):
        notes.append(f"sliding_window {window}: llama.cpp's {arch_name} architecture attends to the whole "
                     f"context, so beyond {window} tokens it computes differently (as convert_hf_to_gguf's files)")
    return ExportReport(Path(out_path), arch_name, target.name, handling, ordered, super_weights, notes,
                        options.dry_run, found_by, used)


def output_fields(super_weights, prompt, handling, orders, used):
    """The swtool.* (and, for --imatrix, quantize.imatrix.*) metadata an export writes."""
    from swtool.export_importance import metadata_fields

    return super_weight_fields(super_weights, prompt, handling, orders) + metadata_fields(used)


def handling_label(options, super_weights, orders, tensors):
    """What was done, as recorded in swtool.export.handling: "keep:Q8_0", "isolate" or "none"."""
    if not super_weights:
        return "none"
    if options.handling == "keep" and any(t.reason.startswith(KEPT) for t in tensors.values()):
        return f"keep:{options.keep_type.upper()}"
    if options.handling == "isolate" and orders:
        return "isolate"
    return "none"  # nothing was changed for them: the file's type is at least as precise, or a float type


def tensor_order(tensor):
    """token_embd, then the blocks in order, then the rest (output_norm, output), as converters write them."""
    from swtool.quant.policy import layer_of

    layer = layer_of(tensor.name)
    if tensor.name == "token_embd.weight":
        return (0, 0, tensor.name)
    return (1, layer, tensor.name) if layer is not None else (2, 0, tensor.name)


def hf_tensors(model):
    """{llama.cpp name: OutTensor} for every tensor of a Hugging Face checkpoint, as the family converts it.

    Weights stored [in, out] (GPT-2's Conv1D) are written as W [out, in], as the converter
    transposes them; tensors that share a llama.cpp name (StableLM's per-head norms) are
    stacked along a new first axis, in the order tensor_shapes() lists them."""
    from swtool.checkpoint.transposed import TransposedTensor

    arch, checkpoint = model.arch, model.checkpoint
    restacked, replaced = arch.gguf_restacked(checkpoint.tensor)  # a mixture's experts, as the converter stacks them
    parts = {}
    for hf_name in arch.tensor_shapes():
        if hf_name in replaced:
            continue
        info = checkpoint.tensor(hf_name)
        parts.setdefault(arch.gguf_name(hf_name), []).append(
            TransposedTensor(info) if arch.stored_transposed(hf_name) else info)
    tensors = {}
    for name, infos in parts.items():
        tensors[name] = (OutTensor(name, tuple(infos[0].shape), infos[0].read, source_type=infos[0].dtype)
                         if len(infos) == 1 else stacked(name, infos))
    for hf_name, (shape, read) in restacked.items():
        name = arch.gguf_name(hf_name)
        tensors[name] = OutTensor(name, tuple(shape), read)
    for name, tensor in tensors.items():
        tensor.read = offset_reader(tensor.read, arch.gguf_value_offset(name))
        stored_rows = arch.gguf_stored_rows(name, tensor.shape[0])
        if stored_rows is not None:  # the file's row i is the source's row row_order[i]
            tensor.row_order = np.argsort(stored_rows)
    for name, values in arch.gguf_extra_tensors().items():
        tensors[name] = OutTensor(name, values.shape,
                                  lambda rows, values=values: values if rows is None else values[rows])
    return tensors


def stacked(name, infos):
    """One OutTensor [len(infos), *shape] whose row i is the tensor infos[i]."""
    def read(rows=None):
        picked = range(len(infos)) if rows is None else np.arange(len(infos))[rows]
        return np.stack([infos[i].read() for i in picked])

    return OutTensor(name, (len(infos),) + tuple(infos[0].shape), read)


def offset_reader(read, offset):
    """`read`, with the family's stored offset added to every value (float32, as the converter adds it)."""
    if not offset:
        return read
    return lambda rows: read(rows) + np.float32(offset)


def add_general(writer, model):
    writer.add_type("model")
    writer.add_name(Path(model.path).resolve().name)


# --- quantize: GGUF -> GGUF --------------------------------------------------------------

def quantize_gguf(in_path, out_path, options):
    """Quantize a GGUF file to another type, copying all its metadata; returns a Report.

    Float tensors are quantized; a tensor already block-quantized keeps its bytes when its
    type stays, and is decoded and quantized again only with options.allow_requantize (as
    llama-quantize): the result can be no better than the source's quantization."""
    from swtool.checkpoint.gguf_file import read_gguf

    check_options(options)
    check_destination(out_path, force=True)  # a directory to write in (the CLI has refused existing files)
    if same_path(in_path, out_path):
        raise SwtoolError(f"{out_path}: the output would overwrite the input")
    source = read_gguf(in_path)
    check_copyable(source)
    meta = source.metadata
    arch_name = meta.get("general.architecture")
    n_layers = meta.get(f"{arch_name}.block_count")
    if not isinstance(n_layers, int):
        raise SwtoolError(f"{in_path}: no {arch_name}.block_count in the metadata")
    tensors = {name: OutTensor(name, info.shape, info.read, raw=info, source_type=info.dtype)
               for name, info in source.tensors.items()}
    orders = gguf_keys.read_ffn_orders(meta)
    facts = ModelFacts.of(arch_name, n_layers, meta.get(f"{arch_name}.attention.head_count"),
                          meta.get(f"{arch_name}.attention.head_count_kv"),  # llama.cpp's default: no GQA
                          meta.get(f"{arch_name}.expert_count", 0))
    tied = "output.weight" not in tensors
    plan(tensors, options, [], tied, facts)
    requantizing(tensors, options, in_path)  # refused before a scan, not after it
    super_weights, prompt, notes, found_by = [], meta.get(gguf_keys.PROMPT), [], "none"
    recorded = gguf_keys.read_super_weights(meta, in_path) or []
    loaded = []

    def model():
        from swtool.model import load_model

        if not loaded:
            loaded.append(load_model(in_path, header_only=True))
        return loaded[0]

    used, spec = importance_before_scan(options, model)
    from_scan = spec.kind == "scan" and used is None
    if options.catalog:
        super_weights, prompt = super_weights_from_catalog(options.catalog, n_layers, orders)
        found_by = "catalog"
        if from_scan:
            used = importance_of_prompts(model(), "catalog", catalog_prompts(options.catalog), notes)
    elif recorded:  # a file swtool exported before: its own record
        super_weights = [ProtectedWeight(Coordinate.of(sw), float(sw["value"]), sw["gguf_tensor"])
                         for sw in recorded]
        found_by = "gguf metadata"
        if from_scan:
            used = importance_of_prompts(model(), "gguf metadata", recorded_prompts(model(), prompt), notes)
    elif options.scan:
        super_weights, prompt, note, scanned = scanned_super_weights(model(), options, orders, from_scan)
        notes.append(note)
        found_by = "scan" if prompt is not None else "none"  # None: it could not be scanned (the note says why)
        used = used or scanned
    else:
        notes.append("--no-scan, no --catalog and no swtool.* record in the input: the super weights are "
                     "neither recorded nor protected")
    if from_scan and used is None and not (options.catalog or recorded):
        notes.append("quantized without importance: it comes from the scan's prompt, and no scan ran "
                     "(--importance text:FILE or random, or --imatrix FILE, give one without a scan)")
    target, rules_matched = plan(tensors, options, super_weights, tied, facts, has_imatrix=used is not None)
    notes += rules_matched
    requantized = requantizing(tensors, options, in_path)
    handle_super_weights(tensors, options, super_weights, orders, in_path)
    handling = handling_label(options, super_weights, orders, tensors)
    used = attach_importance(tensors, used)

    import gguf

    def add_metadata(writer):
        copy_metadata(writer, source, replaced_imatrix=used is not None and used.file is not None)
        writer.add_file_type(target.file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value, kind, sub_type in output_fields(super_weights, prompt, handling, orders, used):
            writer.add_key_value(key, value, kind, sub_type=sub_type)

    ordered = list(tensors.values())  # the input's order
    if not options.dry_run:
        write_gguf(out_path, arch_name, add_metadata, ordered, options.progress)
    if requantized:
        sources = ", ".join(f"{count} from {dtype}" for dtype, count in sorted(requantized.items()))
        notes.append(f"re-quantized {sources}: the quality is bounded by the source's quantization, "
                     f"not only by {target.name}'s")
    return ExportReport(Path(out_path), arch_name, target.name, handling, ordered, super_weights, notes,
                        options.dry_run, found_by, used)


def recorded_prompts(model, prompt):
    """[(prompt, token ids)] of the prompt a GGUF file records (swtool.detection.prompt), or [] without one."""
    from swtool.tokenizer import encode

    return [(prompt, encode(model.directory, prompt))] if prompt and model.arch.runs else []


def requantizing(tensors, options, in_path):
    """Planned GGUF tensors: those not quantized are copied; a tensor already block-quantized into
    another type needs --allow-requantize and a decoder. Returns {source type: tensors re-quantized}."""
    from gguf import GGMLQuantizationType

    requantized = Counter()
    for tensor in tensors.values():
        if tensor.reason == NOT_QUANTIZED:  # as llama-quantize: norms, 1-D tensors ... are copied as they are
            tensor.qtype, tensor.reason = GGMLQuantizationType[tensor.raw.dtype], "copied (not a quantizable weight)"
        if tensor.raw.dtype in ("F32", "F16", "BF16") or tensor.raw.dtype == tensor.qtype.name:
            continue
        if not options.allow_requantize:
            raise SwtoolError(f"{in_path}: tensor {tensor.name} is already quantized ({tensor.raw.dtype}); "
                              f"--allow-requantize decodes and quantizes it again (as llama-quantize), "
                              f"at a quality bounded by {tensor.raw.dtype}'s")
        if not tensor.raw.readable:
            raise SwtoolError(f"{in_path}: tensor {tensor.name} is stored as {tensor.raw.dtype}, which swtool "
                              f"cannot decode to re-quantize")
        requantized[tensor.raw.dtype] += 1
        tensor.reason += f", re-quantized from {tensor.raw.dtype}"
    return requantized


REPLACED_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


MAX_COPIED_ARRAY = 1 << 20  # values in one metadata array outside the vocabulary that quantize copies


def check_copyable(source):
    """Before anything is written: gguf-py's writer packs an array value by value, so a hostile file's
    array of a billion values would take minutes and gigabytes; the vocabulary's arrays are exempt."""
    for key, value in source.metadata.items():
        if not key.startswith("tokenizer.") and gguf_keys.is_array(value) and len(value) > MAX_COPIED_ARRAY:
            raise SwtoolError(f"{source.path}: metadata {key} holds an array of {len(value)} values; "
                              f"quantize copies arrays of at most {MAX_COPIED_ARRAY} outside the vocabulary")


def copy_metadata(writer, source, replaced_imatrix=False):
    """Every metadata key of the input, with its type, except those the output sets itself
    (`replaced_imatrix`: the quantize.imatrix.* keys too, as --imatrix writes its own)."""
    import gguf

    T = gguf.GGUFValueType
    alignment = source.metadata.get("general.alignment")
    if alignment is not None:
        writer.add_custom_alignment(alignment)  # the tensor data must follow the same alignment
    for key, value in source.metadata.items():
        if key in REPLACED_KEYS or key.startswith(gguf_keys.PREFIX):
            continue
        if replaced_imatrix and key.startswith(gguf_keys.LLAMA_IMATRIX_PREFIX):
            continue
        kind = source.value_types[key]
        if isinstance(kind, tuple):  # (ARRAY, element type)
            writer.add_key_value(key, value, T.ARRAY, sub_type=T(kind[1]))
        else:
            writer.add_key_value(key, value, T(kind))


# --- the summary ------------------------------------------------------------------------------

def format_export(report):
    """The CLI's summary: bytes per type, the super weights and where they went."""
    from collections import Counter

    from swtool.table import format_table

    counts, sizes = Counter(), Counter()
    for tensor in report.tensors:
        counts[tensor.qtype.name] += 1
        sizes[tensor.qtype.name] += tensor.nbytes
    verb = "would write (dry run, nothing written)" if report.dry_run else "wrote"
    lines = [f"{verb} {report.output_name}: {report.arch}, --type {report.target}, {plural(len(report.tensors), 'tensor')}, "
             f"{report.file_size / 1e6:.1f} MB{' of tensors' if report.dry_run else ''}; "
             f"super weights: {report.handling}"]
    if report.dry_run:
        rows = [[t.name, "x".join(str(n) for n in t.shape), t.qtype.name, f"{t.nbytes / 1e6:.3f}", t.reason]
                for t in report.tensors]
        lines.append(format_table(["tensor", "shape", "type", "MB", "why"], rows))
    rows = [[name, counts[name], f"{sizes[name] / 1e6:.2f}"] for name in sorted(counts, key=lambda n: -sizes[n])]
    lines.append(format_table(["type", "tensors", "MB"], rows))
    by_name = {tensor.name: tensor for tensor in report.tensors}
    if report.super_weights:
        rows = []
        for sw in report.super_weights:
            tensor = by_name[sw.tensor]
            why = tensor.reason + ("; channels reordered: a block of its own" if tensor.col_order is not None else "")
            held_by = sw.tensor + ("" if sw.at.expert is None else f" (expert {sw.at.expert})")
            rows.append([held_by, sw.at.row, sw.at.col, f"{sw.value:.6g}", tensor.qtype.name, why])
        lines.append(format_table(["super weight in", "row", "col", "value", "stored as", "why"], rows))
    lines.append("importance: " + (f"{report.importance.source}: {report.importance.description}, sha256 "
                                   f"{report.importance.sha256[:16]}" if report.importance else "none"))
    fallbacks = sorted({t.reason.split("; ", 1)[1] for t in report.tensors if "; rows of" in t.reason})
    lines += [f"fallback: {text}" for text in fallbacks]
    lines += [f"note: {text}" for text in report.notes]
    return "\n".join(lines)


def describe_importance(used):
    """The --json "importance": where the quantizers' column weights came from, or null for none."""
    if used is None:
        return None
    return {"source": used.source, "description": used.description, "tokens": int(used.tokens),
            "file": used.file, "entries": len(used.importance.entries), "sha256": used.sha256}


def describe_export(report, source, options):
    """What `swtool export --json` and `swtool quantize --json` print: the file, its types, the super weights
    and how they were handled (`source`: the model or GGUF file given; `options`: the ExportOptions)."""
    types = {}
    for tensor in report.tensors:
        entry = types.setdefault(tensor.qtype.name, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += int(tensor.nbytes)
    by_name = {tensor.name: tensor for tensor in report.tensors}
    super_weights = []
    for sw in report.super_weights:
        tensor = by_name[sw.tensor]
        super_weights.append({"layer": sw.at.layer, "row": sw.at.row, "col": sw.at.col, "expert": sw.at.expert,
                              "gguf_tensor": sw.tensor, "value": float(sw.value), "stored_as": tensor.qtype.name,
                              "reordered": tensor.col_order is not None, "reason": tensor.reason})
    return {
        "schema": SCHEMA_ID,
        "input": str(source),
        "output": report.output_name,
        "dry_run": report.dry_run,
        "architecture": report.arch,
        "type": report.target,
        "file_bytes": None if report.dry_run else int(report.file_size),
        "tensor_bytes": int(sum(tensor.nbytes for tensor in report.tensors)),
        "handling": report.handling,
        "super_weights_from": report.super_weights_from,
        "catalog": str(options.catalog) if options.catalog else None,
        "super_weights": super_weights,
        "importance": describe_importance(report.importance),
        "types": dict(sorted(types.items(), key=lambda item: -item[1]["bytes"])),
        "tensors": [{"name": t.name, "shape": [int(n) for n in t.shape], "type": t.qtype.name, "bytes": int(t.nbytes),
                     "reason": t.reason} for t in report.tensors],
        "notes": list(report.notes),
    }

"""Did this checkpoint keep its super weights? Read only their bytes and compare.

Where the coordinates come from, first that applies:
  1. --catalog: a scan catalog (expected values included);
  2. --known / --known-id: the coordinates of `swtool catalog known` (known.py; no values);
  3. a GGUF's `swtool.*` metadata (gguf_keys.py; the exporter records exact values);
  4. otherwise a scan of the reference (with --reference) or of the model itself.

What is read per super weight, and nothing more:
  - safetensors: the element's 2 or 4 bytes, at its offset in the file;
  - GGUF: the one quantization block that holds it (18-210 bytes), dequantized alone;
  - coordinates without a value (published ones): also the weight's row, to tell
    whether it is still an outlier of that row.

Verdict per weight: `missing` (no such tensor, or outside it), `zeroed` (exactly 0),
`changed` (off by more than the tolerance, relative), `not outlier` (a published
coordinate whose weight is no longer |w| >= OUTLIER_RATIO x its row's RMS), `not finite`
(NaN or Inf), or `intact`. With --reference the expected value is the reference checkpoint's.
Disputed published coordinates are shown but do not decide the exit code.
"""

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from swtool.errors import SwtoolError

DEFAULT_TOLERANCE = 0.05  # relative; Q4_1/Q8_0/bf16 copies of the same weights stay within 1% (README)
OUTLIER_RATIO = 5.0  # |w| / RMS of its row, for coordinates that come without a value
SCHEMA_ID = "swtool.audit/1"


@dataclass
class Target:
    """A super weight to look for."""

    layer: int
    row: int
    col: int
    tensor: str  # Hugging Face name
    expected: float | None = None
    disputed: bool = False
    note: str = ""


@dataclass
class Finding:
    layer: int
    row: int
    col: int
    tensor: str
    gguf_tensor: str | None
    status: str
    value: float | None = None
    expected: float | None = None
    relative_change: float | None = None
    dtype: str | None = None
    recorded: float | None = None  # the GGUF's swtool.super_weights.value, if any
    block: dict | None = None  # GGUF: {"index", "size"} of the block the value was decoded from
    row_rank: int | None = None  # 1 = largest |w| of its row (published coordinates)
    row_ratio: float | None = None  # |w| / RMS of its row
    disputed: bool = False
    note: str = ""

    @property
    def present(self):
        """The tensor exists and holds the coordinate (its value may still be damaged)."""
        return self.status != "missing"


@dataclass
class Report:
    model: str
    format: str
    expectations: str  # where the coordinates and expected values came from
    tolerance: float
    findings: list = field(default_factory=list)
    reference: str | None = None
    known_model: str | None = None
    elapsed_ms: float = 0.0  # the whole audit: opening and validating the checkpoint(s), any scan, the reads
    read_ms: float = 0.0  # reading and judging the super weights alone
    bytes_read: int = 0
    scan: dict | None = None  # the catalog of a scan, when one was run

    @property
    def failed(self):
        return [f for f in self.findings if f.status != "intact" and not f.disputed]

    def to_json(self):
        data = {"schema": SCHEMA_ID, **{k: v for k, v in asdict(self).items() if k != "scan"}}
        for finding, entry in zip(self.findings, data["findings"]):
            entry["present"] = finding.present
        data["ok"] = not self.failed and bool(self.findings)
        return data


# --- reading single weights -------------------------------------------------------

def read_weight(info, row, col):
    """(value, bytes read, block) of W[row, col], reading only its element (or its quantization block)."""
    if hasattr(info, "read_block"):  # a GGUF tensor: decode the block that holds the weight
        values, index = info.read_block(row, col)
        return float(values[index]), info.type_size, {"index": col // info.block_size, "size": info.block_size}
    from swtool.checkpoint.safetensors import DTYPES, FLOAT_DTYPES, decode_float32

    if info.dtype not in FLOAT_DTYPES:
        raise SwtoolError(f"{info.path}: tensor {info.name!r} has dtype {info.dtype}; swtool reads {', '.join(FLOAT_DTYPES)}")
    size, stored = DTYPES[info.dtype]
    with open(info.path, "rb") as f:  # one element: pread-sized, no map of the tensor
        f.seek(info.element_offset((row, col)))
        raw = f.read(size)
    return float(decode_float32(np.frombuffer(raw, stored), info.dtype)[0]), size, None


def row_outlier(info, row, value):
    """(rank of |value| in its row, |value| / RMS of the row, bytes read)."""
    from swtool.checkpoint.safetensors import DTYPES

    weights = info.read(rows=[row])[0]
    rms = float(np.sqrt(np.mean(np.square(weights, dtype=np.float64))))
    rank = 1 + int(np.count_nonzero(np.abs(weights) > abs(value)))
    row_bytes = getattr(info, "row_bytes", None) or weights.size * DTYPES[info.dtype][0]
    return rank, (abs(value) / rms if rms > 0 else float("inf")), row_bytes


# --- judging ----------------------------------------------------------------------

def judge(target, checkpoint, tolerance, recorded=None):
    """The Finding for one target in one checkpoint, and the bytes it took."""
    base = dict(layer=target.layer, row=target.row, col=target.col, tensor=target.tensor,
                expected=target.expected, disputed=target.disputed, note=target.note, recorded=recorded)
    if target.tensor not in checkpoint:
        return Finding(gguf_tensor=None, status="missing", **base), 0
    info = checkpoint.tensor(target.tensor)
    gguf_name = getattr(info, "gguf_name", None)
    if len(info.shape) != 2 or not (0 <= target.row < info.shape[0] and 0 <= target.col < info.shape[1]):
        base["note"] = f"outside the tensor's shape {list(info.shape)}"
        return Finding(gguf_tensor=gguf_name, status="missing", dtype=info.dtype, **base), 0
    value, nbytes, block = read_weight(info, target.row, target.col)
    finding = Finding(gguf_tensor=gguf_name, status="intact", value=value, dtype=info.dtype, block=block, **base)
    if not math.isfinite(value):  # NaN compares as "within tolerance" of anything: never intact
        finding.status = "not finite"
        return finding, nbytes
    if target.expected is not None:
        change = _relative_change(value, target.expected)
        finding.relative_change = change
        if value == 0.0 and target.expected != 0.0:
            finding.status = "zeroed"
        elif change > tolerance:
            finding.status = "changed"
    else:  # a published coordinate: is the weight still an outlier of its row?
        finding.row_rank, finding.row_ratio, row_bytes = row_outlier(info, target.row, value)
        nbytes += row_bytes
        if value == 0.0:
            finding.status = "zeroed"
        elif finding.row_ratio < OUTLIER_RATIO:
            finding.status = "not outlier"
    return finding, nbytes


def _relative_change(value, expected):
    if expected == 0.0:
        return 0.0 if value == 0.0 else float("inf")
    return abs(value - expected) / abs(expected)


# --- where the coordinates come from ---------------------------------------------

def targets_from_catalog(catalog):
    return [Target(sw["layer"], sw["row"], sw["col"], sw["tensor"], expected=float(sw["value"]))
            for sw in catalog["super_weights"]]


def targets_from_known(model, known_model):
    targets = []
    for sw in known_model.super_weights:
        note = sw.get("conflict", "") if sw.get("disputed") else ""
        targets.append(Target(sw["layer"], sw["row"], sw["col"], model.arch.down_proj_name(sw["layer"]),
                              disputed=bool(sw.get("disputed")), note=note))
    return targets


def targets_from_metadata(model, recorded):
    """Targets from a GGUF's swtool.* metadata: HF names found through the tensors' llama.cpp names."""
    by_gguf_name = {model.checkpoint.tensor(name).gguf_name: name for name in model.checkpoint.names()}
    targets = []
    for sw in recorded:
        tensor = by_gguf_name.get(sw["gguf_tensor"], model.arch.down_proj_name(sw["layer"]))
        targets.append(Target(sw["layer"], sw["row"], sw["col"], tensor, expected=float(sw["value"])))
    return targets


def recorded_super_weights(model):
    """The swtool.* super weights of a GGUF model, or None."""
    metadata = getattr(model.checkpoint, "metadata", None)
    if metadata is None:
        return None
    from swtool import gguf_keys

    return gguf_keys.read_super_weights(metadata, model.checkpoint.path)


def model_id(spec, model):
    """The Hub id a model argument names, if any: the id itself or a cache snapshot path."""
    from pathlib import Path

    from swtool.checkpoint.hub import hub_id_of_path, parse_hub_id

    if not Path(spec).exists() and parse_hub_id(spec):
        return spec
    return hub_id_of_path(spec)


def scan_targets(model, prompt, progress):
    """Scan `model` (one streamed pass or a few): its super weights as targets, and the catalog."""
    from swtool.catalog import build_catalog
    from swtool.detect import Settings, scan
    from swtool.tokenize import DEFAULT_PROMPT, encode

    prompt = prompt or DEFAULT_PROMPT
    tokens = encode(model.directory, prompt)
    settings = Settings(prompt=prompt)
    found, report = scan(model, tokens, settings, progress=progress)
    catalog = build_catalog(model, prompt, tokens, settings, found, report)
    return targets_from_catalog(catalog), catalog


# --- the audit ----------------------------------------------------------------------

def audit(spec, catalog=None, known=False, known_id=None, reference=None, tolerance=DEFAULT_TOLERANCE,
          download=False, prompt=None, progress=False):
    """Audit the super weights of MODEL `spec`; returns a Report (see the module docstring)."""
    from swtool.catalog import read_catalog
    from swtool.model import load_model

    started = time.perf_counter()
    model = load_model(spec, download=download)
    ref_model = load_model(reference, download=download) if reference else None
    report = Report(model=str(spec), format=getattr(model.checkpoint, "format", "safetensors"),
                    expectations="", tolerance=tolerance, reference=str(reference) if reference else None)
    recorded = recorded_super_weights(model)
    if catalog:
        targets, report.expectations = targets_from_catalog(read_catalog(catalog)), f"catalog {catalog}"
    elif known or known_id:
        from swtool import known as known_table

        if known_id:
            match = known_table.by_id(known_id)
            if match is None:
                raise SwtoolError(f"--known-id {known_id}: not a known model (see swtool catalog known)")
            how = "named"
        else:
            found = known_table.identify(model.checkpoint.config, model_id(spec, model))
            if found is None:
                raise SwtoolError(f"{spec}: matches no model with published super weights, by id or by config "
                                  f"(see swtool catalog known); use --catalog, or no option to scan")
            match, how = found.model, f"matched by {found.how}"
        targets = targets_from_known(model, match)
        report.known_model, report.expectations = match.id, f"the known coordinates of {match.id} ({how})"
    elif recorded:
        targets, report.expectations = targets_from_metadata(model, recorded), "the GGUF's swtool.* metadata"
    else:
        scanned = ref_model or model
        targets, report.scan = scan_targets(scanned, prompt, progress)
        report.expectations = f"a scan of {'the reference' if ref_model else 'the model'}"
    recorded_values = {(sw["layer"], sw["row"], sw["col"]): sw["value"] for sw in recorded or ()}
    reading = time.perf_counter()
    for target in targets:
        if ref_model is not None:  # the expected value is the reference's own
            expected, nbytes = value_at(ref_model.checkpoint, target)
            report.bytes_read += nbytes
            target = Target(**{**asdict(target), "expected": expected})
        finding, nbytes = judge(target, model.checkpoint, tolerance,
                                recorded_values.get((target.layer, target.row, target.col)))
        if ref_model is not None and target.expected is None:
            finding.status, finding.note = "missing", "not in the reference"
        report.findings.append(finding)
        report.bytes_read += nbytes
    done = time.perf_counter()
    report.read_ms, report.elapsed_ms = (done - reading) * 1000, (done - started) * 1000
    return report


def value_at(checkpoint, target):
    """(W[row, col] or None if absent, bytes read) in another checkpoint, e.g. the reference."""
    if target.tensor not in checkpoint:
        return None, 0
    info = checkpoint.tensor(target.tensor)
    if len(info.shape) != 2 or not (0 <= target.row < info.shape[0] and 0 <= target.col < info.shape[1]):
        return None, 0
    value, nbytes, _ = read_weight(info, target.row, target.col)
    return value, nbytes


def format_report(report):
    """The human table of an audit."""
    from swtool.table import format_table

    lines = [f"{report.model} ({report.format}): {len(report.findings)} super weights from {report.expectations}"
             + (f", compared with {report.reference}" if report.reference else "")]
    if not report.findings:
        lines.append("no super weight to check: the scan found none")
        return "\n".join(lines)
    header = ["layer", "row", "col", "tensor", "dtype", "value", "expected", "change", "status"]
    recorded = any(f.recorded is not None for f in report.findings)
    published = any(f.row_ratio is not None for f in report.findings)
    header += (["recorded"] if recorded else []) + (["row rank", "x row RMS"] if published else [])
    rows = []
    for f in report.findings:
        status = f.status + (" (disputed)" if f.disputed else "")
        row = [f.layer, f.row, f.col, f.gguf_tensor or f.tensor, f.dtype or "-", _num(f.value), _num(f.expected),
               "-" if f.relative_change is None else f"{f.relative_change:.2%}", status]
        if recorded:
            row.append(_num(f.recorded))
        if published:
            row += ["-" if f.row_rank is None else f.row_rank, "-" if f.row_ratio is None else f"{f.row_ratio:.1f}"]
        rows.append(row)
    lines.append(format_table(header, rows))
    counts = {}
    for f in report.findings:
        counts[f.status] = counts.get(f.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    verdict = "all intact" if not report.failed else f"{len(report.failed)} missing or damaged"
    lines.append(f"{summary}: {verdict} (tolerance {report.tolerance:.0%}); "
                 f"read {report.bytes_read} bytes of weights in {report.read_ms:.1f} ms "
                 f"({report.elapsed_ms:.0f} ms in all)")
    for f in report.findings:
        if f.disputed and f.note:
            lines.append(f"disputed [{f.layer}, {f.row}, {f.col}]: {f.note}")
    return "\n".join(lines)


def _num(value):
    return "-" if value is None else f"{value:.6g}"

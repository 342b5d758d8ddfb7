"""Did this checkpoint keep its super weights? Read only their bytes and compare.

Where the coordinates and expected values come from, first that applies:
  1. what the user named: --catalog (a scan catalog, values included), --known / --known-id
     (the coordinates of `swtool catalog known`, known.py; no values), --reference (a scan
     of the reference; the expected values are the reference's own);
  2. a GGUF's `swtool.*` metadata (gguf_keys.py): the exporter records exact values with the file;
  3. the known table, when the model matches an entry by id or config fingerprint;
  4. a catalog beside the model that is a catalog of this model (same layer count, family and
     config hash; catalog.catalogs_beside);
  5. otherwise a scan of the model itself. It compares each weight with itself, so it can tell
     no damage: its findings are `unverified` and the audit gives no verdict (exit 3), unless the
     model predicts its own prompt clearly worse than a uniform guess (mean NLL above 1.1 x ln(vocab)): broken.

Every catalog is checked against the model first: another model's catalog is bad input (exit 2).

A mixture's catalog also lists super experts (experts.py): for each, the row of its down
projection that writes its massive output is checked, its largest weight as a super weight's
value and the RMS of its other weights within the same tolerance (`super_expert` findings).

What is read per super weight, and nothing more:
  - safetensors: the element's 2 or 4 bytes, at its offset in the file;
  - GGUF: the one quantization block that holds it, dequantized alone;
  - coordinates without a value (published ones): also the weight's row, to tell
    whether it is still an outlier of that row.

Status per weight: `missing` (no such tensor, or outside it), `zeroed` (exactly 0),
`changed` (off by more than the tolerance, relative), `not outlier` (a published
coordinate whose weight is no longer |w| >= OUTLIER_RATIO x its row's RMS), `not finite`
(NaN or Inf), `ablated` (it holds what an `swtool ablate` record beside it, or given as
--catalog, says was written there), `unprotected` (GGUF: stored in a type of fewer than
LOW_BITS bits per weight with handling `none` or none recorded), `unverified` (a self-scan's
finding), or `intact`. Disputed published coordinates are shown but do not decide the exit code.

A known-table entry may say that a published census found no catastrophic super weight in the
model (known.py's none_found). Named (--known, --known-id), it gives no findings and no verdict
(exit 3): nothing published to compare with, so neither intact nor damaged. Matched without an
option, it is noted and passed over, as if the table had no entry for the model.

Exit codes: 0 all intact; 1 any missing, damaged, ablated or unprotected, or a broken model;
2 bad input; 3 no verdict (a self-scan, or a known entry with none found: nothing to compare with).
"""

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from swtool.catalog import catalogs_beside
from swtool.coordinate import Coordinate
from swtool.errors import SwtoolError
from swtool.table import plural

DEFAULT_TOLERANCE = 0.05  # relative; Q4_1/Q8_0/bf16 copies of the same weights stay within 1% (docs/audit.md)
OUTLIER_RATIO = 5.0  # |w| / RMS of its row, for coordinates that come without a value
BROKEN_MARGIN = 1.1  # a prompt NLL above this times ln(vocab) means a broken model (broken_prompt)
LOW_BITS = 4.0  # a GGUF type below this many bits per weight (Q2_K, Q3_K, IQ2/IQ3 ...) needs protection
SCHEMA_ID = "swtool.audit/1"
PASSING = ("intact", "unverified")  # statuses that fail nothing (unverified decides the exit code alone)
EXIT_CODES = {"intact": 0, "damaged": 1, "unverified": 3}  # 2 is bad input, as for every command


@dataclass
class Target:
    """A super weight to look for."""

    at: Coordinate
    tensor: str  # Hugging Face name
    expected: float | None = None
    index: tuple | None = None  # the element as stored (a catalog's tensor_index), when known
    disputed: bool = False
    note: str = ""
    row_rms: float | None = None  # a super expert's: the RMS of its down_proj row's other weights when scanned


@dataclass
class Finding:
    layer: int
    row: int
    col: int
    expert: int | None
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
    bits: float | None = None  # GGUF: bits per weight of the tensor's type
    disputed: bool = False
    note: str = ""
    # a mixture's super expert (experts.py): the largest weight of its down_proj row, and the RMS of the others
    super_expert: bool = False
    row_rms: float | None = None  # as read now
    expected_row_rms: float | None = None  # as the catalog recorded it

    @property
    def present(self):
        """The tensor exists and holds the coordinate (its value may still be damaged)."""
        return self.status != "missing"


@dataclass
class AuditReport:
    model: str
    format: str
    expectations: str  # where the coordinates and expected values came from
    tolerance: float
    findings: list = field(default_factory=list)
    reference: str | None = None
    known_model: str | None = None
    known_none: str | None = None  # the known entry says a census found no super weight: what it says
    elapsed_ms: float = 0.0  # the whole audit: opening and validating the checkpoint(s), any scan, the reads
    read_ms: float = 0.0  # reading and judging the super weights alone
    bytes_read: int = 0
    scan: dict | None = None  # the catalog of a scan, when one was run
    self_scan: bool = False  # the expectations are a scan of the model itself: no reference
    broken: dict | None = None  # {"nll", "uniform"}: the self-scan's prompt NLL is above 1.1 x ln(vocab)
    handling: str | None = None  # GGUF: swtool.export.handling as recorded
    notes: list = field(default_factory=list)

    @property
    def failed(self):
        return [f for f in self.findings if f.status not in PASSING and not f.disputed]

    @property
    def verdict(self):
        """"damaged" (exit 1), "unverified" (exit 3: nothing to compare with) or "intact" (exit 0)."""
        if self.failed or self.broken:
            return "damaged"
        if not self.findings or any(f.status == "unverified" for f in self.findings):
            return "unverified"
        return "intact"

    @property
    def exit_code(self):
        return EXIT_CODES[self.verdict]

    def to_json(self):
        data = {"schema": SCHEMA_ID, **{k: v for k, v in asdict(self).items() if k != "scan"}}
        for finding, entry in zip(self.findings, data["findings"]):
            entry["present"] = finding.present
        data["verdict"] = self.verdict
        data["ok"] = self.verdict == "intact"
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
    at = target.at
    base = dict(layer=at.layer, row=at.row, col=at.col, expert=at.expert, tensor=target.tensor,
                expected=target.expected, disputed=target.disputed, note=target.note, recorded=recorded)
    if target.tensor not in checkpoint:
        return Finding(gguf_tensor=None, status="missing", **base), 0
    whole = checkpoint.tensor(target.tensor)
    gguf_name = getattr(whole, "gguf_name", None)
    info, row, col = element_of(whole, target)
    if info is None:
        base["note"] = f"outside the tensor's shape {list(whole.shape)}"
        return Finding(gguf_tensor=gguf_name, status="missing", dtype=whole.dtype, **base), 0
    value, nbytes, block = read_weight(info, row, col)
    finding = Finding(gguf_tensor=gguf_name, status="intact", value=value, dtype=info.dtype, block=block, **base)
    if not math.isfinite(value):  # NaN compares as "within tolerance" of anything: never intact
        finding.status = "not finite"
        return finding, nbytes
    if target.row_rms is not None:
        return judge_expert_row(finding, target, info, row, tolerance, nbytes)
    if target.expected is not None:
        change = _relative_change(value, target.expected)
        finding.relative_change = change
        if value == 0.0 and target.expected != 0.0:
            finding.status = "zeroed"
        elif change > tolerance:
            finding.status = "changed"
    else:  # a published coordinate: is the weight still an outlier of its row?
        finding.row_rank, finding.row_ratio, row_bytes = row_outlier(info, row, value)
        nbytes += row_bytes
        if value == 0.0:
            finding.status = "zeroed"
        elif finding.row_ratio < OUTLIER_RATIO:
            finding.status = "not outlier"
    return finding, nbytes


def judge_expert_row(finding, target, info, row, tolerance, nbytes):
    """A super expert's down_proj row: its largest weight within the tolerance of the catalog's, and so
    the RMS of its other weights (a row rescaled or overwritten elsewhere changes it): intact, zeroed or changed."""
    from swtool.checkpoint.safetensors import DTYPES
    from swtool.experts import others_rms

    weights = info.read(rows=[row])[0]
    row_bytes = getattr(info, "row_bytes", None) or weights.size * DTYPES[info.dtype][0]
    finding.super_expert, finding.expected_row_rms = True, target.row_rms
    finding.row_rms = others_rms(weights, finding.col)
    finding.relative_change = _relative_change(finding.value, target.expected)
    rms_change = _relative_change(finding.row_rms, target.row_rms)
    if not math.isfinite(finding.row_rms):
        finding.status = "not finite"
    elif finding.row_rms == 0.0 and target.row_rms != 0.0:
        finding.status, finding.note = "zeroed", "the super expert's down_proj row is all zeros"
    elif finding.value == 0.0 and target.expected != 0.0:
        finding.status = "zeroed"
    elif finding.relative_change > tolerance or rms_change > tolerance:
        finding.status = "changed"
        finding.note = f"RMS of the row's other weights {finding.row_rms:.6g}, the catalog says {target.row_rms:.6g}"
    return finding, nbytes + row_bytes


def element_of(info, target):
    """(the 2-D tensor, stored row, stored col) holding a target, or (None, None, None) if it lies outside.

    The stored index is the catalog's tensor_index when it has one, as ablate reads it ([col, row]
    for a weight stored transposed, [expert, row, col] in stacked experts); else [row, col] of the
    target's expert in a stacked tensor, or of the matrix itself."""
    at = target.at
    index = target.index or ((at.expert, at.row, at.col) if at.expert is not None and len(info.shape) == 3
                             else (at.row, at.col))
    if len(index) == 3:
        if len(info.shape) != 3 or not hasattr(info, "sub") or not 0 <= index[0] < info.shape[0]:
            return None, None, None
        info, index = info.sub(index[0]), index[1:]
    row, col = index
    if len(info.shape) != 2 or not (0 <= row < info.shape[0] and 0 <= col < info.shape[1]):
        return None, None, None
    return info, row, col


def parse_tolerance(text):
    """--tolerance: a fraction below 1 (0.05) or a percent (5%); the fraction. A bare number of 1 or
    more is refused rather than read as 100 % or more: `--tolerance 5` meant 5 %, never 500 %."""
    spelled = str(text).strip()
    percent = spelled.endswith("%")
    try:
        value = float(spelled[:-1] if percent else spelled)
    except ValueError:
        raise SwtoolError(f"--tolerance {text!r}: expected a fraction such as 0.05 or a percent such as 5%") from None
    if not math.isfinite(value) or value < 0:
        raise SwtoolError(f"--tolerance {text!r}: expected a fraction such as 0.05 or a percent such as 5%, at least 0")
    if percent:
        return value / 100
    if value >= 1:
        raise SwtoolError(f"--tolerance {text!r}: a bare number is a fraction (0.05 = 5%); "
                          f"for {value:g} percent write --tolerance {value:g}%")
    return value


def _relative_change(value, expected):
    if expected == 0.0:
        return 0.0 if value == 0.0 else float("inf")
    return abs(value - expected) / abs(expected)


# --- where the coordinates come from ---------------------------------------------

def targets_from_catalog(catalog):
    """Its super weights, then the down_proj row of each super expert (a mixture's catalog)."""
    targets = [Target(Coordinate.of(sw), sw["tensor"], expected=float(sw["value"]),
                      index=tuple(sw["tensor_index"]) if sw.get("tensor_index") else None)
               for sw in catalog["super_weights"]]
    for se in (catalog.get("super_experts") or {}).get("experts", ()):
        row = se["down_proj_row"]
        targets.append(Target(Coordinate(se["layer"], row["row"], row["col"], se["expert"]), se["tensor"],
                              expected=float(row["value"]), index=tuple(row["tensor_index"]),
                              row_rms=float(row["rms_others"]), note="super expert's down_proj row"))
    return targets


def targets_from_known(model, known_model):
    """Targets of a known entry's coordinates; one with an expert is read in that expert's down
    projection (its own tensor, or its slice of the layer's stacked experts)."""
    targets = []
    for sw in known_model.super_weights:
        note = sw.get("conflict", "") if sw.get("disputed") else ""
        at = Coordinate.of(sw)
        if at.expert is None:
            tensor = model.arch.down_proj_name(at.layer)
        elif getattr(model.arch, "moe", None) is None:
            raise SwtoolError(f"{known_model.id}'s super weights are in mixture experts (layer {at.layer} expert "
                              f"{at.expert}); this model has no experts")
        else:
            tensor = model.arch.down_proj_name(at.layer, at.expert)
        targets.append(Target(at, tensor, disputed=bool(sw.get("disputed")), note=note))
    return targets


def targets_from_metadata(model, recorded):
    """Targets from a GGUF's swtool.* metadata: HF names found through the tensors' llama.cpp names."""
    by_gguf_name = {model.checkpoint.tensor(name).gguf_name: name for name in model.checkpoint.names()}
    targets = []
    for sw in recorded:
        tensor = by_gguf_name.get(sw["gguf_tensor"])
        if tensor is None:  # asked only then: a mixture's layer has no down projection without its expert
            tensor = model.arch.down_proj_name(sw["layer"], sw.get("expert"))
        targets.append(Target(Coordinate.of(sw), tensor, expected=float(sw["value"])))
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


def by_llama_cpp_name(target, model):
    """A target in a GGUF read from its header alone: the down projection under llama.cpp's name,
    which is stored [row, col] (or [expert, row, col]) whatever the source checkpoint's layout."""
    return replace(target, tensor=model.arch.down_proj_name(target.at.layer, target.at.expert), index=None)


def scan_targets(model, prompt, progress):
    """Scan `model` (one streamed pass or a few): its super weights as targets, and the catalog."""
    from swtool.arch import gguf_readable_architectures
    from swtool.catalog import super_weights_for

    if not model.arch.runs:
        raise SwtoolError(f"{model.path}: swtool cannot run llama.cpp architecture {model.arch.model_type!r} "
                          f"(it runs {', '.join(gguf_readable_architectures())}), so it cannot scan it: "
                          f"audit it with --catalog, --known-id or --reference")

    catalog, _ = super_weights_for(model, prompt=prompt, progress=progress)
    return targets_from_catalog(catalog), catalog


# --- the audit ----------------------------------------------------------------------

def audit(spec, catalog=None, known=False, known_id=None, reference=None, tolerance=DEFAULT_TOLERANCE,
          download=False, prompt=None, progress=False):
    """Audit the super weights of MODEL `spec`; returns an AuditReport (see the module docstring)."""
    from swtool.model import load_model

    started = time.perf_counter()
    model = load_model(spec, download=download, header_only=True)
    ref_model = load_model(reference, download=download, header_only=True) if reference else None
    report = AuditReport(model=str(spec), format=getattr(model.checkpoint, "format", "safetensors"),
                    expectations="", tolerance=tolerance, reference=str(reference) if reference else None)
    recorded = recorded_super_weights(model)
    beside = [(path, found) for path, found, problem in catalogs_beside(model) if problem is None]
    targets, ablation = choose_reference(spec, model, ref_model, report, catalog, known, known_id, recorded,
                                         beside, prompt, progress)
    recorded_values = {Coordinate.of(sw): sw["value"] for sw in recorded or ()}
    reading = time.perf_counter()
    for target in targets:
        if ref_model is not None:  # the expected value is the reference's own
            expected, nbytes = value_at(ref_model.checkpoint, target)
            report.bytes_read += nbytes
            target = replace(target, expected=expected)
        finding, nbytes = judge(target if model.arch.runs else by_llama_cpp_name(target, model), model.checkpoint,
                                tolerance, recorded_values.get(target.at))
        if ref_model is not None and target.expected is None:
            finding.status, finding.note = "missing", "not in the reference"
        report.findings.append(finding)
        report.bytes_read += nbytes
    if report.self_scan:
        mark_unverified(report)
    if ablation is not None:
        mark_ablated(report, *ablation)
    if report.format == "gguf":
        judge_storage(report, model.checkpoint)
    done = time.perf_counter()
    report.read_ms, report.elapsed_ms = (done - reading) * 1000, (done - started) * 1000
    return report


def choose_reference(spec, model, ref_model, report, catalog, known, known_id, recorded, beside, prompt, progress):
    """(targets, (ablation record, its path) or None); sets report.expectations and what it used.

    First that applies: what the user named (--catalog, --known/--known-id, --reference); the
    GGUF's own swtool.* record (exact values, written with the file); the known table; a catalog
    of this model beside it; a scan of the model itself, which cannot tell damage (unverified)."""
    from swtool.catalog import read_catalog_for

    ablations = [(found, path) for path, found in beside if "ablation" in found]
    if catalog:
        chosen = read_catalog_for(catalog, model)
        report.expectations = f"catalog {catalog}"
        return targets_from_catalog(chosen), ((chosen, catalog) if "ablation" in chosen else None)
    ablation = ablations[0] if ablations else None
    if known or known_id:
        return targets_from_known_table(spec, model, report, known_id, required=True), ablation
    if ref_model is not None:
        targets, report.scan = scan_targets(ref_model, prompt, progress)
        report.expectations = "a scan of the reference"
        return targets, ablation
    if recorded:
        report.expectations = "the GGUF's swtool.* metadata"
        return targets_from_metadata(model, recorded), ablation
    targets = targets_from_known_table(spec, model, report, None, required=False)
    if targets:
        return targets, ablation
    plain = [(path, found) for path, found in beside if "ablation" not in found]
    if plain or ablations:
        path, found = plain[0] if plain else (ablation[1], ablation[0])
        report.expectations = f"the catalog beside it, {path.name}"
        return targets_from_catalog(found), ablation
    targets, report.scan = scan_targets(model, prompt, progress)
    report.expectations, report.self_scan = "a scan of the model (no reference)", True
    report.broken = broken_prompt(report.scan, model)
    return targets, ablation


def targets_from_known_table(spec, model, report, known_id, required):
    """Targets from `swtool catalog known`: the entry named, or the one the model matches by id or
    config; [] when nothing matches and the table is only being tried (`required` False)."""
    from swtool import known as known_table

    if known_id:
        match = known_table.by_id(known_id)
        if match is None:
            raise SwtoolError(f"--known-id {known_id}: not a known model (see swtool catalog known)")
        how = "named"
    else:
        try:
            found = known_table.identify(model.checkpoint.config, model_id(spec, model))
        except SwtoolError as e:
            if required:
                raise
            report.notes.append(f"known table not used: {e}")
            return []
        if found is None:
            if required:
                raise SwtoolError(f"{spec}: matches no model with published super weights, by id or by config "
                                  f"(see swtool catalog known); use --catalog, or no option to scan")
            return []
        match, how = found.model, f"matched by {found.how}"
    if match.none_found is not None:  # nothing to compare with: no verdict if named, else the next source
        words = known_table.none_found_words(match)
        if not required:
            report.notes.append(f"known table not used: {match.id} has no published super weight ({words})")
            return []
        report.known_model, report.known_none = match.id, words
        report.expectations = f"the known table's entry for {match.id} ({how}): no published super weight"
        return []
    report.known_model, report.expectations = match.id, f"the known coordinates of {match.id} ({how})"
    return targets_from_known(model, match)


def broken_prompt(scan_catalog, model):
    """{"nll", "uniform"} when the model predicts its own prompt clearly worse than a uniform guess over
    its vocabulary (mean NLL above BROKEN_MARGIN x ln(vocab)): a model that broken has lost something,
    whatever the scan found. The margin keeps an untrained model, which sits at ln(vocab) give or
    take the prompt's luck, from being called broken."""
    nll = scan_catalog["detection"].get("nll_intact")
    uniform = math.log(model.arch.vocab_size)
    if nll is not None and (not math.isfinite(nll) or nll > BROKEN_MARGIN * uniform):
        return {"nll": nll, "uniform": uniform}
    return None


def mark_unverified(report):
    """A self-scan compares each weight with itself: what it found is listed, never judged intact."""
    for finding in report.findings:
        if finding.status == "intact":
            finding.status, finding.note = "unverified", "no reference: compared with itself"


def mark_ablated(report, record, path):
    """Weights that hold what an `swtool ablate` record says it wrote there: "ablated as recorded"."""
    scale = record["ablation"].get("scale")
    written = {Coordinate.of(sw): sw["value"] for sw in record["super_weights"]}
    # ablate --drop-expert: every weight of these experts' down projections is 0
    zeroed = {(e["layer"], e["expert"]) for e in record["ablation"].get("experts_zeroed", ())}
    for finding in report.findings:
        value = written.get(Coordinate(finding.layer, finding.row, finding.col, finding.expert))
        if (finding.layer, finding.expert) in zeroed and value is None:
            value = 0.0
        if value is None or finding.value is None or not math.isfinite(finding.value):
            continue
        if _relative_change(finding.value, value) <= report.tolerance:
            finding.status = "ablated"
            finding.note = (f"ablated as recorded in {Path(path).name} "
                            + ("(expert zeroed)" if (finding.layer, finding.expert) in zeroed else f"(scale {scale:g})"))


def judge_storage(report, checkpoint):
    """GGUF: the type each super weight is stored in and the recorded handling. One kept at fewer
    than LOW_BITS bits per weight, with no protection recorded, is `unprotected`."""
    from swtool import gguf_keys

    handling = checkpoint.metadata.get(gguf_keys.HANDLING)
    report.handling = handling
    for finding in report.findings:
        if finding.tensor not in checkpoint:
            continue
        info = checkpoint.tensor(finding.tensor)
        finding.bits = 8 * info.type_size / info.block_size
        if finding.status in PASSING and finding.bits < LOW_BITS and handling in (None, "none"):
            finding.status = "unprotected"
            finding.note = (f"stored as {info.dtype} ({finding.bits:.2f} bits per weight) with "
                            f"{'handling none' if handling else 'no protection recorded'}")


def value_at(checkpoint, target):
    """(W[row, col] or None if absent, bytes read) in another checkpoint, e.g. the reference."""
    if target.tensor not in checkpoint:
        return None, 0
    info, row, col = element_of(checkpoint.tensor(target.tensor), target)
    if info is None:
        return None, 0
    value, nbytes, _ = read_weight(info, row, col)
    return value, nbytes


def format_audit(report):
    """The human table of an audit."""
    from swtool.table import format_table

    rows = sum(f.super_expert for f in report.findings)
    n = len(report.findings) - rows
    what = f"{n} super weight{'' if n == 1 else 's'}" + (f" and {plural(rows, 'super expert row')}" if rows else "")
    lines = [f"{report.model} ({report.format}): {what} from {report.expectations}"
             + (f", compared with {report.reference}" if report.reference else "")]
    lines += [f"note: {note}" for note in report.notes]
    if report.findings:
        lines.append(format_table(*_table(report)))
    elif report.known_none:
        lines.append(f"no published super weight to check ({report.known_none})")
    else:
        lines.append("no super weight to check: the scan found none")
    if report.broken:
        lines.append(f"BROKEN: the model's mean NLL on its own prompt is {report.broken['nll']:.2f}, above "
                     f"ln(vocab) = {report.broken['uniform']:.2f}: clearly worse than a uniform guess")
    if report.findings:
        counts = {}
        for f in report.findings:
            counts[f.status] = counts.get(f.status, 0) + 1
        summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
        lines.append(f"{summary}: {_verdict_words(report)} (tolerance {report.tolerance * 100:g}%); "
                     f"read {plural(report.bytes_read, 'byte')} of weights in {report.read_ms:.1f} ms "
                     f"({report.elapsed_ms:.0f} ms in all)")
    elif report.known_none:
        lines.append("no verdict: nothing published to compare with (give --catalog or --reference)")
    elif report.verdict == "unverified":
        lines.append("no verdict: nothing to compare with (give --catalog, --known-id or --reference)")
    explained = {}  # one line per reason, naming the weights it applies to
    for f in report.findings:
        if f.note and (f.disputed or f.status in ("ablated", "unprotected")):
            key = ("disputed" if f.disputed else f.status, f.note)
            explained.setdefault(key, []).append(f"[{f.layer}, {f.row}, {f.col}]")
    lines += [f"{status} {', '.join(where)}: {note}" for (status, note), where in explained.items()]
    return "\n".join(lines)


def _table(report):
    """(header, rows) of the findings: the columns that have something to show."""
    header = ["layer", "row", "col", "tensor", "dtype", "value", "expected", "change", "status"]
    recorded = any(f.recorded is not None for f in report.findings)
    published = any(f.row_ratio is not None for f in report.findings)
    gguf = report.format == "gguf"
    header += (["recorded"] if recorded else []) + (["row rank", "x row RMS"] if published else [])
    header += ["bits", "handling"] if gguf else []
    rows = []
    for f in report.findings:
        status = f.status + (" (disputed)" if f.disputed else "")
        status += " (no reference)" if f.status == "unverified" else ""
        status += " as recorded" if f.status == "ablated" else ""
        status += " (super expert row)" if f.super_expert else ""
        row = [f.layer, f.row, f.col, f.gguf_tensor or f.tensor, f.dtype or "-", _num(f.value), _num(f.expected),
               "-" if f.relative_change is None else f"{f.relative_change:.2%}", status]
        if recorded:
            row.append(_num(f.recorded))
        if published:
            row += ["-" if f.row_rank is None else f.row_rank, "-" if f.row_ratio is None else f"{f.row_ratio:.1f}"]
        if gguf:
            row += ["-" if f.bits is None else f"{f.bits:.2f}", report.handling or "not recorded"]
        rows.append(row)
    return header, rows


def _verdict_words(report):
    if report.verdict == "intact":
        # a disputed coordinate that fails is listed, but "all intact" would contradict its row
        disputed = sum(f.disputed and f.status not in PASSING for f in report.findings)
        return f"intact but for {disputed} disputed, not counted" if disputed else "all intact"
    if report.verdict == "unverified":
        return "no verdict: nothing to compare with (give --catalog, --known-id or --reference)"
    if not report.failed:
        return "the model is broken"
    statuses, n = {f.status for f in report.failed}, len(report.failed)
    if statuses == {"ablated"}:
        return "removed on purpose by swtool ablate, as recorded"
    if statuses == {"unprotected"}:
        return f"not protected: stored at fewer than {LOW_BITS:g} bits per weight"
    return f"{n} missing, damaged or unprotected" if "unprotected" in statuses else f"{n} missing or damaged"


def _num(value):
    return "-" if value is None else f"{value:.6g}"

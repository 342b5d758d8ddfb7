"""`swtool sweep`: GGUF types x super-weight handlings, each file scored in llama.cpp.

For every type and handling, `swtool export` writes the model (gguf_export.py, atomically),
llama.cpp loads the file and scores the same token windows of a text (llama_score.py),
and the file is removed again unless the files are kept (--out-dir). The result is a
table of bytes (file size, bits per weight) against perplexity, next to the source's
own perplexity from swtool's eval on the same windows, and the KL divergence of each
file's next-token distributions in llama.cpp from the source's in swtool's eval, at the
same predictions (swtool/kld.py: mean, 99th percentile, same top token, as llama.cpp's
`llama-perplexity --kl-divergence` reports them). The source's logits wait on disk in a
temporary directory (4 x vocabulary bytes per prediction) and are read a window at a time.

Handlings (--handlings, comma-separated):
  none          plain quantization (the super weights only recorded);
  keep:TYPE     the tensors holding a super weight stored in TYPE (`--sw-handling keep
                --keep-type TYPE`); `keep` alone is keep:q8_0, export's default;
  isolate       `--sw-handling isolate` (MLP channels reordered, no bytes added);
  control:TYPE  the paper's control for keep:TYPE: as many tensors that hold no super
                weight (the ffn_down of the next layer without one) stored in TYPE, so the
                same bytes are spent elsewhere (`--tensor-type`); `control` is control:q8_0.
  importance:SOURCE  the weights quantized with an importance (export_importance.py), alone
                (with none) or after one of the above and a `+`: keep+importance:scan. SOURCE:
                scan     the scan's prompt, collected in the sweep's own scan (with --catalog,
                         the catalog's prompts in one pass over the weights);
                text     --importance-text FILE, in chunks of 512 tokens as llama-imatrix;
                random   2048 random tokens (seed 0); random:N, N of them (export --importance random:N);
                self     512 tokens the model samples itself; self:N, N of them (export --importance self:N).
                Each importance is computed once and every file that names it uses it.
Handlings without importance write llama-quantize's files without --imatrix (`--importance none`),
so `none` is the stock file each importance and handling is measured against.
A keep or control whose TYPE is not more precise than the file's type would write the
same file as `none`; it is skipped and listed as such, as is isolate in a float type.
A type's files without importance after its `none` file copy from it the tensors they store
as it does (gguf_export.copy_identical_tensors) rather than quantize them again.
"""

import tempfile
import time
from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path

from swtool.errors import SwtoolError
from swtool.table import plural

DEFAULT_TYPES = "q2_k,q3_k,q4_0,q4_k,q5_k,q6_k,q8_0"
DEFAULT_HANDLINGS = "none,keep:q8_0,control:q8_0"
SCHEMA_ID = "swtool.sweep/1"  # what `swtool sweep --json` prints and -o writes: swtool/schema/sweep.schema.json
HANDLING_NAMES = ("none", "keep", "isolate", "control")
IMPORTANCE_SOURCES = ("scan", "text", "random", "self")


# --- what to write ---------------------------------------------------------------------

@dataclass(frozen=True)
class Handling:
    """One way to treat the super weights: a name and, for keep and control, the type spent."""

    name: str
    keep_type: str = None
    importance: str = None  # an IMPORTANCE_SOURCES kind, random and self with their :N, or None: no importance

    @property
    def label(self):
        handling = f"{self.name}:{self.keep_type}" if self.keep_type else self.name
        if self.importance is None:
            return handling
        return f"importance:{self.importance}" if self.name == "none" else f"{handling}+importance:{self.importance}"


def parse_types(text):
    """--types 'q2_k,q4_0,...' -> type names, each one `swtool export --type` accepts."""
    from swtool.quant.policy import parse_target

    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise SwtoolError(f"--types {text!r}: give at least one type, e.g. q4_0,q8_0")
    for name in names:
        parse_target(name)  # raises the one-line --type error naming the valid types
    if len(set(names)) != len(names):
        raise SwtoolError(f"--types {text!r}: a type is listed twice")
    return names


def parse_handlings(text):
    """--handlings 'none,keep:q8_0,control:f16' -> [Handling]."""
    from swtool.gguf_export import DEFAULT_KEEP_TYPE, KEEP_TYPES

    handlings = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        part, importance = split_importance(part)
        name, _, keep_type = part.partition(":")
        if name not in HANDLING_NAMES:
            raise SwtoolError(f"--handlings {part!r}: expected none, keep[:TYPE], isolate or control[:TYPE]")
        if name in ("keep", "control"):
            keep_type = keep_type or DEFAULT_KEEP_TYPE
            if keep_type not in KEEP_TYPES:
                raise SwtoolError(f"--handlings {part!r}: the type after {name}: is one of {', '.join(KEEP_TYPES)}")
        elif keep_type:
            raise SwtoolError(f"--handlings {part!r}: {name} takes no type")
        handlings.append(Handling(name, keep_type or None, importance))
    if not handlings:
        raise SwtoolError(f"--handlings {text!r}: give at least one, e.g. none,keep:q8_0")
    if len(set(handlings)) != len(handlings):
        raise SwtoolError(f"--handlings {text!r}: a handling is listed twice")
    return handlings


def split_importance(part):
    """'keep:q8_0+importance:scan' -> ('keep:q8_0', 'scan'); 'importance:random:256' -> ('none', 'random:256')."""
    pieces = part.split("+")
    wanted = [p for p in pieces if p.startswith("importance")]
    rest = [p for p in pieces if not p.startswith("importance")]
    if len(wanted) > 1 or len(rest) > 1 or not all(pieces):
        raise SwtoolError(f"--handlings {part!r}: one handling, optionally + one importance:SOURCE")
    if not wanted:
        return part, None
    source = wanted[0].partition(":")[2]
    if not _importance_source(source):
        raise SwtoolError(f"--handlings {part!r}: expected importance:scan, importance:text, importance:random[:N] "
                          f"or importance:self[:N] (N tokens, at least 1)")
    return (rest[0] if rest else "none"), source


def _importance_source(source):
    """True for scan, text, and random[:N] or self[:N] as export's --importance reads them (its N rule)."""
    from swtool.export_importance import parse_importance

    kind = source.partition(":")[0]
    if kind not in ("random", "self"):
        return source in IMPORTANCE_SOURCES
    try:
        parse_importance(source)
    except SwtoolError:
        return False
    return True


def same_as_none(qtype, handling):
    """True when this handling would write exactly the `none` file of this type (so it is skipped)."""
    from swtool.quant import quant_type
    from swtool.quant.policy import bits_per_weight, parse_target

    target_bits = bits_per_weight(parse_target(qtype).qtype)
    if handling.importance is not None:  # the float types and Q8_0 have no use for an importance
        from swtool.export_importance import UNWEIGHTED_TYPES

        unweighted = parse_target(qtype).qtype.name in UNWEIGHTED_TYPES
        return unweighted and (handling.name == "none" or same_as_none(qtype, replace(handling, importance=None)))
    if handling.name in ("keep", "control"):  # a keep type no more precise than the file's changes nothing
        return bits_per_weight(quant_type(handling.keep_type)) <= target_bits
    if handling.name == "isolate":  # float types have no blocks to isolate in
        return target_bits >= 16
    return False


def control_layers(super_weights, n_layers):
    """For each layer holding super weights, the nearest later layer (else earlier) holding none.

    Their ffn_down tensors get the keep type in the control: the same bytes as keep, spent
    on tensors of the same shape that hold no super weight.
    """
    holders = sorted({sw.at.layer for sw in super_weights})
    chosen = []
    for layer in holders:
        candidates = list(range(layer + 1, n_layers)) + list(range(layer - 1, -1, -1))
        free = [c for c in candidates if c not in holders and c not in chosen]
        if not free:
            raise SwtoolError("control: every layer holds a super weight; no tensor is left to spend the bytes on")
        chosen.append(free[0])
    return chosen


def export_options(qtype, handling, catalog, controls, progress, importances=None):
    """The `swtool export` options that write this type with this handling (`importances`: {source:
    export_importance.UsedImportance} made beforehand, for the handlings with importance)."""
    from swtool.gguf_export import ExportOptions

    base = dict(type=qtype, catalog=catalog, progress=progress)
    if handling.importance is None:
        base["importance"] = "none"
    else:
        base["importance_given"] = importances[handling.importance]
    if handling.name == "keep":
        return ExportOptions(handling="keep", keep_type=handling.keep_type, **base)
    if handling.name == "isolate":
        return ExportOptions(handling="isolate", **base)
    if handling.name == "control":
        layers = "|".join(str(layer) for layer in controls)
        return ExportOptions(handling="none", tensor_types=(rf"^blk\.({layers})\.ffn_down\.weight$={handling.keep_type}",),
                       **base)
    return ExportOptions(handling="none", **base)


# --- results ---------------------------------------------------------------------------

@dataclass
class Row:
    """One file of the sweep, as written and as llama.cpp scored it."""

    type: str
    handling: str
    file_bytes: int
    tensor_bytes: int  # the tensors' data, as llama.cpp's model size counts it
    parameters: int
    perplexity: float
    predictions: int
    super_weight_tensors: dict  # llama.cpp name -> the ggml type it was stored in
    control_tensors: dict  # the control's tensors -> their ggml type
    seconds: float  # export and scoring, wall time
    kld: object = None  # swtool.kld.KldStats: llama.cpp's distributions against the source's

    @property
    def bits_per_weight(self):
        return 8.0 * self.tensor_bytes / self.parameters

    def to_json(self):
        return {"type": self.type, "handling": self.handling, "file_bytes": self.file_bytes,
                "tensor_bytes": self.tensor_bytes, "parameters": self.parameters,
                "bits_per_weight": self.bits_per_weight, "perplexity": self.perplexity,
                "predictions": self.predictions, "super_weight_tensors": self.super_weight_tensors,
                "control_tensors": self.control_tensors, "seconds": self.seconds,
                "kld": self.kld.to_json() if self.kld is not None else None}


@dataclass
class Sweep:
    """Everything `swtool sweep` prints."""

    model: str
    text: str
    ctx: int
    windows: int
    threads: int
    catalog: str
    source_perplexity: float
    source_predictions: int
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (type, handling label): would be the `none` file
    out_dir: str = None
    importances: dict = field(default_factory=dict)  # source -> export_importance.UsedImportance

    def to_json(self):
        import llama_cpp

        return {"schema": SCHEMA_ID, "model": self.model, "text": self.text, "ctx": self.ctx, "windows": self.windows,
                "llama_cpp_python": llama_cpp.__version__, "threads": self.threads, "catalog": self.catalog,
                "source": {"scored_by": "swtool eval", "perplexity": self.source_perplexity,
                           "predictions": self.source_predictions},
                "rows": [row.to_json() for row in self.rows],
                "skipped_same_as_none": [{"type": t, "handling": h} for t, h in self.skipped],
                "importances": {source: {"description": used.description, "tokens": int(used.tokens),
                                         "sha256": used.sha256} for source, used in self.importances.items()},
                "out_dir": self.out_dir}


# --- the sweep -------------------------------------------------------------------------

def run_sweep(model_path, text_path, text, types, handlings, catalog=None, ctx=512, n_windows=None, out_dir=None,
              threads=1, force=False, progress=True, log=None, importance_text=None):
    """Export and score every type x handling; returns a Sweep. `log(line)` reports each file as it is done.
    `importance_text`: the text of importance:text (--importance-text)."""
    from swtool import llama_score
    from swtool.checkpoint.source import gguf_file_of, resolve_source
    from swtool.evaluate import make_chunks, perplexity
    from swtool.kld import ReferenceLogits
    from swtool.model import load_model
    from swtool.tokenizer import encode

    log = log or (lambda line: None)
    llama_score.require_llama("swtool sweep")
    if gguf_file_of(resolve_source(model_path)) is not None:
        raise SwtoolError(f"{model_path} is a GGUF file; sweep exports a Hugging Face checkpoint "
                          f"(as swtool export)")
    if ctx < 2:
        raise SwtoolError(f"--ctx must be at least 2 tokens, got {ctx}")
    if any(h.importance == "text" for h in handlings) and importance_text is None:
        raise SwtoolError("--handlings importance:text needs --importance-text FILE (a text other than --text, "
                          "or the scores measure the text the importance was taken from)")
    model = load_model(model_path)
    # 1. the token windows every file is scored on: all full windows of ctx, or the first n
    ids = encode(model.directory, text)
    available = len(ids) // ctx
    if available == 0:
        raise SwtoolError(f"{text_path}: {plural(len(ids), 'token')} do not fill one window of --ctx {ctx}")
    if n_windows is not None and n_windows > available:
        raise SwtoolError(f"--windows {n_windows}: {text_path} has {plural(len(ids), 'token')}, {plural(available, 'window')} "
                          f"of {ctx}")
    windows = llama_score.windows(ids, ctx, n_windows or available)
    flat = [t for w in windows for t in w]
    with work_directory(out_dir) as work, tempfile.TemporaryDirectory(prefix="swtool-kld-") as logits_dir:
        # 2. names of the files, refused up front if they exist (no export is wasted on it)
        plan = [(qtype, handling) for qtype in types for handling in handlings]
        stem = Path(str(model_path).rstrip("/")).name or "model"
        paths = {(q, h.label): work / f"{stem}-{q}-{h.label.replace(':', '-')}.gguf" for q, h in plan}
        if out_dir is not None:
            from swtool.atomic import check_destination, refuse_replacing_inputs

            outputs = [*paths.values(), work / f"{stem}.catalog.json"]
            refuse_replacing_inputs(outputs, (model_path, text_path, catalog))  # even with --force
            for path in paths.values() if not force else ():
                check_destination(path, force)
        # 3. the super weights: the given catalog, or a scan of the model when a handling needs them
        needs_catalog = any(h.name != "none" for h in handlings)
        scan_importance = any(h.importance == "scan" for h in handlings)
        scanned = catalog is None and (needs_catalog or scan_importance)
        from_scan = None
        if scanned:
            log(f"no --catalog: scanning {model_path} for super weights")
            path, from_scan = write_scan_catalog(model, work / f"{stem}.catalog.json", progress, scan_importance)
            catalog = str(path)
        super_weights = catalog_super_weights(catalog, model.arch.n_layers) if catalog else []
        if needs_catalog and not super_weights:
            raise SwtoolError(f"{catalog}: lists no super weights, so only --handlings none has anything to compare")
        controls = control_layers(super_weights, model.arch.n_layers) if super_weights else []
        importances = sweep_importances(model, handlings, catalog, from_scan, importance_text, log)
        # 4. the source scored by swtool's own eval on the same windows, its logits kept for the KL divergence
        source_logits = ReferenceLogits(make_chunks(flat, ctx), model.arch.vocab_size, logits_dir)
        source_ppl, source_count = perplexity(model, flat, ctx=ctx, progress=progress,
                                              logits_sink=source_logits.store)
        log(f"source (swtool eval): perplexity {source_ppl:.4f} over {plural(source_count, 'prediction')}")
        catalog_label = f"{catalog} (scanned)" if scanned and out_dir is not None else (
            "scanned, not kept" if scanned else catalog)
        result = Sweep(str(model_path), str(text_path), ctx, len(windows), threads, catalog_label,
                       source_ppl, source_count,
                       out_dir=str(out_dir) if out_dir is not None else None, importances=importances)
        # 5. each type and handling: export, load in llama.cpp, score, and remove unless kept
        todo = [(q, h) for q, h in plan if not (h.name != "none" and same_as_none(q, h))]
        result.skipped = [(q, h.label) for q, h in plan if (q, h) not in todo]
        holders = {sw.tensor for sw in super_weights}
        control_names = {f"blk.{layer}.ffn_down.weight" for layer in controls}
        plain = {}  # type -> its `none` file, whose tensors the type's keep, control and isolate files copy
        for number, (qtype, handling) in enumerate(todo, 1):
            start = time.time()
            path = paths[(qtype, handling.label)]
            options = export_options(qtype, handling, catalog, controls, progress, importances)
            if handling.importance is None and qtype in plain:
                options = replace(options, same_bytes_as=str(plain[qtype]))
            row = score_file(model_path, path, options, windows, ctx, threads, holders,
                             control_names if handling.name == "control" else set(),
                             lambda i: source_logits.rows(i, range(ctx - 1)))
            row.handling, row.seconds = handling.label, round(time.time() - start, 1)
            if handling == Handling("none"):
                plain[qtype] = path
            if out_dir is None:  # at most two temporary files on disk: this type's `none` and the last one
                remove_unneeded(path, plain, qtype, todo[number:])
            result.rows.append(row)
            log(f"[{number}/{len(todo)}] {qtype} {handling.label}: {row.file_bytes / 1e6:.2f} MB, "
                f"{row.bits_per_weight:.3f} bits/weight, perplexity {row.perplexity:.4f}, "
                f"KLD {row.kld.mean:.4g} ({row.seconds:.0f} s)")
    return result


def score_file(model_path, path, options, windows, ctx, threads, holders, control_names, reference=None):
    """Export one file and score it in llama.cpp; a Row, its handling label and time still to fill in.
    `reference(i)`: the source's logits at window i's predictions, for the KL divergence."""
    from swtool import llama_score
    from swtool.gguf_export import export

    report = export(model_path, path, options)
    llm = llama_score.load(path, ctx, threads)
    try:
        ppl, count, kld = llama_score.score(llm, windows, reference)
    finally:
        llama_score.close(llm)
    stored = {t.name: t.qtype.name for t in report.tensors}
    return Row(type=options.type, handling=None, file_bytes=report.file_size,
               tensor_bytes=sum(t.nbytes for t in report.tensors),
               parameters=sum(prod(t.shape) for t in report.tensors),
               perplexity=ppl, predictions=count,
               super_weight_tensors={name: stored[name] for name in sorted(holders)},
               control_tensors={name: stored[name] for name in sorted(control_names)}, seconds=None, kld=kld)


def remove_unneeded(path, plain, qtype, rest):
    """Remove the file just scored, and this type's `none` file once no file of the type is left to write."""
    if path != plain.get(qtype):
        path.unlink()
    if qtype in plain and not any(q == qtype for q, _ in rest):
        plain.pop(qtype).unlink()


class work_directory:
    """The directory the files go to: --out-dir (made if missing, kept), or a temporary one
    removed at the end, also on an error, Ctrl-C or SIGTERM (they unwind as exceptions)."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.temporary = None

    def __enter__(self):
        if self.out_dir is not None:
            path = Path(self.out_dir)
            if path.exists() and not path.is_dir():
                raise SwtoolError(f"--out-dir {path}: exists and is not a directory")
            if not path.absolute().parent.is_dir():
                raise SwtoolError(f"--out-dir {path}: {path.absolute().parent} is not a directory")
            path.mkdir(exist_ok=True)
            return path
        self.temporary = tempfile.TemporaryDirectory(prefix="swtool-sweep-")
        return Path(self.temporary.name)

    def __exit__(self, *exc):
        if self.temporary is not None:
            self.temporary.cleanup()
        return False


def write_scan_catalog(model, path, progress, collect_importance=False):
    """`swtool scan MODEL` with its defaults, written to `path` (the catalog the exports read): (path, the
    importance of the scan's prompt collected in its pass (export_importance.UsedImportance) or None)."""
    from swtool import export_importance
    from swtool.catalog import scan_catalog, write_catalog

    collector = export_importance.scan_collector(model) if collect_importance else None
    catalog, _ = scan_catalog(model, progress=progress, linear_observer=collector)
    write_catalog(catalog, path)
    if collector is None:
        return path, None
    tokens = [p["tokens"] for p in catalog["detection"]["prompts"]]
    return path, export_importance.from_scan(collector, tokens, catalog["detection"]["prompt"])


def sweep_importances(model, handlings, catalog, from_scan, text_path, log):
    """{source: export_importance.UsedImportance} of every importance the handlings name, each made once:
    scan, the sweep's scan's (`from_scan`) or the catalog's prompts; text, `text_path`; random tokens;
    self-generated tokens."""
    from swtool import export_importance as ei
    from swtool.gguf_export import catalog_prompts, importance_of_prompts

    made = {}
    named = {h.importance for h in handlings if h.importance is not None}
    for source in sorted(named, key=lambda s: (IMPORTANCE_SOURCES.index(s.partition(":")[0]), s)):
        if source == "scan":
            made[source] = from_scan or importance_of_prompts(model, "catalog", catalog_prompts(catalog), [])
        elif source == "text":
            made[source] = ei.computed(ei.ImportanceSpec("text", str(text_path)), model)
        else:  # random[:N] or self[:N], as export's --importance reads them
            made[source] = ei.computed(ei.parse_importance(source), model)
        log(f"importance:{source}: {made[source].description}")
    return made


def catalog_super_weights(catalog, n_layers):
    """The catalog's super weights as export reads them (layer, llama.cpp tensor name)."""
    from swtool.gguf_export import super_weights_from_catalog

    found, _ = super_weights_from_catalog(catalog, n_layers, {})
    return found


# --- the table -------------------------------------------------------------------------

def format_sweep(result):
    """The human table: one row per file, bytes against perplexity, and the change against `none`."""
    from swtool.table import format_table, plural

    lines = [f"{result.model}: {result.text}, {plural(result.windows, 'window')} of {plural(result.ctx, 'token')} "
             f"({plural(result.source_predictions, 'prediction')}), each GGUF scored in llama.cpp "
             f"({plural(result.threads, 'thread')})"]
    plain = {row.type: row for row in result.rows if row.handling == "none"}
    header = ["type", "super weights", "stored as", "MB", "bits/weight", "+MB", "perplexity", "vs none",
              "vs source", "KLD", "KLD 99%", "same top"]
    rows = [["source", "swtool eval", "", "", "", "", f"{result.source_perplexity:.4f}", "", "", "", "", ""]]
    for row in result.rows:
        base = plain.get(row.type)
        extra = f"{(row.file_bytes - base.file_bytes) / 1e6:+.2f}" if base and base is not row else ""
        change = f"{100 * (row.perplexity / base.perplexity - 1):+.1f} %" if base and base is not row else ""
        stored = "/".join(sorted(set(row.super_weight_tensors.values()))) or "-"
        if row.control_tensors:
            stored += " (control: " + "/".join(sorted(set(row.control_tensors.values()))) + ")"
        rows.append([row.type, row.handling, stored, f"{row.file_bytes / 1e6:.2f}", f"{row.bits_per_weight:.3f}",
                     extra, f"{row.perplexity:.4f}", change,
                     f"{100 * (row.perplexity / result.source_perplexity - 1):+.1f} %"] + kld_cells(row.kld))
    lines.append(format_table(header, rows))
    lines.append("stored as: the type of the tensors that hold super weights; MB: the file's size (+MB against "
                 "none); bits/weight: the tensors' bytes x 8 / parameters, as llama.cpp counts them")
    lines.append("KLD: KL divergence of llama.cpp's next-token distributions from the source's, per prediction "
                 "(nats), mean and 99th percentile; same top: predictions whose most likely token is the source's")
    if result.skipped:
        lines.append("skipped, the same file as none: " + ", ".join(f"{t} {h}" for t, h in result.skipped))
    if result.out_dir:
        lines.append(f"files kept in {result.out_dir}")
    return "\n".join(lines)


def kld_cells(kld):
    """The table's KLD, KLD 99% and same top cells of one row (blank without a KLD)."""
    if kld is None:
        return ["", "", ""]
    return [f"{kld.mean:.4g}", f"{kld.p99:.4g}", f"{100 * kld.same_top:.2f} %"]

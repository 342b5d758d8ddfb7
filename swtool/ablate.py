"""Ablated copies of a checkpoint: chosen super weights multiplied by a scale, no other byte changed.

    swtool ablate MODEL --catalog C -o OUTDIR [--scale 0] [--only L:ROW:COL ...]

  - each patched element is overwritten in place in a copy of its shard, at its
    byte offset (TensorInfo.element_offset), in its stored dtype: the new value
    is the stored value times the scale, rounded to bf16/f16 as torch rounds;
  - every other file of MODEL's directory (shards without a patched element,
    index, config, tokenizer) is hard-linked into OUTDIR, or copied byte for byte
    where a link is impossible or --copy asks for it;
  - OUTDIR is built under a temporary name beside it and renamed at the end, so
    it is either complete or absent; MODEL is only read;
  - OUTDIR/swtool-ablation.json is the catalog of what changed: the input
    catalog's patched super weights (`value` = the new stored value) and an
    `ablation` record of every element's file, byte offset, old and new bytes.

    swtool ablate MODEL --catalog C --in-place [--scale 0] [--only ...]
    swtool ablate MODEL --restore

--in-place first writes MODEL/swtool-ablation-journal.json (the original bytes),
then replaces each affected shard by a patched copy renamed over it (atomic per
shard; hard links to the old file keep the old bytes). --restore puts the
journalled bytes back the same way and deletes the journal.

    swtool ablate MODEL --catalog C --drop-expert L:E -o OUTDIR   (mixtures; repeatable)

zeroes expert E's whole down projection in layer L (its bytes, a contiguous run in the
shard), instead of the super weights (--only adds chosen ones back). The expert then adds
nothing where a token is routed to it, but the router still picks it: this is not the
removal `eval --drop-expert` and scan's verification make (the router never picks the expert
and weighs the others as the model does), and for a router that divides the top-k weights by
their sum the two differ (docs/detection.md measures it).
"""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swtool.atomic import (atomic_path, is_leftover_temporary, ensure_free_space, full_disk_error, is_full_disk,
                           move_directory_into_place, write_text_atomic)
from swtool.checkpoint.safetensors import FLOAT_DTYPES, decode_float32, encode_float32, DTYPES
from swtool.coordinate import Coordinate
from swtool.errors import SwtoolError
from swtool.jsonfile import read_json

CATALOG_NAME = "swtool-ablation.json"
JOURNAL_NAME = "swtool-ablation-journal.json"
JOURNAL_SCHEMA = "swtool.ablation-journal/1"
SCHEMA_ID = "swtool.ablate/1"  # what `swtool ablate --json` prints: swtool/schema/ablate.schema.json
VALUE_RTOL = 1e-2  # a catalog value may come from another float dtype of the same model


@dataclass
class Patch:
    """One element to overwrite: where its bytes are and what they become."""

    super_weight: dict  # the catalog entry
    file: Path
    offset: int  # absolute byte offset in `file`
    dtype: str
    old: bytes
    new: bytes

    def to_json(self):
        sw = self.super_weight
        return {"layer": sw["layer"], "row": sw["row"], "col": sw["col"], "expert": sw.get("expert"),
                "tensor": sw["tensor"], "file": self.file.name, "offset": self.offset, "dtype": self.dtype,
                "old_bytes": self.old.hex(), "new_bytes": self.new.hex(),
                "old_value": decode_bytes(self.old, self.dtype), "new_value": decode_bytes(self.new, self.dtype)}


@dataclass
class ExpertPatch:
    """A mixture expert's whole down projection zeroed: one contiguous run of bytes (a per-expert tensor,
    or slice `expert` of a stacked one), so the expert adds nothing wherever the router sends a token."""

    layer: int
    expert: int
    tensor: str
    file: Path
    offset: int  # absolute byte offset of the matrix's first element in `file`
    dtype: str
    old: bytes

    @property
    def new(self):
        return bytes(len(self.old))  # +0.0 is all zero bits in F32, F16 and BF16

    def to_json(self, with_bytes=False):
        """What --json and the ablation record say; the journal (`with_bytes`) also keeps the old bytes."""
        import hashlib

        entry = {"layer": self.layer, "expert": self.expert, "tensor": self.tensor, "file": self.file.name,
                 "offset": self.offset, "nbytes": len(self.old), "dtype": self.dtype,
                 "old_sha256": hashlib.sha256(self.old).hexdigest()}
        return {**entry, "old_bytes": self.old.hex()} if with_bytes else entry


def plan_expert_patches(model, experts):
    """[ExpertPatch] zeroing the down projection of each (layer, expert), checked as eval --drop-expert checks."""
    from swtool.detect import down_proj_matrix
    from swtool.experts import drop_expert_edits

    patches = []
    for drop in drop_expert_edits(model, experts):
        matrix = down_proj_matrix(model, drop.layer, drop.expert)
        if matrix.dtype not in FLOAT_DTYPES:
            raise SwtoolError(f"{matrix.path}: {matrix.name} is {matrix.dtype}; swtool patches {', '.join(FLOAT_DTYPES)}")
        old = read_element(matrix.path, matrix.offset, matrix.nbytes)
        patches.append(ExpertPatch(drop.layer, drop.expert, matrix.name, matrix.path, matrix.offset, matrix.dtype, old))
    return patches


class CatalogMismatch(SwtoolError):
    """A catalog entry this checkpoint does not hold (another model's catalog, an ablated copy ...);
    the CLI names the catalog file in front of the message."""


def coordinate(sw):
    """How messages name a catalog entry: L:ROW:COL (and its expert)."""
    return str(Coordinate.of(sw))


def decode_bytes(raw, dtype):
    """The float value of one stored element."""
    stored = np.frombuffer(raw, dtype=DTYPES[dtype][1])
    return float(decode_float32(stored, dtype)[0])


def read_element(path, offset, itemsize):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(itemsize)


def locate(checkpoint, sw):
    """(TensorInfo, stored index) of a catalog super weight, checked against this checkpoint.

    The stored index is the catalog's `tensor_index` when present ([col, row] for a
    weight stored transposed, [expert, row, col] in a stacked-experts tensor),
    else [row, col]. The element must hold the catalog's value: a catalog of
    another model, or of an already ablated copy, is refused.
    """
    name = sw["tensor"]
    if name not in checkpoint:
        raise CatalogMismatch(f"catalog super weight {coordinate(sw)}: tensor {name!r} is not in {checkpoint.directory}")
    info = checkpoint.tensor(name)
    index = sw.get("tensor_index")
    if index is None:
        index = [sw["expert"], sw["row"], sw["col"]] if sw.get("expert") is not None else [sw["row"], sw["col"]]
    if len(index) != len(info.shape) or any(i >= n for i, n in zip(index, info.shape)):
        raise CatalogMismatch(f"catalog super weight {coordinate(sw)}: index {list(index)} is outside "
                          f"{name} of shape {list(info.shape)}")
    if info.dtype not in FLOAT_DTYPES:
        raise SwtoolError(f"{info.path}: {name} is {info.dtype}; swtool patches {', '.join(FLOAT_DTYPES)}")
    stored = decode_bytes(read_element(info.path, info.element_offset(tuple(index)), info.itemsize), info.dtype)
    if not np.isclose(stored, sw["value"], rtol=VALUE_RTOL, atol=1e-6):
        raise CatalogMismatch(f"catalog super weight {coordinate(sw)}: {name}{list(index)} holds {stored:.6g} in "
                          f"{info.path}, the catalog says {sw['value']:.6g} (a catalog of another model, "
                          f"or an already ablated one?)")
    return info, tuple(index)


def select(super_weights, only):
    """The catalog entries to patch: all, or those at the --only Coordinates (LAYER:ROW:COL, any expert)."""
    if not super_weights:
        raise SwtoolError("the catalog lists no super weights")
    if not only:
        return list(super_weights)
    chosen = []
    for wanted in only:
        here = [sw for sw in super_weights if Coordinate.of(sw).dense == wanted.dense]
        if not here:
            listed = ", ".join(coordinate(sw) for sw in super_weights)
            raise SwtoolError(f"--only {wanted} is not in the catalog (it lists {listed})")
        chosen += here
    return chosen


def plan_patches(checkpoint, super_weights, scale):
    """[Patch] for multiplying each super weight by `scale`."""
    if not np.isfinite(scale):
        raise SwtoolError(f"--scale must be a finite number, got {scale}")
    patches = []
    for sw in super_weights:
        info, index = locate(checkpoint, sw)
        offset = info.element_offset(index)
        old = read_element(info.path, offset, info.itemsize)
        new_value = np.float32(decode_bytes(old, info.dtype)) * np.float32(scale)
        new_value = new_value if new_value != 0 else np.float32(0.0)  # +0.0, not -0.0 from a negative weight
        new = encode_float32(np.array([new_value], dtype=np.float32), info.dtype).tobytes()
        patches.append(Patch(sw, info.path, offset, info.dtype, old, new))
    return patches


def write_bytes_at(path, edits):
    """Overwrite (offset, bytes) pairs in an existing file, then flush it to disk."""
    with open(path, "r+b") as f:
        for offset, raw in edits:
            f.seek(offset)
            f.write(raw)
        f.flush()
        os.fsync(f.fileno())


def ablated_copy(checkpoint, catalog, patches, scale, out_dir, copy=False, force=False, expert_patches=()):
    """Write OUTDIR (see the module docstring); returns {"linked": [...], "copied": [...], "patched": [...]}.

    `force` replaces an existing OUTDIR, but only one an earlier ablate wrote (it holds
    swtool-ablation.json) and that does not contain MODEL.
    """
    source_dir = checkpoint.directory
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise SwtoolError(f"{out_dir}: already exists; pass --force to replace an earlier ablate output")
        if out_dir.is_symlink() or not (out_dir / CATALOG_NAME).is_file():
            raise SwtoolError(f"{out_dir}: not an earlier 'swtool ablate -o' output (no {CATALOG_NAME}); "
                              f"--force replaces only those")
        if source_dir.resolve().is_relative_to(out_dir.resolve()):
            raise SwtoolError(f"{out_dir}: holds the input model {source_dir}; choose another place")
    if out_dir.resolve().is_relative_to(source_dir.resolve()):
        raise SwtoolError(f"{out_dir}: inside the input model's directory {source_dir}; choose another place")
    if (source_dir / JOURNAL_NAME).exists():
        raise SwtoolError(f"{source_dir}: was ablated in place ({JOURNAL_NAME}); run `swtool ablate "
                          f"{source_dir} --restore` first")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    by_file = {}
    for patch in [*patches, *expert_patches]:
        by_file.setdefault(patch.file.name, []).append(patch)
    ensure_free_space(out_dir, _bytes_to_copy(source_dir, out_dir.parent, set(by_file), copy))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    done = {"linked": [], "copied": [], "patched": []}
    try:
        for source in sorted(p for p in source_dir.iterdir() if p.is_file() and not is_leftover_temporary(p)):
            target = tmp / source.name
            if source.name in by_file:
                shutil.copy(source, target)  # a new file (bytes and mode): the input's bytes are never written
                write_bytes_at(target, [(p.offset, p.new) for p in by_file[source.name]])
                done["patched"].append(source.name)
            elif not copy and _try_link(source, target):
                done["linked"].append(source.name)
            else:
                shutil.copy(source, target)
                done["copied"].append(source.name)
        record = changes_catalog(catalog, patches, scale, source_dir, out_dir, tmp, expert_patches)
        write_text_atomic(tmp / CATALOG_NAME, json.dumps(record, indent=2) + "\n")
        # mkdtemp/mkstemp made these owner-only; give them the modes a plain mkdir/open would
        os.chmod(tmp / CATALOG_NAME, 0o666 & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())
        move_directory_into_place(tmp, out_dir, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_full_disk(e):
            raise full_disk_error(out_dir, e) from e
        raise
    return done


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _bytes_to_copy(source_dir, out_parent, patched, copy):
    """What an ablated copy writes: the patched shards, plus every other file unless they can be hard-linked."""
    same_device = source_dir.stat().st_dev == out_parent.stat().st_dev
    return sum(p.stat().st_size for p in source_dir.iterdir()
               if p.is_file() and not is_leftover_temporary(p) and (p.name in patched or copy or not same_device))


def _try_link(source, target):
    try:
        os.link(source, target)  # follows a symlinked source (Hugging Face cache snapshots) to its file
        return True
    except OSError:
        return False  # another file system, or links not allowed: copy instead


def changes_catalog(catalog, patches, scale, source_dir, out_dir, written_dir, expert_patches=()):
    """The input catalog narrowed to the patched super weights, describing the files in out_dir
    (and, after --drop-expert, `ablation.experts_zeroed`)."""
    record = json.loads(json.dumps(catalog))  # a deep copy
    record["model"]["path"] = str(out_dir)
    record["model"]["files"] = [{"name": entry["name"], "size": (written_dir / entry["name"]).stat().st_size}
                                for entry in catalog["model"]["files"] if (written_dir / entry["name"]).is_file()]
    changed = []
    for patch in patches:
        sw = dict(patch.super_weight)
        sw["value"] = decode_bytes(patch.new, patch.dtype)  # what the files beside this catalog hold
        changed.append(sw)
    record["super_weights"] = changed
    record["ablation"] = {"source": str(source_dir), "scale": scale, "changes": [p.to_json() for p in patches]}
    if expert_patches:
        record["ablation"]["experts_zeroed"] = [p.to_json() for p in expert_patches]
    from swtool.catalog import validate

    validate(record, str(out_dir / CATALOG_NAME))
    return record


def ablate_in_place(checkpoint, patches, scale, catalog_path, expert_patches=()):
    """Journal the original bytes, then patch each affected shard atomically."""
    journal_path = checkpoint.directory / JOURNAL_NAME
    if journal_path.exists():
        raise SwtoolError(f"{checkpoint.directory}: already ablated in place ({JOURNAL_NAME}); "
                          f"run `swtool ablate {checkpoint.directory} --restore` first")
    journal = {"schema": JOURNAL_SCHEMA, "catalog": str(catalog_path), "scale": scale,
               "changes": [p.to_json() for p in patches]}
    if expert_patches:  # the whole matrices' old bytes: what --restore writes back
        journal["experts_zeroed"] = [p.to_json(with_bytes=True) for p in expert_patches]
    write_text_atomic(journal_path, json.dumps(journal, indent=2) + "\n")  # first: a crash leaves it restorable
    everything = [*patches, *expert_patches]
    for name, edits in _by_file([(p.file.name, p.offset, p.new) for p in everything]).items():
        replace_patched(checkpoint.directory / name, edits)
    return journal


def restore_in_place(directory):
    """Undo `ablate --in-place` from its journal; returns the journal."""
    directory = Path(directory)
    journal_path = (directory if directory.is_dir() else directory.parent) / JOURNAL_NAME
    if not journal_path.is_file():
        raise SwtoolError(f"{journal_path.parent}: no {JOURNAL_NAME}; nothing was ablated in place here")
    journal = read_json(journal_path)  # depth, duplicate keys, size: a one-line error
    try:
        changes = journal["changes"]
        assert journal["schema"] == JOURNAL_SCHEMA
        edits = [journalled_edit(journal_path, change) for change in changes]
        edits += [journalled_edit(journal_path, change, whole_matrix=True)
                  for change in journal.get("experts_zeroed", ())]
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError):
        raise SwtoolError(f"{journal_path}: not a valid swtool ablation journal") from None
    pending = []
    for file, offset, old, new in edits:
        current = read_element(file, offset, len(old))
        if current == new:
            pending.append((file.name, offset, old))
        elif current != old:  # already restored bytes are fine (a crash between shards)
            shown = (f"holds {current.hex()}, neither the ablated {new.hex()} nor the original {old.hex()}"
                     if len(old) <= 8 else f"(an expert's {len(old)} bytes) holds neither the zeros written nor the original")
            raise SwtoolError(f"{file}: byte {offset} {shown}; changed since the ablation, not restoring")
    for name, file_edits in _by_file(pending).items():
        replace_patched(journal_path.parent / name, file_edits)
    for file in {edit[0] for edit in edits}:  # an --in-place run killed by SIGKILL leaves its copy behind
        for leftover in file.parent.glob(f".{file.name}.*.tmp"):
            if is_leftover_temporary(leftover):
                leftover.unlink()
    journal_path.unlink()
    return journal


def journalled_edit(journal_path, change, whole_matrix=False):
    """(file, offset, old bytes, new bytes) of one journal entry, checked as hostile input: the file
    is a .safetensors shard beside the journal, and the bytes are one whole element of its
    tensor `change["tensor"]` (`whole_matrix`: an expert's down projection, a run of whole elements
    inside that tensor, zeroed). A journal can then never make --restore write anywhere else."""
    from swtool.checkpoint.safetensors import SafetensorsFile

    name, offset = change["file"], change["offset"]
    old = bytes.fromhex(change["old_bytes"])
    new = bytes(len(old)) if whole_matrix else bytes.fromhex(change["new_bytes"])
    if Path(name).name != name or not name.endswith(".safetensors"):
        raise SwtoolError(f"{journal_path}: names {name!r}, which is not a shard beside it; not restoring")
    file = journal_path.parent / name
    info = SafetensorsFile(file).tensors.get(change["tensor"])
    size_ok = (0 < len(old) <= info.nbytes and len(old) % info.itemsize == 0) if whole_matrix and info else (
        info is not None and len(old) == info.itemsize)
    if (info is None or type(offset) is not int or len(old) != len(new) or not size_ok
            or not info.offset <= offset <= info.offset + info.nbytes - len(old)
            or (offset - info.offset) % info.itemsize):
        raise SwtoolError(f"{journal_path}: the change at byte {offset} of {name} is not one element of a "
                          f"tensor there; not restoring")
    if change["dtype"] != info.dtype or not journalled_bytes_agree(change, old, whole_matrix):
        raise SwtoolError(f"{journal_path}: the original bytes of the change at byte {offset} of {name} disagree "
                          f"with the value recorded beside them; not restoring")
    return file, offset, old, new


def journalled_bytes_agree(change, old, whole_matrix):
    """Whether a journal entry's original bytes are what the entry also records of them (an element's
    value, an expert's sha256): restoring writes those bytes, so an entry damaged since the ablation
    must be refused, not written into the model."""
    import hashlib

    if whole_matrix:
        return hashlib.sha256(old).hexdigest() == change["old_sha256"]
    value, recorded = decode_bytes(old, change["dtype"]), change["old_value"]
    if not isinstance(recorded, (int, float)) or isinstance(recorded, bool):
        return False
    return value == recorded or (np.isnan(value) and np.isnan(recorded))


def _by_file(edits):
    grouped = {}
    for name, offset, raw in edits:
        grouped.setdefault(name, []).append((offset, raw))
    return grouped


def replace_patched(path, edits):
    """Replace `path` by a patched copy renamed over it: readers see the old file or the new one."""
    with atomic_path(path, nbytes=path.stat().st_size) as tmp:  # the copy sits beside the original until the rename
        shutil.copy2(path, tmp)  # bytes, mode and times
        write_bytes_at(tmp, edits)


def describe_ablation(model, catalog, scale, patches, output=None, files=None, expert_patches=()):
    """What `swtool ablate --json` prints after -o OUTDIR (`files`: ablated_copy's linked/copied/patched)
    or --in-place (output None)."""
    result = {"schema": SCHEMA_ID, "action": "copy" if output else "in-place", "model": str(model),
              "catalog": str(catalog), "scale": scale, "output": str(output) if output else None, "files": files,
              "patches": [p.to_json() for p in patches]}
    if expert_patches:
        result["experts_zeroed"] = [p.to_json() for p in expert_patches]
    return result


def describe_restore(model, journal):
    """What `swtool ablate --restore --json` prints: the journal's ablation, now undone."""
    result = {"schema": SCHEMA_ID, "action": "restore", "model": str(model), "catalog": journal.get("catalog"),
              "scale": journal.get("scale"), "output": None, "files": None, "patches": journal["changes"]}
    if journal.get("experts_zeroed"):  # without their old bytes (a whole matrix each): the journal had them
        result["experts_zeroed"] = [{k: v for k, v in e.items() if k != "old_bytes"} for e in journal["experts_zeroed"]]
    return result


def format_patches(patches):
    """The human table of what ablate changed."""
    from swtool.table import format_table

    rows = []
    for p in patches:
        j = p.to_json()
        rows.append([j["layer"], j["row"], j["col"], j["tensor"], j["file"], j["offset"], j["dtype"],
                     f"{j['old_value']:.6g}", f"{j['new_value']:.6g}", f"{j['old_bytes']}->{j['new_bytes']}"])
    return format_table(["layer", "row", "col", "tensor", "file", "byte offset", "dtype", "old", "new", "bytes"], rows)


def format_expert_patches(patches):
    """The human table of the experts whose down projection ablate zeroed."""
    from swtool.table import format_table

    rows = [[p.layer, p.expert, p.tensor, p.file.name, p.offset, len(p.old), p.dtype] for p in patches]
    return format_table(["layer", "expert", "down projection zeroed", "file", "byte offset", "bytes", "dtype"], rows)

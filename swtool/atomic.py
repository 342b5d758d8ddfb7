"""Write outputs under a temporary name and rename them into place at the end.

A reader of the destination sees either the old file or the complete new one,
never a half-written file, even if swtool is interrupted:

  - `atomic_path(dest)` / `atomic_directory(dest)` build the output as a hidden
    `.NAME.XXXX.tmp` in the destination's own directory (so the final rename
    never crosses a file system), rename it to NAME on success, and remove it on
    any exception, KeyboardInterrupt and SystemExit included;
  - `install_signal_handlers()` (the CLI calls it) turns SIGTERM and SIGHUP into a
    `Terminated` exception, as Python already turns SIGINT into KeyboardInterrupt,
    so that same clean-up runs when a run is killed;
  - `check_destination(dest, force)` refuses to replace an existing output
    unless --force, before any work is done; `refuse_replacing_inputs` refuses, --force
    or not, an output that is a file the command reads;
  - `ensure_free_space(dest, nbytes)` refuses a large write that cannot fit;
    a disk that fills up anyway (ENOSPC, EFBIG from a file-size limit, EDQUOT)
    becomes a one-line SwtoolError naming the output, and the partial file is removed.

SIGKILL cannot be caught: it can leave a `.NAME.XXXX.tmp` behind, never a partial NAME.
"""

import contextlib
import errno
import os
import shutil
import signal
import tempfile
from pathlib import Path

from swtool.errors import SwtoolError

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
SPACE_MARGIN = 16 << 20  # keep this much free beyond the output itself: metadata, other writers


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like KeyboardInterrupt, so temporaries are removed."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def install_signal_handlers():
    """SIGTERM/SIGHUP -> Terminated (SIGINT already raises KeyboardInterrupt). Main thread only."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.SIG_DFL, None):  # leave a handler someone else set alone
            signal.signal(signum, _raise_terminated)


_NEW_FILES = set()  # outputs that did not exist when checked, without --force: claimed, never replaced


def check_destination(dest, force=False, kind="file"):
    """Refuse an output path that exists (unless `force`), is the wrong kind, or has no parent directory."""
    dest = Path(dest)
    parent = dest.absolute().parent
    if not parent.is_dir():
        raise SwtoolError(f"{dest}: cannot write there: {parent} is not a directory")
    if not (dest.exists() or dest.is_symlink()):
        if not force:
            _NEW_FILES.add(dest.absolute())  # atomic_path will claim the name, never replace it
        return
    _NEW_FILES.discard(dest.absolute())
    if kind == "file" and dest.is_dir():
        raise SwtoolError(f"{dest}: is a directory; give a file name")
    if kind == "directory" and not dest.is_dir():
        raise SwtoolError(f"{dest}: exists and is not a directory")
    if not force:
        raise SwtoolError(f"{dest}: already exists; pass --force to replace it")


def files_read(*inputs):
    """The regular files behind command-line inputs: a file itself, a directory's files (a model
    directory: weights, config, index, tokenizer). Names that are not local paths (Hub ids) give none."""
    found = []
    for given in inputs:
        if not given:
            continue
        path = Path(given)
        if path.is_dir():
            found += [child for child in path.iterdir() if child.is_file()]
        elif path.is_file():
            found.append(path)
    return found


def refuse_replacing_inputs(outputs, inputs):
    """An output that is one of the inputs' files (also through a symlink or a hard link) or is given
    twice: a one-line error, --force or not. Writing it would destroy what the command reads."""
    outputs = [Path(out) for out in outputs if out]
    sources = files_read(*inputs)
    for i, out in enumerate(outputs):
        for other in outputs[:i]:
            if out.absolute() == other.absolute() or _same_file(out, other):
                raise SwtoolError(f"{out}: given for two outputs; name each output differently")
        for source in sources:
            if _same_file(out, source):
                raise SwtoolError(f"{out}: is {source}, a file this command reads; it is never replaced, "
                                  f"even with --force")


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: not the same file
        return False


def is_leftover_temporary(path):
    """Is `path` a `.NAME.XXXXXXXX.tmp` that atomic_path left behind (a run killed by SIGKILL)? Never a
    model's file: ablate -o does not copy them, --restore removes those of the shards it restores."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def ensure_free_space(dest, nbytes, margin=SPACE_MARGIN):
    """A clear error, before writing, if `nbytes` for `dest` do not fit in its file system's free space."""
    parent = Path(dest).absolute().parent
    free = shutil.disk_usage(parent).free
    if nbytes + margin > free:
        raise SwtoolError(f"{dest}: needs {human_bytes(nbytes)}, but only {human_bytes(free)} "
                          f"is free in {parent}; nothing was written")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_full_disk(error):
    """Did a write run out of space? ENOSPC / EFBIG / EDQUOT, or NumPy's tofile() reporting a short
    write ("N requested and M written", with no errno)."""
    if not isinstance(error, OSError):
        return False
    return error.errno in FULL_DISK_ERRNOS or (error.errno is None and "written" in str(error))


def full_disk_error(dest, error):
    """The one-line error for a write that ran out of space (or hit a file-size limit)."""
    reason = error.strerror or f"short write ({error})"
    return SwtoolError(f"{dest}: writing failed: {reason}; the disk is full or a file-size limit was hit. "
                       f"The partial output was removed, nothing was written")


@contextlib.contextmanager
def atomic_path(dest, nbytes=None):
    """Yield a temporary path beside `dest`; rename it to `dest` on success, remove it on error.

    `nbytes`, if given, is checked against the free space first (ensure_free_space).
    An existing `dest` is replaced: callers that must not replace check_destination() first.
    """
    dest = Path(dest)
    if nbytes is not None:
        ensure_free_space(dest, nbytes)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as e:  # a read-only or full file system: name the output, not the temporary
        raise (full_disk_error(dest, e) if is_full_disk(e)
               else SwtoolError(f"{dest}: cannot write there ({e.strerror or e})")) from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; the mode open() would give (a copy may change it)
        yield Path(tmp)
        if dest.absolute() in _NEW_FILES:
            _claim(tmp, dest)
        else:
            os.replace(tmp, dest)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_full_disk(e):
            raise full_disk_error(dest, e) from e
        if isinstance(e, OSError) and e.filename in (tmp, str(tmp)):  # the temporary is swtool's, not the user's
            raise SwtoolError(f"{dest}: writing failed ({e.strerror or e}); nothing was written") from e
        raise


def _claim(tmp, dest):
    """Give the finished `tmp` the name `dest` only if no one has taken it since it was checked:
    link() fails on an existing name, where rename() would silently replace a concurrent writer's file."""
    taken = SwtoolError(f"{dest}: was created by another process while this one ran; "
                        f"not replaced (pass --force to replace it)")
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise taken from None
    except OSError:  # a file system without hard links: check, then rename (a narrow race remains)
        if dest.exists() or dest.is_symlink():
            raise taken from None
        os.replace(tmp, dest)
    else:
        os.unlink(tmp)
    _NEW_FILES.discard(dest.absolute())  # ours now: a second write of it in this run replaces it


@contextlib.contextmanager
def atomic_directory(dest, force=False):
    """Yield a temporary directory beside `dest`; rename it to `dest` on success, remove it on error.

    With `force`, an existing `dest` is moved aside first and deleted only once the
    new directory is in place.
    """
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only
        move_directory_into_place(tmp, dest, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_full_disk(e):
            raise full_disk_error(dest, e) from e
        raise


def move_directory_into_place(tmp, dest, force=False):
    """Rename the finished directory `tmp` to `dest`; with `force` an existing `dest` is replaced,
    moved aside first and deleted only once the new one is in place."""
    tmp, dest = Path(tmp), Path(dest)
    if not (force and dest.is_dir()):
        os.rename(tmp, dest)  # fails if dest appeared meanwhile: never merged into
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.rename(dest, old / dest.name)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old / dest.name, dest)  # put the old output back
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(dest, text):
    with atomic_path(dest) as tmp:
        Path(tmp).write_text(text)

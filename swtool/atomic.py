"""Write outputs under a temporary name and rename them into place at the end.

A reader of the destination sees either the old file or the complete new one,
never a half-written file, even if swtool is interrupted.
"""

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(dest):
    """Yield a temporary path beside `dest`; rename it to `dest` on success, remove it on error."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent or ".")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(dest, text):
    with atomic_path(dest) as tmp:
        Path(tmp).write_text(text)

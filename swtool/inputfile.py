"""Opening an input: regular files only, and never a wait.

open() on a FIFO blocks until a writer appears, forever if none does; a character
device (/dev/zero) never ends. So every input is opened with O_NONBLOCK (a FIFO
opens at once), checked with fstat to be a regular file, and only then read, in
blocking mode as usual. A directory raises IsADirectoryError, as open() would, so
callers keep their own wording for it.
"""

import errno
import os
import stat

from swtool.errors import CheckpointError

KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFSOCK: "a socket"}


def open_regular(path):
    """The file at `path` opened for binary reading; a CheckpointError unless it is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            kind = KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise CheckpointError(path, f"is {kind}, not a regular file; swtool reads only regular files")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_regular(path):
    """Does `path` name a regular file (following symlinks)? Never opens it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False

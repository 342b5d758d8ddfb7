"""gguf-py's GGUFReader, parsed once per file and shared: gguf-py reads a real vocabulary field by
field, so parsing a SmolLM2 GGUF costs seconds, and the tests read the same files many times."""

import functools
import os

import gguf


def gguf_reader(path):
    """The GGUFReader of `path`; parsed again only if the file changed (another inode, size or mtime).

    Its tensors are read-only memory maps, so no test can change what another one reads."""
    stat = os.stat(path)
    return _parsed(os.path.abspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _parsed(path, inode, size, mtime_ns):
    return gguf.GGUFReader(path)

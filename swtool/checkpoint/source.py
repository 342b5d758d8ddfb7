"""What a MODEL argument names, opened as a checkpoint.

  - a directory with safetensors weights and config.json (directory.py);
  - a single .safetensors file with a config.json beside it;
  - a .gguf file, or a directory whose only weights are one .gguf file (gguf_model.py);
  - a Hugging Face id `org/name[@revision]`, looked up in the local hub cache (hub.py).

A path that exists always wins over the id reading of the same text. resolve_source() is
the one place that decides what MODEL names: every command resolves its MODEL through it.
"""

from pathlib import Path

from swtool.errors import CheckpointError
from swtool.inputfile import open_regular


def resolve_source(spec, download=False, missing_hint=None):
    """The local file or directory MODEL names: a path that exists, as given; else a Hub id's cached
    snapshot directory (fetched first with `download`); else a one-line CheckpointError.
    `missing_hint` replaces the "pass --download" advice for an id missing from the cache."""
    from swtool.checkpoint import hub

    path = Path(spec)
    if path.exists():
        return path
    if hub.parse_hub_id(spec) is not None:
        return hub.resolve(spec, download, missing_hint=missing_hint)
    raise CheckpointError(path, "no such file or directory")


def gguf_file_of(path):
    """The GGUF file a resolved MODEL is: itself, or the one .gguf of a directory without safetensors; else None."""
    from swtool.checkpoint.gguf_file import is_gguf

    path = Path(path)
    if path.is_file() and (path.suffix == ".gguf" or is_gguf(path)):
        return path
    return _lone_gguf(path) if path.is_dir() else None


def open_source(spec, download=False, header_only=False):
    """The checkpoint MODEL names (see the module docstring); `download` lets a Hub id be fetched;
    `header_only` opens a GGUF of any architecture (gguf_model.open_gguf)."""
    from swtool.checkpoint.directory import open_checkpoint
    from swtool.checkpoint.gguf_model import open_gguf

    path = resolve_source(spec, download)
    gguf = gguf_file_of(path)
    if gguf is not None:
        return open_gguf(gguf, header_only)
    if not path.is_dir() and not path.is_file():  # a FIFO, device or socket: opening it could wait forever
        open_regular(path).close()  # the one-line error that says what it is
    return open_checkpoint(path)


def _lone_gguf(directory):
    """The one .gguf file of a directory that holds no safetensors weights, else None."""
    if any(directory.glob("*.safetensors")):
        return None
    found = sorted(directory.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise CheckpointError(directory, f"{len(found)} .gguf files ({names}) and no safetensors; "
                                         f"name the file to use")
    return found[0] if found else None

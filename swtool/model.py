"""A model = a checkpoint (where the bytes are) + an architecture (what they mean)."""

from dataclasses import dataclass

from swtool.arch import Architecture, architecture_for
from swtool.checkpoint import Checkpoint
from swtool.checkpoint.source import open_source
from swtool.errors import CheckpointError


@dataclass
class Model:
    path: str
    checkpoint: Checkpoint
    arch: Architecture

    @property
    def directory(self):
        return self.checkpoint.directory


def load_model(path, download=False):
    """Open a checkpoint, pick its architecture and check every tensor a pass needs is there, in shape.

    `path`: a checkpoint directory, .safetensors or .gguf file, or a Hugging Face id
    (checkpoint/source.py); `download` lets an id missing from the local cache be fetched.
    """
    checkpoint = open_source(path, download)
    config_source, where = _sources(checkpoint)
    arch = architecture_for(checkpoint.config, config_source)
    arch.adapt(set(checkpoint.names()))
    for name, shape in arch.tensor_shapes().items():
        if name not in checkpoint:
            raise CheckpointError(where, f"missing tensor {name!r}")
        info = checkpoint.tensor(name)
        if info.shape != shape:
            raise CheckpointError(info.path, f"tensor {name!r} has shape {list(info.shape)}, "
                                             f"config.json implies {list(shape)}")
    return Model(str(path), checkpoint, arch)


def _sources(checkpoint):
    """What errors name: (the config's source, the checkpoint). A GGUF file is both; its
    `directory` is a temporary one, built on first use, so it is not touched here."""
    if getattr(checkpoint, "format", None) == "gguf":
        return checkpoint.path, checkpoint.path
    return checkpoint.directory / "config.json", checkpoint.directory

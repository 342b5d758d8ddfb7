"""A model = a checkpoint (where the bytes are) + an architecture (what they mean)."""

from dataclasses import dataclass

from swtool.arch import Architecture, architecture_for
from swtool.checkpoint import Checkpoint, open_checkpoint
from swtool.errors import CheckpointError


@dataclass
class Model:
    path: str
    checkpoint: Checkpoint
    arch: Architecture

    @property
    def directory(self):
        return self.checkpoint.directory


def load_model(path):
    """Open a checkpoint, pick its architecture and check every tensor a pass needs is there, in shape."""
    checkpoint = open_checkpoint(path)
    arch = architecture_for(checkpoint.config, checkpoint.directory / "config.json")
    arch.adapt(set(checkpoint.names()))
    for name, shape in arch.tensor_shapes().items():
        if name not in checkpoint:
            raise CheckpointError(checkpoint.directory, f"missing tensor {name!r}")
        info = checkpoint.tensor(name)
        if info.shape != shape:
            raise CheckpointError(info.path, f"tensor {name!r} has shape {list(info.shape)}, "
                                             f"config.json implies {list(shape)}")
    return Model(str(path), checkpoint, arch)

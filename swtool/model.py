"""A model = a checkpoint (where the bytes are) + an architecture (what they mean)."""

import re
from dataclasses import dataclass

from swtool.arch import Architecture, architecture_for
from swtool.checkpoint import Checkpoint
from swtool.checkpoint.source import open_source
from swtool.config_check import check_config
from swtool.errors import CheckpointError, SwtoolError
from swtool.table import plural


@dataclass
class Model:
    path: str
    checkpoint: Checkpoint
    arch: Architecture

    @property
    def directory(self):
        return self.checkpoint.directory


def load_model(path, download=False, header_only=False):
    """Open a checkpoint, pick its architecture and check every tensor a pass needs is there, in shape.

    `path`: a checkpoint directory, .safetensors or .gguf file, or a Hugging Face id
    (checkpoint/source.py); `download` lets an id missing from the local cache be fetched.
    `header_only` (inspect, audit): a GGUF whose architecture swtool cannot run opens too, with
    a HeaderOnlyArchitecture (arch.runs False) and llama.cpp's tensor names.
    """
    checkpoint = open_source(path, download, header_only)
    if getattr(checkpoint, "header_only", False):  # gguf_model.HeaderOnlyGGUF
        return Model(str(path), checkpoint, checkpoint.arch)
    config_source, where = _sources(checkpoint)
    check_config(checkpoint.config, config_source)  # types and ranges, before a family reads them
    arch, shapes = _interpret(checkpoint, config_source)
    for name, shape in shapes.items():
        if name not in checkpoint:
            raise CheckpointError(where, f"missing tensor {name!r}")
        info = checkpoint.tensor(name)
        if info.shape != shape:
            raise CheckpointError(info.path, f"tensor {name!r} has shape {list(info.shape)}, "
                                             f"config.json implies {list(shape)}")
        if not info.readable:  # refused now, not in the middle of a pass
            raise CheckpointError(info.path, f"tensor {name!r} is stored as {info.dtype}, which swtool "
                                             f"cannot decode to float")
    return Model(str(path), checkpoint, arch)


MAX_STACKED_EXPERTS = 1024  # stacked experts need not be separate tensors; real mixtures have at most a few hundred


def _interpret(checkpoint, config_source):
    """(Architecture, {name: shape}) the config implies; a config no family can make sense of is a one-line error.

    check_config has already refused values of the wrong type; what is left to fail
    here is a combination (heads that do not divide the hidden size, a rope_scaling
    object without its factor ...), reported with the family's own message.
    """
    names = checkpoint.names()
    try:
        arch = architecture_for(checkpoint.config, config_source)
        # tensor_shapes() below lists every layer (and every expert of a per-expert mixture): bound them
        if arch.n_layers > len(names):  # every layer has tensors
            raise CheckpointError(config_source, f"num_hidden_layers = {arch.n_layers}, but the checkpoint "
                                                 f"holds only {plural(len(names), 'tensor')}")
        experts = checkpoint.config.get("num_local_experts") or 0
        if experts > max(len(names), MAX_STACKED_EXPERTS):  # per-expert tensors, or a few stacked ones
            raise CheckpointError(config_source, f"num_local_experts = {experts}, but the checkpoint holds "
                                                 f"only {plural(len(names), 'tensor')}")
        arch.adapt(set(names))
        if getattr(checkpoint, "format", None) == "gguf":
            arch.use_gguf_layout()
        return arch, arch.tensor_shapes()
    except SwtoolError as e:  # a family's "config.json: ..." message: name the actual file
        if not str(e).startswith("config.json"):
            raise
        raise CheckpointError(config_source, re.sub(r"^config\.json( \([^)]*\))?: ", "", str(e))) from None
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, OverflowError, AttributeError) as e:
        raise CheckpointError(config_source, f"inconsistent {checkpoint.config.get('model_type')} config "
                                             f"({type(e).__name__}: {e})") from None


def _sources(checkpoint):
    """What errors name: (the config's source, the checkpoint). A GGUF file is both; its
    `directory` is a temporary one, built on first use, so it is not touched here."""
    if getattr(checkpoint, "format", None) == "gguf":
        return checkpoint.path, checkpoint.path
    return checkpoint.directory / "config.json", checkpoint.directory

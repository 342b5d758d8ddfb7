"""A Hugging Face checkpoint directory: config.json plus safetensors weights.

Three layouts are accepted, as transformers writes them:
  - one `model.safetensors`;
  - shards `model-0000x-of-0000N.safetensors` listed in `model.safetensors.index.json`;
  - a path to a single `.safetensors` file with a `config.json` beside it.

A multimodal checkpoint is seen as its language model (language_model.py).
"""

from dataclasses import replace
from pathlib import Path

from swtool.checkpoint.language_model import text_model
from swtool.checkpoint.safetensors import SafetensorsFile
from swtool.errors import CheckpointError
from swtool.jsonfile import read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class Checkpoint:
    """Tensors by Hugging Face name across all shards, plus the model's config."""

    def __init__(self, directory, files, config, tensor_to_file, stored_names=None):
        self.directory = Path(directory)
        self.files = files  # {Path: SafetensorsFile}
        self.config = config
        self._tensor_to_file = tensor_to_file  # {name: Path}
        self._stored_names = stored_names or {}  # {name: name in the file}, for a multimodal model's text part

    def __contains__(self, name):
        return name in self._tensor_to_file

    def names(self):
        return list(self._tensor_to_file)

    def tensor(self, name):
        """The TensorInfo of `name`; a clear error if the checkpoint lacks it."""
        path = self._tensor_to_file.get(name)
        if path is None:
            raise CheckpointError(self.directory, f"missing tensor {name!r}")
        stored = self._stored_names.get(name, name)
        info = self.files[path][stored]
        return info if stored == name else replace(info, name=name)  # named as the rest of swtool names it

    def total_bytes(self):
        return sum(p.stat().st_size for p in self.files)

    def sibling(self, name):
        """A file next to the weights (tokenizer.json ...), or None."""
        path = self.directory / name
        return path if path.is_file() else None


def open_checkpoint(path):
    """Open a checkpoint directory (or a single .safetensors file beside a config.json)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or directory")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(path, "expected a directory or a .safetensors file")
        directory, shard_paths = path.parent, [path]
    else:
        directory = path
        shard_paths = _shards_of(directory)
    config = read_config(directory)
    files, tensor_to_file = {}, {}
    for shard in shard_paths:
        files[shard] = SafetensorsFile(shard)
        for name in files[shard].tensors:
            if name in tensor_to_file:
                raise CheckpointError(shard, f"tensor {name!r} is also stored in {tensor_to_file[name].name}")
            tensor_to_file[name] = shard
    index = directory / INDEX_NAME
    if path.is_dir() and index.exists():
        tensor_to_file = _check_index(index, files)
    config, stored_names = text_model(config, tensor_to_file)  # a multimodal checkpoint: its language model
    if stored_names is not None:
        tensor_to_file = {name: tensor_to_file[stored] for name, stored in stored_names.items()}
    return Checkpoint(directory, files, config, tensor_to_file, stored_names)


def _shards_of(directory):
    index = directory / INDEX_NAME
    if index.exists():  # a FIFO or device there is an error (read_json), not a missing index
        weight_map = _read_index(index)
        shards = []
        for shard_name in dict.fromkeys(weight_map.values()):
            shard = directory / shard_name
            if not shard.is_file():
                raise CheckpointError(index, f"missing shard {shard_name!r} (listed in the index)")
            shards.append(shard)
        return shards
    if (directory / SINGLE_NAME).is_file():
        return [directory / SINGLE_NAME]
    found = sorted(directory.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if not found:
        raise CheckpointError(directory, "no model.safetensors, no index and no .safetensors file")
    raise CheckpointError(directory, f"{len(found)} .safetensors files but no {INDEX_NAME} to say which are the model")


def _read_index(index):
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(index, "no weight_map object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise CheckpointError(index, f"tensor {name!r} maps to an invalid shard name {shard!r}")
    return weight_map


def _check_index(index, files):
    """Every tensor the index names must be in the shard it names; that map is authoritative."""
    by_name = {p.name: p for p in files}
    tensor_to_file = {}
    for name, shard_name in _read_index(index).items():
        shard = by_name[shard_name]
        if name not in files[shard]:
            raise CheckpointError(index, f"tensor {name!r} is listed in {shard_name!r} but that shard lacks it")
        tensor_to_file[name] = shard
    return tensor_to_file


def read_config(directory):
    path = Path(directory) / "config.json"
    if not path.exists():  # a FIFO or device there is an error (read_json), not a missing config
        raise CheckpointError(directory, "no config.json")
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(path, "not a JSON object")
    return config

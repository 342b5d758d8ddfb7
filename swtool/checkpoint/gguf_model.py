"""A GGUF file seen as a Hugging Face checkpoint: config.json from its metadata, tensors by HF name.

llama.cpp's converter (convert_hf_to_gguf.py) renames every tensor
(`model.layers.2.mlp.down_proj.weight` -> `blk.2.ffn_down.weight`), stores
hyper-parameters as `{arch}.*` metadata keys, and, for some architectures,
reorders rows (llama's Q and K, so that its RoPE can rotate neighbouring pairs).
Reading a GGUF undoes the three, each through the family that reads the file's
architecture (Architecture.gguf_reads; the family's module in arch/ says how):

  1. metadata -> a config dict in config.json's terms (`hf_config`, the family's
     config_from_gguf; the keys every architecture shares are read here);
  2. the architecture that config selects, switched to the converter's layout where
     its own differs (use_gguf_layout(): GPT-2's transposed Conv1D weights, StableLM's
     stacked norms), lists its tensors (tensor_shapes()) and llama.cpp's name for each
     (gguf_name(), from gguf-py's own name map), so the reverse map is built from
     them and no name table is kept here;
  3. tensors whose rows the converter reordered get a row order that undoes it
     (gguf_stored_rows()), and values it offset (Gemma's 1 + w norms) lose the
     offset when read (gguf_value_offset()).

The result has the interface of checkpoint.directory.Checkpoint (config,
tensor(name), names(), files, directory ...), so forward, detect and audit run on
it unchanged. `directory` is a temporary directory holding the Hugging Face
files rebuilt from the metadata (config.json, tokenizer.json, ...), made on
first use, because the tokenizer code reads a directory.
"""

import json
import math
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from swtool.checkpoint.gguf_file import read_gguf
from swtool.errors import CheckpointError


def float32_value(value):
    """A float32 header value as the shortest decimal that rounds to it: 1e-05, not 9.99999974e-06."""
    return float(str(np.float32(value)))


# --- hyper-parameters ------------------------------------------------------------

class Hparams:
    """The `{arch}.*` metadata keys of a GGUF file, each read with its check: what a family's
    config_from_gguf reads (hparams("block_count"), hparams("rope.freq_base", 10000.0, kind=float))."""

    def __init__(self, meta, arch, source):
        self.meta, self.arch, self.source = meta, arch, source

    def __call__(self, key, default=None, required=True, kind=int):
        """A positive count (kind int) or a positive finite number (kind float), or a one-line error."""
        arch, source = self.arch, self.source
        value = self.meta.get(f"{arch}.{key}", default)
        if value is None:
            if required:
                raise CheckpointError(source, f"missing metadata key {arch}.{key}")
            return None
        if isinstance(value, Sequence) and not isinstance(value, str):
            raise CheckpointError(source, f"{arch}.{key} varies per layer, which swtool does not support")
        if not metadata_number(value, kind):
            raise CheckpointError(source, f"metadata {arch}.{key} = {value!r} is not a positive "
                                          f"{'integer' if kind is int else 'number'}")
        return value

    def error(self, message):
        return CheckpointError(self.source, message)

    @staticmethod
    def number(value, kind):
        return metadata_number(value, kind)

    @staticmethod
    def float32(value):
        return float32_value(value)


def hf_config(meta, gguf_tensors, source):
    """config.json for the model in a GGUF file: the family's keys (its config_from_gguf), then
    those every architecture shares: vocabulary size, tied embeddings, special token ids.
    `gguf_tensors`: the file's {llama.cpp name: GGUFTensor}."""
    from swtool.arch import family_reading_gguf, gguf_readable_architectures

    arch = meta.get("general.architecture")
    family = family_reading_gguf(arch) if isinstance(arch, str) else None
    if family is None:
        raise CheckpointError(source, f"GGUF architecture {arch!r} is not supported for reading "
                                      f"(supported: {', '.join(gguf_readable_architectures())})")
    hparams = Hparams(meta, arch, source)
    n_layers = hparams("block_count")
    if n_layers > len(gguf_tensors):  # each block has tensors; this bounds every per-layer table built later
        raise CheckpointError(source, f"metadata {arch}.block_count = {n_layers}, but the file holds only "
                                      f"{len(gguf_tensors)} tensors")
    config = family.config_from_gguf(hparams, gguf_tensors)
    vocab_size = hparams("vocab_size", None, required=False)
    if vocab_size is None:  # older converters leave it out; the vocabulary says it
        tokens = meta.get("tokenizer.ggml.tokens", ())
        vocab_size = len(tokens) if isinstance(tokens, Sequence) and not isinstance(tokens, str) else 0
    if not vocab_size:
        raise CheckpointError(source, f"missing metadata key {arch}.vocab_size and no tokenizer.ggml.tokens")
    config["vocab_size"] = vocab_size
    config["tie_word_embeddings"] = "output.weight" not in gguf_tensors
    config["use_cache"] = True
    for key, name in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):  # unk belongs to the tokenizer files
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            if type(token_id) is not int or not 0 <= token_id < vocab_size:
                raise CheckpointError(source, f"metadata tokenizer.ggml.{name}_token_id = {token_id!r} is not "
                                              f"a token id below the vocabulary size {vocab_size}")
            config[f"{key}_token_id"] = token_id
    return config


FLOAT32_MAX = float(np.finfo(np.float32).max)


def metadata_number(value, kind):
    """Is a metadata value a positive int (kind int) or a positive finite int/float (kind float)?"""
    if type(value) is bool or not isinstance(value, (int, float)):
        return False
    if kind is int and not isinstance(value, int):
        return False
    return math.isfinite(value) and 0 < value < FLOAT32_MAX  # stays finite as config.json's float32


# --- names and row orders ------------------------------------------------------

def hf_tensors(gguf, arch, config, source):
    """{HF name: GGUFTensor presenting that name} for every tensor of the file."""
    to_hf, shapes = {}, arch.tensor_shapes()
    for hf_name in shapes:
        to_hf[arch.gguf_name(hf_name)] = hf_name
    tensors = {}
    for gguf_name, info in gguf.tensors.items():
        if gguf_name in arch.gguf_derived:
            continue  # not a weight: the family made it part of the config
        hf_name = to_hf.get(gguf_name)
        if hf_name is None:
            raise CheckpointError(source, f"tensor {gguf_name!r} has no counterpart in a "
                                          f"{config['model_type']} model as swtool reads it")
        if info.shape != tuple(shapes[hf_name]):  # checked here, before a row order is built from the shape
            raise CheckpointError(source, f"tensor {gguf_name!r} has shape {list(info.shape)}, "
                                          f"the metadata implies {list(shapes[hf_name])}")
        order = arch.gguf_stored_rows(gguf_name, info.shape[0])
        tensors[hf_name] = replace(info, name=hf_name, row_order=order, value_offset=arch.gguf_value_offset(gguf_name))
    return tensors


# --- the checkpoint --------------------------------------------------------------

class GGUFCheckpoint:
    """Tensors of one GGUF file by Hugging Face name, plus the config its metadata implies."""

    format = "gguf"

    def __init__(self, path, gguf, config, tensors):
        self.path = Path(path)
        self.gguf = gguf  # the parsed header: metadata, tensor table
        self.metadata = gguf.metadata
        self.files = {self.path: gguf}
        self.config = config
        self._tensors = tensors
        self._sidecar = None

    def __contains__(self, name):
        return name in self._tensors

    def names(self):
        return list(self._tensors)

    def tensor(self, name):
        info = self._tensors.get(name)
        if info is None:
            raise CheckpointError(self.path, f"missing tensor {name!r}")
        return info

    def total_bytes(self):
        return self.path.stat().st_size

    @property
    def directory(self):
        """A temporary directory with the HF files rebuilt from the metadata (made on first use)."""
        if self._sidecar is None:
            self._sidecar = self._write_sidecar()
        return self._sidecar

    def sibling(self, name):
        path = self.directory / name
        return path if path.is_file() else None

    def _write_sidecar(self):
        from swtool.checkpoint import gguf_vocab

        tokenizer = gguf_vocab.build_tokenizer(self.metadata, self.path)  # fails early for unsupported vocabularies
        directory = Path(tempfile.mkdtemp(prefix="swtool-gguf-"))
        weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)
        write_hf_files(directory, self.metadata, self.config, tokenizer)
        return directory


def write_hf_files(directory, meta, config, tokenizer):
    """config.json, generation_config.json and the tokenizer files of a GGUF's model, into `directory`."""
    from swtool.checkpoint import gguf_vocab

    def write_json(name, data):
        (directory / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    write_json("config.json", config)
    write_json("generation_config.json", {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                                          if key in config})
    tokenizer.save(str(directory / "tokenizer.json"))
    write_json("tokenizer_config.json", gguf_vocab.tokenizer_config(meta))
    write_json("special_tokens_map.json", gguf_vocab.special_tokens(meta))


def open_gguf(path, header_only=False):
    """Open a GGUF file as a checkpoint with Hugging Face names; validated before any data is read.

    With `header_only`, a file whose architecture no family reads opens too, as a HeaderOnlyGGUF:
    llama.cpp's tensor names, the shape its metadata gives, no forward pass."""
    from swtool.arch import architecture_for, family_reading_gguf

    path = Path(path)
    gguf = read_gguf(path)
    arch_name = gguf.metadata.get("general.architecture")
    if header_only and not (isinstance(arch_name, str) and family_reading_gguf(arch_name)):
        return HeaderOnlyGGUF.open(path, gguf)
    config = hf_config(gguf.metadata, gguf.tensors, path)
    arch = architecture_for(config, path)
    arch.use_gguf_layout()
    arch.adapt(set(gguf.tensors))  # llama.cpp's names tell the layout (a mixture's experts: stacked apart)
    return GGUFCheckpoint(path, gguf, config, hf_tensors(gguf, arch, config, path))


# --- any architecture, header only ------------------------------------------------------

# config.json's name for the {arch}.* keys llama.cpp writes for every architecture
SHARED_HPARAMS = {"num_hidden_layers": "block_count", "hidden_size": "embedding_length",
                  "intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count",
                  "num_key_value_heads": "attention.head_count_kv", "max_position_embeddings": "context_length",
                  "num_local_experts": "expert_count"}


class HeaderOnlyArchitecture:
    """What inspect and audit need of a model whose architecture swtool cannot run: its shape, and
    where llama.cpp keeps each layer's down projection (the same names in every architecture)."""

    runs = False  # no forward pass: commands that need one refuse the file

    def __init__(self, arch_name, config):
        self.model_type = arch_name  # llama.cpp's name: no config.json model_type is known for it
        self.config = config
        self.n_layers = config["num_hidden_layers"]
        self.hidden_size = config.get("hidden_size")
        self.vocab_size = config["vocab_size"]

    def down_proj_name(self, layer, expert=None):
        return f"blk.{layer}.ffn_down_exps.weight" if expert is not None else f"blk.{layer}.ffn_down.weight"


class HeaderOnlyGGUF(GGUFCheckpoint):
    """A GGUF file of any architecture, its tensors under llama.cpp's names (nothing is renamed)."""

    header_only = True

    @classmethod
    def open(cls, path, gguf):
        meta = gguf.metadata
        arch_name = meta.get("general.architecture")
        if not isinstance(arch_name, str):
            raise CheckpointError(path, "no general.architecture in the metadata")
        hparams, config = Hparams(meta, arch_name, path), {"model_type": arch_name}
        for key, gguf_key in SHARED_HPARAMS.items():
            value = hparams(gguf_key, required=key == "num_hidden_layers")
            if value is not None:
                config[key] = value
        tokens = meta.get("tokenizer.ggml.tokens", ())
        config["vocab_size"] = hparams("vocab_size", required=False) or (
            len(tokens) if isinstance(tokens, Sequence) and not isinstance(tokens, str) else 0)
        if not config["vocab_size"]:
            raise CheckpointError(path, f"missing metadata key {arch_name}.vocab_size and no tokenizer.ggml.tokens")
        checkpoint = cls(path, gguf, config, dict(gguf.tensors))
        checkpoint.arch = HeaderOnlyArchitecture(arch_name, config)
        return checkpoint

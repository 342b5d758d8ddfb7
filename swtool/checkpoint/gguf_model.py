"""A GGUF file seen as a Hugging Face checkpoint: config.json from its metadata, tensors by HF name.

llama.cpp's converter (convert_hf_to_gguf.py) renames every tensor
(`model.layers.2.mlp.down_proj.weight` -> `blk.2.ffn_down.weight`), stores
hyper-parameters as `{arch}.*` metadata keys, and, for the llama architecture,
reorders the rows of Q and K so that llama.cpp's RoPE can rotate neighbouring
pairs. Reading a GGUF undoes the three:

  1. metadata -> a config dict in config.json's terms (`hf_config`);
  2. the architecture that config selects lists its tensors (tensor_shapes()) and
     llama.cpp's name for each (gguf_name(), from gguf-py's own name map), so the
     reverse map is built from them and no name table is kept here;
  3. Q and K of llama-architecture files get a row order that undoes the
     permutation (`unpermute_order`).

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
from swtool.errors import CheckpointError, SwtoolError

# llama.cpp architecture -> what config.json says, and whether Q/K rows were permuted.
# Mistral converts as "llama". Other families read GGUF once their line is here.
GGUF_ARCHITECTURES = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "permuted_qk": True},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "permuted_qk": False},
}


def float32_value(value):
    """A float32 header value as the shortest decimal that rounds to it: 1e-05, not 9.99999974e-06."""
    return float(str(np.float32(value)))


# --- hyper-parameters ------------------------------------------------------------

def hf_config(meta, gguf_names, source):
    """config.json for the model in a GGUF file, from its `{arch}.*` metadata and tensor names."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(source, f"GGUF architecture {arch!r} is not supported for reading "
                                      f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    family = GGUF_ARCHITECTURES[arch]

    def hparam(key, default=None, required=True, kind=int):
        """A positive count (kind int) or a positive finite number (kind float), or a one-line error."""
        value = meta.get(f"{arch}.{key}", default)
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

    n_layers = hparam("block_count")
    if n_layers > len(gguf_names):  # each block has tensors; this bounds every per-layer table built later
        raise CheckpointError(source, f"metadata {arch}.block_count = {n_layers}, but the file holds only "
                                      f"{len(gguf_names)} tensors")
    hidden, n_head = hparam("embedding_length"), hparam("attention.head_count")
    n_kv_head = hparam("attention.head_count_kv", n_head)
    head_dim = hparam("attention.key_length", hidden // n_head)
    if hparam("attention.value_length", head_dim) != head_dim:
        raise CheckpointError(source, "keys and values of different sizes do not fit a llama-style config")
    if hparam("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(source, "partial rotary embeddings do not fit a llama-style config")
    vocab_size = hparam("vocab_size", None, required=False)
    if vocab_size is None:  # older converters leave it out; the vocabulary says it
        tokens = meta.get("tokenizer.ggml.tokens", ())
        vocab_size = len(tokens) if isinstance(tokens, Sequence) and not isinstance(tokens, str) else 0
    if not vocab_size:
        raise CheckpointError(source, f"missing metadata key {arch}.vocab_size and no tokenizer.ggml.tokens")
    config = {
        "architectures": list(family["architectures"]),
        "model_type": family["model_type"],
        "hidden_size": hidden,
        "intermediate_size": hparam("feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float32_value(hparam("attention.layer_norm_rms_epsilon", kind=float)),
        "rope_theta": float32_value(hparam("rope.freq_base", 10000.0, kind=float)),
        "rope_scaling": rope_scaling(meta, arch, source),
        "max_position_embeddings": hparam("context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in gguf_names,
    }
    if family["model_type"] == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in gguf_names
        config["attention_dropout"] = 0.0
        config["mlp_bias"] = "blk.0.ffn_down.bias" in gguf_names
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


def rope_scaling(meta, arch, source):
    """rope_scaling of config.json from `{arch}.rope.scaling.*`: none or linear."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        factor = meta.get(f"{arch}.rope.scaling.factor")
        if not metadata_number(factor, float):
            raise CheckpointError(source, f"metadata {arch}.rope.scaling.factor = {factor!r}: linear RoPE "
                                          f"scaling needs a positive factor")
        return {"rope_type": "linear", "factor": float32_value(factor)}
    raise CheckpointError(source, f"RoPE scaling {kind!r} is not supported for GGUF input (supported: none, linear)")


# --- names and the Q/K permutation -----------------------------------------------

def unpermute_order(n_rows, n_head):
    """Stored row of each HF row of a Q or K matrix that convert_hf_to_gguf permuted.

    HF keeps each head's rotary rows as [first halves, second halves]; llama.cpp
    interleaves them, via w.reshape(n_head, 2, half, cols).swapaxes(1, 2):
    HF row h*2*half + s*half + i is stored at h*2*half + 2*i + s.
    """
    half = n_rows // n_head // 2
    if half * 2 * n_head != n_rows:
        raise SwtoolError(f"{n_rows} rows do not split into {n_head} heads of rotary pairs")
    head, rest = np.divmod(np.arange(n_rows), 2 * half)
    side, i = np.divmod(rest, half)
    return head * 2 * half + 2 * i + side


def hf_tensors(gguf, arch, config, source):
    """{HF name: GGUFTensor presenting that name} for every tensor of the file."""
    to_hf, shapes = {}, arch.tensor_shapes()
    for hf_name in shapes:
        to_hf[arch.gguf_name(hf_name)] = hf_name
    permuted = GGUF_ARCHITECTURES[gguf.metadata["general.architecture"]]["permuted_qk"]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = {}
    for gguf_name, info in gguf.tensors.items():
        if gguf_name == ROPE_FREQS:
            continue  # not a weight: it became the config's rope_scaling (freq_factor_scaling)
        hf_name = to_hf.get(gguf_name)
        if hf_name is None:
            raise CheckpointError(source, f"tensor {gguf_name!r} has no counterpart in a "
                                          f"{config['model_type']} model as swtool reads it")
        if info.shape != tuple(shapes[hf_name]):  # checked here, before a row order is built from the shape
            raise CheckpointError(source, f"tensor {gguf_name!r} has shape {list(info.shape)}, "
                                          f"the metadata implies {list(shapes[hf_name])}")
        kind = gguf_name.split(".")[-2]  # "attn_q" in "blk.3.attn_q.weight"
        order = None
        if permuted and kind in heads:
            order = unpermute_order(info.shape[0], heads[kind])
        tensors[hf_name] = replace(info, name=hf_name, row_order=order)
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


def open_gguf(path):
    """Open a GGUF file as a checkpoint with Hugging Face names; validated before any data is read."""
    from swtool.arch import architecture_for

    path = Path(path)
    gguf = read_gguf(path)
    config = hf_config(gguf.metadata, set(gguf.tensors), path)
    if ROPE_FREQS in gguf.tensors:
        config["rope_scaling"] = freq_factor_scaling(gguf.tensors[ROPE_FREQS], config, path)
    arch = architecture_for(config, path)
    return GGUFCheckpoint(path, gguf, config, hf_tensors(gguf, arch, config, path))


ROPE_FREQS = "rope_freqs.weight"


def freq_factor_scaling(info, config, source):
    """rope_scaling for a file with rope_freqs.weight: llama.cpp divides frequency i by factor i.

    convert_hf_to_gguf writes this tensor for Llama 3.1-style scaling (rope_type "llama3"),
    computed from the config's factor, low/high_freq_factor and original context, and keeps
    none of those numbers in the metadata. The factors themselves are what llama.cpp uses,
    so swtool uses them too: rope_type "freq_factors" (arch/rope.py).
    """
    if config.get("rope_scaling"):
        raise CheckpointError(source, f"{ROPE_FREQS} together with RoPE scaling "
                                      f"{config['rope_scaling']['rope_type']!r} is not supported")
    n_freqs = config["head_dim"] // 2
    if info.shape != (n_freqs,):
        raise CheckpointError(source, f"tensor {ROPE_FREQS!r} has shape {list(info.shape)}; "
                                      f"a head of {config['head_dim']} dims has {n_freqs} frequencies")
    factors = info.read()
    if not (np.all(np.isfinite(factors)) and np.all(factors > 0)):
        raise CheckpointError(source, f"tensor {ROPE_FREQS!r} holds factors that are not positive finite numbers")
    return {"rope_type": "freq_factors", "factors": [float(f) for f in factors]}

"""What every architecture provides to the streaming forward pass, and to GGUF files.

An architecture reads config.json once and then answers three kinds of question:
names (which tensor is layer i's down projection, what llama.cpp calls it), math
(embed tokens, run block i, produce logits) through a `ctx` that reads weights and
applies edits and observers (see forward.py), and GGUF (what llama.cpp's converter
writes for this family, and how to read it back; see "GGUF" below).

The defaults here are those of the `model.layers.N.*` naming most families share
(embeddings `model.embed_tokens`, final norm `model.norm`, `lm_head`); the steps a
block is made of are in blocks.py.
"""

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

from swtool.errors import SwtoolError

# The observation points: where observers see activations [rows, tokens, channels] (forward.py).
DOWN_IN = "down_in"  # the input of layer i's down projection (the MLP's second matrix)
DOWN_OUT = "down_out"  # its raw output, before any post-norm or multiplier
RESID_MID = "resid_mid"  # the residual stream after attention, before the MLP adds to it
RESID = "resid"  # the residual stream after the block
POINTS = (DOWN_IN, DOWN_OUT, RESID_MID, RESID)
# Not a point of a block but of every matrix product: observers with an `observe_linear(name, expert, x,
# world=None, positions=None)` method see the input x [rows, tokens, in] of each ctx.linear (named by its
# weight, and for a stacked mixture tensor its expert), after any activation transform: what the product
# multiplies (forward.py); for an expert's rows gathered from several batch rows, x is [1, N, in] and
# `world`/`positions` name each row's batch row and token position.
LINEAR_IN = "linear_in"


# --- config.json as a family reads it ---------------------------------------------------
# A field's type says what its value must be: (check, conversion, what the error says it must be).

class Count(int):
    """A size or a count: a positive integer (4096 or 4096.0, not "4096", true or 0)."""


class Index(int):
    """A non-negative integer (max_window_layers)."""


class Positive(float):
    """A positive finite number (an epsilon, a RoPE base, a soft-cap)."""


class Number(float):
    """A finite number (Granite's multipliers)."""


class Fraction(float):
    """A number in (0, 1] (partial_rotary_factor)."""


class Names(list):
    """A list of strings (layer_types)."""


class Layers(list):
    """A list of layer indices (mlp_only_layers)."""


def positive_int(value):
    """Is `value` a count or a size: 4096 or 4096.0, not "4096", true or 0?"""
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return type(value) is not bool and integral and value > 0


def _integral(value):
    return type(value) is not bool and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))


def _finite(value):
    return type(value) is not bool and isinstance(value, (int, float)) and math.isfinite(value)


KINDS = {
    Count: (positive_int, int, "a positive integer"),
    Index: (lambda v: _integral(v) and v >= 0, int, "a non-negative integer"),
    Positive: (lambda v: _finite(v) and v > 0, float, "a positive number"),
    Number: (_finite, float, "a finite number"),
    Fraction: (lambda v: _finite(v) and 0 < v <= 1, float, "a number in (0, 1]"),
    bool: (lambda v: isinstance(v, bool), bool, "true or false"),
    str: (lambda v: isinstance(v, str), str, "a string"),
    dict: (lambda v: isinstance(v, dict), dict, "an object"),
    Names: (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), list, "a list of strings"),
    Layers: (lambda v: isinstance(v, list) and all(type(x) is int for x in v), list, "a list of integers"),
}


def short(value):
    """A config value as an error message shows it."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True, kw_only=True)
class Args:
    """config.json as a family reads it: one field per key, named as config.json names it, with
    the family's default (transformers'). A family's Args subclasses this (or DecoderArgs) and
    overrides a default by declaring the field again.

    `read` is the one routine that reads a config: a key absent or null takes its default (a
    field without one is required), except that null turns off a field marked `null_is_off`
    (Gemma 2's soft-caps); `aliases` are other spellings, which win when present (GPT-2's
    n_layer); each value is checked by its field's type (KINDS), then `check()` relates keys.
    """

    aliases: ClassVar[dict] = {}  # {their key: field}
    model_type: str = None
    num_hidden_layers: Count
    hidden_size: Count
    vocab_size: Count

    @classmethod
    def read(cls, config):
        model_type, values = config.get("model_type"), {}
        for f in fields(cls):
            spellings = [theirs for theirs, ours in cls.aliases.items() if ours == f.name] + [f.name]
            key = next((key for key in spellings if config.get(key) is not None), None)
            if key is None:
                if f.metadata.get("null_is_off") and f.name in config:
                    values[f.name] = None
                elif f.default is MISSING:
                    raise SwtoolError(f"config.json ({model_type}): missing {f.name!r}")
                continue
            ok, convert, what = KINDS[f.type]
            if not ok(config[key]):
                raise SwtoolError(f"config.json ({model_type}): {key} = {short(config[key])} is not {what}")
            values[f.name] = convert(config[key])
        args = cls(**values)
        args.check()
        return args

    def check(self):
        """Relations between keys: a one-line SwtoolError for a config that contradicts itself."""


def null_is_off(default):
    """A field whose explicit null in config.json turns the feature off rather than taking `default`."""
    return field(default=default, metadata={"null_is_off": True})


@dataclass(frozen=True, kw_only=True)
class DecoderArgs(Args):
    """The keys most decoder-only families share, with Llama's defaults."""

    num_attention_heads: Count
    num_key_value_heads: Count = None  # all heads: no grouped-query attention
    head_dim: Count = None  # hidden_size / heads
    intermediate_size: Count
    hidden_act: str = "silu"
    rms_norm_eps: Positive = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Count = None
    layer_types: Names = None
    use_sliding_window: bool = False
    max_window_layers: Index = None

    def check(self):
        if self.num_attention_heads % (self.num_key_value_heads or self.num_attention_heads):
            raise SwtoolError(f"config.json: {self.num_attention_heads} attention heads do not divide "
                              f"into {self.num_key_value_heads} key/value heads")

    def layer_slides(self, layer):
        """layer_types' word for `layer`: True (sliding), False (full), None when it has no entry."""
        if self.layer_types is not None and layer < len(self.layer_types):
            return self.layer_types[layer] == "sliding_attention"
        return None


class Architecture:
    model_types = ()  # config.json `model_type` values this class handles
    runs = True  # a forward pass exists (checkpoint/gguf_model.py's HeaderOnlyArchitecture has none)
    # the norm the MLP's output passes through before the residual add (Gemma 2/3, OLMo 2:
    # "post_feedforward_layernorm"), None where down_proj's output is added as it is: such a norm
    # caps a down_proj spike, which the scan then lists as renormalised (detect.renormalised_spikes)
    mlp_output_norm = None

    Args = Args  # the family's config.json keys (a dataclass subclassing Args)

    def __init__(self, config):
        self.config = config  # as config.json has it: RoPE settings are read from it (rope.py)
        self.args = self.Args.read(config)
        self.model_type = self.args.model_type
        self.n_layers = self.args.num_hidden_layers
        self.hidden_size = self.args.hidden_size
        self.vocab_size = self.args.vocab_size
        self.tied = False  # the LM head is the embedding matrix
        self.norm = None  # the family's norm (blocks.py), used by the default head
        self.moe = None  # a mixture's MLP step (moe.Mixture): names and layouts below delegate to it

    def adapt(self, names):
        """Called once with the checkpoint's tensor names, before tensor_shapes(). Families whose
        checkpoints come in several layouts (per-expert or stacked mixture experts) pick theirs here.
        GGUF input calls it with llama.cpp's names first, to list the tensors the file holds."""
        if self.moe is not None:
            self.moe.adapt(names)

    # --- names ---------------------------------------------------------------------
    def down_proj_name(self, layer, expert=None):
        """Hugging Face name of layer `layer`'s down projection (the MLP's second matrix).

        Mixtures take `down_proj_name(layer, expert)`: the tensor holding that expert's
        down projection, either its own 2-D tensor or a stacked [experts, out, in] one.
        """
        if self.moe is not None:
            return self.moe.down_proj_name(layer, expert)
        return f"model.layers.{layer}.mlp.down_proj.weight"

    def tensor_shapes(self):
        """{Hugging Face name: shape} of every tensor a forward pass reads, as config.json implies."""
        raise NotImplementedError

    def model_tensors(self):
        """The tensors outside the blocks: embeddings, final norm, untied LM head."""
        d = self.hidden_size
        shapes = {"model.embed_tokens.weight": (self.vocab_size, d), **self.norm.tensors("model.norm", d)}
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        return shapes

    def stored_transposed(self, hf_name):
        """Is this 2-D weight stored [in, out] (GPT-2's Conv1D) rather than nn.Linear's [out, in]?

        Such weights are used through ctx.linear(..., transposed=True); coordinates
        (edits, the catalog's row/col) still mean row = output, col = input.
        """
        return False

    # --- math ------------------------------------------------------------------------
    def embed(self, ctx, tokens):
        """Token ids [T] -> residual stream [T, hidden]."""
        return ctx.embedding("model.embed_tokens.weight", tokens)

    def sliding_window(self, layer):
        """Attention window of layer `layer` in tokens, or None for full causal attention."""
        return None

    def block(self, ctx, layer, x):
        """Residual stream [W, T, hidden] in, residual stream out, after decoder block `layer`."""
        raise NotImplementedError

    def head(self, ctx, x):
        """Final norm and LM head: residual [W, T, hidden] -> logits [W, T, vocab]."""
        x = self.norm(ctx, x, "model.norm")
        return ctx.linear(x, "model.embed_tokens.weight" if self.tied else "lm_head.weight")

    # --- GGUF --------------------------------------------------------------------------
    # A family owns what llama.cpp's convert_hf_to_gguf.py does for it. Reading tensor names
    # needs only gguf_arch(); `swtool export` also needs the rest, and GGUF input the
    # classmethods. gguf_export.py and checkpoint/gguf_model.py only drive these.
    gguf_exports = False  # does `swtool export` write this family?
    gguf_reads = ()  # llama.cpp architectures (general.architecture) this family reads back
    gguf_derived = ()  # GGUF tensors that config_from_gguf turns into config (not weights)
    gguf_windows = False  # does llama.cpp apply this family's sliding windows? (export notes when it does not)

    def use_gguf_layout(self):
        """Called before tensor_shapes() when the tensors come from a GGUF file. A family whose
        Hugging Face tensors are laid out otherwise than llama.cpp's converter writes them (GPT-2's
        Conv1D weights, which it transposes; StableLM's per-head norms, which it stacks) switches
        to the GGUF layout here; names (HF-style, gguf_name) and math stay the family's."""

    def gguf_arch(self):
        """gguf.MODEL_ARCH member name llama.cpp uses for this model (e.g. "LLAMA")."""
        raise NotImplementedError

    def gguf_arch_name(self):
        """llama.cpp's general.architecture for this model (e.g. "llama"); export only."""
        raise NotImplementedError

    def gguf_name(self, hf_name):
        """llama.cpp's name for a Hugging Face tensor name, from gguf-py's own name map.

        The map lists every tensor of every block it covers, while a scan names one or two
        tensors of an early layer: so it first covers the blocks up to the one asked for,
        and all of them once a later block is asked for (an export asks for every tensor,
        block by block).
        """
        if self.moe is not None:
            return self.moe.gguf_name(hf_name, self.gguf_map_name)
        return self.gguf_map_name(hf_name)

    def gguf_map_name(self, hf_name):
        """gguf-py's name map for this family, grown block by block as gguf_name() explains."""
        import gguf

        block = next((int(part) for part in hf_name.split(".") if part.isdecimal()), -1)
        if self.__dict__.get("gguf_blocks", -1) <= block:
            blocks = self.n_layers if "gguf_blocks" in self.__dict__ else min(self.n_layers, block + 1)
            self.gguf_names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, self.gguf_arch()), blocks)
            self.gguf_blocks = blocks
        name = self.gguf_names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SwtoolError(f"no llama.cpp name for tensor {hf_name!r} ({self.model_type})")
        return name

    def gguf_stored_rows(self, gguf_name, n_rows):
        """The row of the GGUF tensor that holds each row of the Hugging Face one (an int array
        [n_rows]), or None when the converter keeps the rows in their order (most tensors)."""
        return None

    def gguf_restacked(self, tensor):
        """Tensors the converter makes by stacking several checkpoint tensors or splitting one (a
        mixture's experts: moe.Mixture.gguf_restacked): ({Hugging Face name in the layout llama.cpp
        stores: (shape, read(rows))}, the checkpoint names they stand for). `tensor(name)` gives a
        checkpoint tensor. Export names and writes them like the others; none by default."""
        if self.moe is not None:
            return self.moe.gguf_restacked(tensor)
        return {}, set()

    def gguf_value_offset(self, gguf_name):
        """What the converter adds to every value of this tensor (Gemma stores its norm weights
        as 1 + w): export adds it, GGUF input subtracts it. 0.0 for most tensors."""
        return 0.0

    def gguf_extra_tensors(self):
        """{llama.cpp name: float32 array} of tensors the converter adds (none by default)."""
        return {}

    def gguf_hyperparameters(self, writer):
        """Write the `{arch}.*` metadata keys the converter writes, through a gguf.GGUFWriter."""
        raise NotImplementedError

    def gguf_tokenizer(self, writer, directory):
        """The vocabulary's tokenizer.* keys as the family's converter builds them (its set_vocab):
        by default from tokenizer.json (export_vocab.add_vocabulary). Returns the kind written
        (tokenizer.ggml.model: "gpt2" or "llama")."""
        from swtool.export_vocab import add_vocabulary

        return add_vocabulary(writer, directory, self.vocab_size)

    def gguf_vocabulary(self, writer, directory, kind):
        """Vocabulary keys the family's converter writes besides the tokenizer's own, which gguf_tokenizer
        has written (`kind`: its tokenizer.ggml.model): none by default."""

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        """config.json's family keys for a GGUF file of this family, from its metadata (a
        checkpoint.gguf_model.Hparams) and its tensors ({llama.cpp name: GGUFTensor}, read only
        for those in `gguf_derived`). Called only for the architectures in `gguf_reads`."""
        raise NotImplementedError

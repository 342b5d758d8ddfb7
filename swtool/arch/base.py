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

from swtool.errors import SwtoolError

# The observation points: where observers see activations [rows, tokens, channels] (forward.py).
DOWN_IN = "down_in"  # the input of layer i's down projection (the MLP's second matrix)
DOWN_OUT = "down_out"  # its raw output, before any post-norm or multiplier
RESID_MID = "resid_mid"  # the residual stream after attention, before the MLP adds to it
RESID = "resid"  # the residual stream after the block
POINTS = (DOWN_IN, DOWN_OUT, RESID_MID, RESID)


def positive_int(value):
    """Is `value` a count or a size: 4096 or 4096.0, not "4096", true or 0?"""
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return type(value) is not bool and integral and value > 0


class Architecture:
    model_types = ()  # config.json `model_type` values this class handles

    def __init__(self, config):
        self.config = config
        self.model_type = config.get("model_type")
        self.n_layers = self.require("num_hidden_layers", int)
        self.hidden_size = self.require("hidden_size", int)
        self.vocab_size = self.require("vocab_size", int)
        self.tied = False  # the LM head is the embedding matrix
        self.norm = None  # the family's norm (blocks.py), used by the default head

    def require(self, key, kind):
        """A config value that must be present, converted to `kind`, or a clear error.

        Every int a family requires is a size or a count, so it must be a positive integer.
        """
        value = self.config.get(key)
        if value is None:
            raise SwtoolError(f"config.json ({self.model_type}): missing {key!r}")
        if kind is int:
            if not positive_int(value):
                raise SwtoolError(f"config.json ({self.model_type}): {key!r} = {value!r} is not a positive integer")
            return int(value)
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise SwtoolError(f"config.json ({self.model_type}): {key!r} = {value!r} is not {kind.__name__}") from None

    def adapt(self, names):
        """Called once with the checkpoint's tensor names, before tensor_shapes(). Families whose
        checkpoints come in several layouts (per-expert or stacked mixture experts) pick theirs here."""

    # --- names ---------------------------------------------------------------------
    def down_proj_name(self, layer):
        """Hugging Face name of layer `layer`'s down projection (the MLP's second matrix).

        Mixtures take `down_proj_name(layer, expert)`: the tensor holding that expert's
        down projection, either its own 2-D tensor or a stacked [experts, out, in] one.
        """
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
        import gguf

        block = next((int(part) for part in hf_name.split(".") if part.isdigit()), -1)
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

    def gguf_extra_tensors(self):
        """{llama.cpp name: float32 array} of tensors the converter adds (none by default)."""
        return {}

    def gguf_hyperparameters(self, writer):
        """Write the `{arch}.*` metadata keys the converter writes, through a gguf.GGUFWriter."""
        raise NotImplementedError

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        """config.json's family keys for a GGUF file of this family, from its metadata (a
        checkpoint.gguf_model.Hparams) and its tensors ({llama.cpp name: GGUFTensor}, read only
        for those in `gguf_derived`). Called only for the architectures in `gguf_reads`."""
        raise NotImplementedError

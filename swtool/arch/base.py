"""What every architecture module provides to the streaming forward pass.

An architecture reads config.json once and then answers two kinds of question:
names (which tensor is layer i's down projection, what llama.cpp calls it) and
math (embed tokens, run block i, produce logits) through a `ctx` that reads
weights and applies edits and observers (see forward.py).
"""

from swtool.errors import SwtoolError


class Architecture:
    model_types = ()  # config.json `model_type` values this class handles

    def __init__(self, config):
        self.config = config
        self.model_type = config.get("model_type")
        self.n_layers = self.require("num_hidden_layers", int)
        self.hidden_size = self.require("hidden_size", int)
        self.vocab_size = self.require("vocab_size", int)

    def require(self, key, kind):
        """A config value that must be present, converted to `kind`, or a clear error.

        Every int a family requires is a size or a count, so it must be a positive integer
        (4096 or 4096.0, not "4096", true or 0).
        """
        value = self.config.get(key)
        if value is None:
            raise SwtoolError(f"config.json ({self.model_type}): missing {key!r}")
        if kind is int:
            integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
            if type(value) is bool or not integral or value <= 0:
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
        raise NotImplementedError

    def gguf_arch(self):
        """gguf.MODEL_ARCH member name llama.cpp uses for this model (e.g. "LLAMA")."""
        raise NotImplementedError

    def gguf_name(self, hf_name):
        """llama.cpp's name for a Hugging Face tensor name, from gguf-py's own name map.

        The map lists every tensor of every block it covers (7-30 ms for 32 layers), while a
        scan names one or two tensors of an early layer: so it first covers the blocks up to
        the one asked for, and all of them once a later block is asked for (an export asks
        for every tensor, block by block).
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

    def tensor_shapes(self):
        """{Hugging Face name: shape} of every tensor a forward pass reads, as config.json implies."""
        raise NotImplementedError

    def stored_transposed(self, hf_name):
        """Is this 2-D weight stored [in, out] (GPT-2's Conv1D) rather than nn.Linear's [out, in]?

        Such weights are used through ctx.linear(..., transposed=True); coordinates
        (edits, the catalog's row/col) still mean row = output, col = input.
        """
        return False

    # --- math ------------------------------------------------------------------------
    def embed(self, ctx, tokens):
        """Token ids [T] -> residual stream [T, hidden]."""
        raise NotImplementedError

    def block(self, ctx, layer, x):
        """Residual stream [W, T, hidden] in, residual stream out, after decoder block `layer`."""
        raise NotImplementedError

    def head(self, ctx, x):
        """Final norm and LM head: residual [W, T, hidden] -> logits [W, T, vocab]."""
        raise NotImplementedError

"""GPT-2: learned positions, LayerNorms with bias, a plain GELU MLP, Conv1D weights.

    x   = wte[tokens] + wpe[positions]
    h   = x + c_proj(attention(split(c_attn(ln_1(x)))))
    out = h + mlp.c_proj(gelu_new(mlp.c_fc(ln_2(h))))
    logits = ln_f(out) @ wte.T                  (lm_head tied to wte unless the config unties it)

Conv1D stores its weight transposed, [in, out], and computes x @ weight + bias.
swtool reads those four matrices (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
through `ctx.linear(..., transposed=True)`, so coordinates stay those of the
[out, in] matrix W = weight.T: the down projection's row j is an output
(residual) channel and col m an input (intermediate) channel, as in every other
family and as in llama.cpp's GGUF, whose converter transposes these tensors.
In the safetensors file that element is `mlp.c_proj.weight[m, j]`.

c_attn's output is all queries, then all keys, then all values (d each).
Attention scores are scaled by 1/sqrt(head_dim) (unless scale_attn_weights is
false) and also by 1/(layer + 1) with scale_attn_by_inverse_layer_idx.
Tensor names start with "transformer." when transformers saved the model, and
without it in the original OpenAI-converted checkpoints on the Hub.

GGUF: llama.cpp's converter writes GPT-2 as "gpt2" with the Conv1D weights
transposed to [out, in]; read from a GGUF file, the family takes them as they are
(use_gguf_layout), so nothing is transposed twice. Its feed_forward_length is
4 x n_embd whatever n_inner says: the file's tensors say the width.
"""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture, Args, Count, Positive
from swtool.errors import SwtoolError

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True, kw_only=True)
class GPT2Args(Args):
    # GPT-2's own names win over the generic ones: transformers reads only them
    aliases: ClassVar[dict] = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size",
                               "n_head": "num_attention_heads", "n_positions": "max_position_embeddings"}
    num_attention_heads: Count
    max_position_embeddings: Count
    n_inner: Count = None  # not intermediate_size, which GPT2Config ignores; None means 4 x hidden
    layer_norm_epsilon: Positive = 1e-5
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False


class GPT2(Architecture):
    model_types = ("gpt2",)
    Args = GPT2Args

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        n_heads = args.num_attention_heads
        self.heads = blocks.Heads(n_heads, n_heads, self.hidden_size // n_heads)
        self.n_positions = args.max_position_embeddings
        self.intermediate_size = args.n_inner or 4 * self.hidden_size
        self.norm = blocks.LayerNorm(args.layer_norm_epsilon)
        self.activation = blocks.activation(args.activation_function)
        self.tied = args.tie_word_embeddings
        self.scale_attn_weights = args.scale_attn_weights
        self.scale_by_layer = args.scale_attn_by_inverse_layer_idx
        self.prefix = "transformer."
        self.conv1d_transposed = True  # Conv1D weights stored [in, out]; a GGUF file's are [out, in]

    def adapt(self, names):
        """OpenAI-converted Hub checkpoints name tensors without the "transformer." prefix."""
        if "transformer.wte.weight" not in names and "wte.weight" in names:
            self.prefix = ""

    # --- names ---------------------------------------------------------------------
    def down_proj_name(self, layer):
        return f"{self.prefix}h.{layer}.mlp.c_proj.weight"

    def gguf_arch(self):
        return "GPT2"

    def use_gguf_layout(self):
        self.conv1d_transposed = False

    def stored_transposed(self, hf_name):
        return self.conv1d_transposed and hf_name.endswith(CONV1D)

    def tensor_shapes(self):
        """Stored shapes: Conv1D weights are [in, out] (a GGUF file's [out, in])."""
        d, ff, p = self.hidden_size, self.intermediate_size, self.prefix
        shapes = {p + "wte.weight": (self.vocab_size, d), p + "wpe.weight": (self.n_positions, d),
                  **self.norm.tensors(p + "ln_f", d)}
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        conv1d = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, ff), "mlp.c_proj": (ff, d)}
        for layer in range(self.n_layers):
            h = f"{p}h.{layer}."
            shapes.update(self.norm.tensors(h + "ln_1", d))
            shapes.update(self.norm.tensors(h + "ln_2", d))
            for name, (n_in, n_out) in conv1d.items():
                stored = (n_in, n_out) if self.conv1d_transposed else (n_out, n_in)
                shapes.update({f"{h}{name}.weight": stored, f"{h}{name}.bias": (n_out,)})
        return shapes

    # --- math ------------------------------------------------------------------------
    def embed(self, ctx, tokens):
        if ctx.n_tokens > self.n_positions:
            raise SwtoolError(f"the prompt has {ctx.n_tokens} tokens; GPT-2 ({self.model_type}) "
                              f"has learned positions for {self.n_positions}")
        positions = ctx.weight(self.prefix + "wpe.weight")[:ctx.n_tokens]  # [T, d], the same in every world
        return ctx.embedding(self.prefix + "wte.weight", tokens) + positions

    def block(self, ctx, layer, x):
        h = f"{self.prefix}h.{layer}."
        x = x + self.attention(ctx, layer, self.norm(ctx, x, h + "ln_1"))
        ctx.observe(RESID_MID, layer, x)
        x = x + blocks.plain_mlp(ctx, layer, self.norm(ctx, x, h + "ln_2"), h + "mlp.c_fc.weight",
                                 h + "mlp.c_proj.weight", self.activation, bias=True,
                                 transposed=self.conv1d_transposed)
        ctx.observe(RESID, layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"{self.prefix}h.{layer}.attn."
        qkv = ctx.linear(h, p + "c_attn.weight", bias=True, transposed=self.conv1d_transposed)
        q, k, v = np.split(qkv, 3, axis=-1)  # all queries, then all keys, then all values
        out = blocks.attend(ctx, self.heads, q, k, v, scale=self.attention_scale(layer))  # learned positions
        return ctx.linear(out, p + "c_proj.weight", bias=True, transposed=self.conv1d_transposed)

    def attention_scale(self, layer):
        scale = self.heads.dim ** -0.5 if self.scale_attn_weights else 1.0
        return scale / (layer + 1) if self.scale_by_layer else scale

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("gpt2",)

    def gguf_arch_name(self):
        return "gpt2"

    def gguf_hyperparameters(self, writer):
        """GPT2Model.set_gguf_parameters' keys, except that feed_forward_length is the MLP's width
        (the converter writes 4 x n_embd, which llama.cpp then refuses for any other n_inner)."""
        if self.scale_by_layer or not self.scale_attn_weights:
            raise SwtoolError("llama.cpp's gpt2 architecture scales attention by 1/sqrt(head_dim) only: "
                              "scale_attn_by_inverse_layer_idx and scale_attn_weights false cannot be exported")
        writer.add_block_count(self.n_layers)
        writer.add_context_length(self.n_positions)
        writer.add_embedding_length(self.hidden_size)
        writer.add_feed_forward_length(self.intermediate_size)
        writer.add_head_count(self.heads.n)
        writer.add_layer_norm_eps(self.norm.eps)

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        up = gguf_tensors.get("blk.0.ffn_up.weight")
        if up is None or len(up.shape) != 2:
            raise hparams.error("no 2-D tensor blk.0.ffn_up.weight, which says the MLP's width")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "n_layer": hparams("block_count"), "n_embd": hparams("embedding_length"),
                "n_head": hparams("attention.head_count"), "n_positions": hparams("context_length"),
                "n_inner": up.shape[0], "activation_function": "gelu_new",
                "layer_norm_epsilon": hparams.float32(hparams("attention.layer_norm_epsilon", kind=float))}

    def head(self, ctx, x):
        x = self.norm(ctx, x, self.prefix + "ln_f")
        return ctx.linear(x, self.prefix + "wte.weight" if self.tied else "lm_head.weight")

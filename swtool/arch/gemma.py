"""Gemma (1): Llama's block with three differences.

    x   = embed(tokens) * sqrt(hidden)
    h   = x + o_proj(attention(rope(q_proj(norm(x))), ..))
    out = h + down_proj(gelu_tanh(gate_proj(norm(h))) * up_proj(norm(h)))

  - every RMSNorm multiplies by (1 + weight): the stored weights are offsets from 1;
  - the MLP is GeGLU with the tanh approximation of GELU (configs that say
    "gelu" mean it too: transformers rewrites it to gelu_pytorch_tanh);
  - the embedding is scaled by sqrt(hidden) in the model's compute dtype. swtool
    computes in float32, so the factor is float32(sqrt(hidden)), as transformers
    uses for a float32 model (a bf16 transformers run rounds it).

head_dim defaults to 256 (Gemma 7B: 16 heads x 256 > hidden 3072) and the
embeddings are tied unless the config says otherwise.
"""

import numpy as np

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture
from swtool.errors import SwtoolError


class Gemma(Architecture):
    model_types = ("gemma",)

    def __init__(self, config):
        super().__init__(config)
        refuse_bidirectional(self)
        self.heads = blocks.attention_heads(self, head_dim=256)
        self.intermediate_size = self.require("intermediate_size", int)
        self.norm = blocks.RmsNorm(float(config.get("rms_norm_eps", 1e-6)), plus_one=True)
        self.tied = bool(config.get("tie_word_embeddings", True))
        name = config.get("hidden_act") or "gelu_pytorch_tanh"
        self.activation = blocks.activation("gelu_pytorch_tanh" if name == "gelu" else name)
        self.attn_bias = bool(config.get("attention_bias", False))

    def gguf_arch(self):
        return "GEMMA"

    def tensor_shapes(self):
        d, shapes = self.hidden_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(blocks.attention_tensors(p + "self_attn", d, self.heads, self.attn_bias, self.attn_bias))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(blocks.gated_mlp_tensors(p + "mlp", d, self.intermediate_size))
        return shapes

    def embed(self, ctx, tokens):
        return super().embed(ctx, tokens) * np.float32(self.hidden_size ** 0.5)

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + self.attention(ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
        ctx.observe(RESID_MID, layer, x)
        x = x + blocks.gated_mlp(ctx, layer, self.norm(ctx, x, p + "post_attention_layernorm"), p + "mlp",
                                 self.activation)
        ctx.observe(RESID, layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn"
        q, k, v = blocks.qkv_projections(ctx, h, p, self.attn_bias)
        out = blocks.attend(ctx, self.heads, q, k, v, rope=blocks.rope_tables(ctx, self.config, self.heads.dim))
        return ctx.linear(out, p + ".o_proj.weight", self.attn_bias)


def refuse_bidirectional(arch):
    """Gemma configs with use_bidirectional_attention are embedding models (Gemma 2 and 3 too)."""
    if arch.config.get("use_bidirectional_attention"):
        raise SwtoolError(f"config.json ({arch.model_type}): use_bidirectional_attention is set: "
                          f"an embedding model, not a causal language model")

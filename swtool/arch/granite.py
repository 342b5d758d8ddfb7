"""IBM Granite (3.x): Llama's block with four scalar multipliers from config.json.

    x      = embed(tokens) * embedding_multiplier
    h      = x + residual_multiplier * o_proj(attention(...))     q.k scaled by attention_multiplier
    out    = h + residual_multiplier * down_proj(silu(gate_proj(norm(h))) * up_proj(norm(h)))
    logits = lm_head(norm(out)) / logits_scaling

attention_multiplier replaces 1/sqrt(head_dim). "down_out" is observed raw,
before residual_multiplier scales it on its way into the residual stream.
"""

import numpy as np

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture


class Granite(Architecture):
    model_types = ("granite",)

    def __init__(self, config):
        super().__init__(config)
        self.heads = blocks.attention_heads(self)
        self.intermediate_size = self.require("intermediate_size", int)
        self.norm = blocks.RmsNorm(float(config.get("rms_norm_eps", 1e-6)))
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.activation = blocks.activation(config.get("hidden_act", "silu"))
        self.attn_bias = bool(config.get("attention_bias", False))
        self.mlp_bias = bool(config.get("mlp_bias", False))
        self.embedding_multiplier = np.float32(config.get("embedding_multiplier", 1.0))
        self.residual_multiplier = np.float32(config.get("residual_multiplier", 1.0))
        self.attention_multiplier = float(config.get("attention_multiplier", 1.0))
        self.logits_scaling = np.float32(config.get("logits_scaling", 1.0))

    def gguf_arch(self):
        return "GRANITE"

    def tensor_shapes(self):
        d, shapes = self.hidden_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(blocks.attention_tensors(p + "self_attn", d, self.heads, self.attn_bias, self.attn_bias))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(blocks.gated_mlp_tensors(p + "mlp", d, self.intermediate_size, self.mlp_bias))
        return shapes

    def embed(self, ctx, tokens):
        return super().embed(ctx, tokens) * self.embedding_multiplier

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + self.attention(ctx, layer, self.norm(ctx, x, p + "input_layernorm")) * self.residual_multiplier
        ctx.observe(RESID_MID, layer, x)
        down = blocks.gated_mlp(ctx, layer, self.norm(ctx, x, p + "post_attention_layernorm"), p + "mlp",
                                self.activation, self.mlp_bias)
        x = x + down * self.residual_multiplier
        ctx.observe(RESID, layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn"
        q, k, v = blocks.qkv_projections(ctx, h, p, self.attn_bias)
        out = blocks.attend(ctx, self.heads, q, k, v, rope=blocks.rope_tables(ctx, self.config, self.heads.dim),
                            scale=self.attention_multiplier)
        return ctx.linear(out, p + ".o_proj.weight", self.attn_bias)

    def head(self, ctx, x):
        return super().head(ctx, x) / self.logits_scaling

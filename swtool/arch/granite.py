"""IBM Granite (3.x): Llama's block with four scalar multipliers from config.json.

    x      = embed(tokens) * embedding_multiplier
    h      = x + residual_multiplier * o_proj(attention(...))     q.k scaled by attention_multiplier
    out    = h + residual_multiplier * down_proj(silu(gate_proj(norm(h))) * up_proj(norm(h)))
    logits = lm_head(norm(out)) / logits_scaling

attention_multiplier replaces 1/sqrt(head_dim). "down_out" is observed raw,
before residual_multiplier scales it on its way into the residual stream.
"""

import numpy as np

from swtool import ops
from swtool.arch.llama import Llama


class Granite(Llama):
    model_types = ("granite",)

    def __init__(self, config):
        super().__init__(config)
        self.embedding_multiplier = np.float32(config.get("embedding_multiplier", 1.0))
        self.residual_multiplier = np.float32(config.get("residual_multiplier", 1.0))
        self.attention_multiplier = float(config.get("attention_multiplier", 1.0))
        self.logits_scaling = np.float32(config.get("logits_scaling", 1.0))

    def gguf_arch(self):
        return "GRANITE"

    def attention_scale(self):
        return self.attention_multiplier

    def embed(self, ctx, tokens):
        return ctx.embedding("model.embed_tokens.weight", tokens) * self.embedding_multiplier

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        # attention sub-block: pre-norm, attend, scale, add
        h = ops.rms_norm(x, ctx.weight(p + "input_layernorm.weight"), self.eps)
        x = x + self.attention(ctx, layer, h) * self.residual_multiplier
        ctx.observe("resid_mid", layer, x)
        # MLP sub-block: pre-norm, gated activation, down projection, scale, add
        h = ops.rms_norm(x, ctx.weight(p + "post_attention_layernorm.weight"), self.eps)
        gate = ctx.linear(h, p + "mlp.gate_proj.weight", self.mlp_bias)
        up = ctx.linear(h, p + "mlp.up_proj.weight", self.mlp_bias)
        act = self.activation(gate) * up
        del gate, up
        ctx.observe("down_in", layer, act)
        down = ctx.linear(act, p + "mlp.down_proj.weight", self.mlp_bias)
        ctx.observe("down_out", layer, down)
        x = x + down * self.residual_multiplier
        ctx.observe("resid", layer, x)
        return x

    def head(self, ctx, x):
        return super().head(ctx, x) / self.logits_scaling

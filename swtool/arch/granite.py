"""IBM Granite (3.x): Llama's block with four scalar multipliers from config.json.

    x      = embed(tokens) * embedding_multiplier
    h      = x + residual_multiplier * o_proj(attention(...))     q.k scaled by attention_multiplier
    out    = h + residual_multiplier * down_proj(silu(gate_proj(norm(h))) * up_proj(norm(h)))
    logits = lm_head(norm(out)) / logits_scaling

attention_multiplier replaces 1/sqrt(head_dim). "down_out" is observed raw,
before residual_multiplier scales it on its way into the residual stream.
"""

from dataclasses import dataclass

import numpy as np

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture, DecoderArgs, Number, Positive


@dataclass(frozen=True, kw_only=True)
class GraniteArgs(DecoderArgs):
    embedding_multiplier: Number = 1.0
    residual_multiplier: Number = 1.0
    attention_multiplier: Number = 1.0
    logits_scaling: Positive = 1.0


class Granite(Architecture):
    model_types = ("granite",)
    Args = GraniteArgs

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.RmsNorm(args.rms_norm_eps)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_act)
        self.attn_bias, self.mlp_bias = args.attention_bias, args.mlp_bias
        self.embedding_multiplier = np.float32(args.embedding_multiplier)
        self.residual_multiplier = np.float32(args.residual_multiplier)
        self.attention_multiplier = args.attention_multiplier
        self.logits_scaling = np.float32(args.logits_scaling)

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

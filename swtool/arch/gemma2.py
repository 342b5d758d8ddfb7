"""Gemma 2: Gemma with every sub-block's output renormalised, and soft-capped scores.

    h   = x + post_attention_layernorm(attention(input_layernorm(x)))
    out = h + post_feedforward_layernorm(down_proj(gelu_tanh(gate_proj(n)) * up_proj(n))),
          n = pre_feedforward_layernorm(h)

All norms are Gemma's (1 + weight) RMSNorms. The down projection's raw output
passes through post_feedforward_layernorm before the residual add, so a super
weight's spike is observed ("down_out") before that norm: after it, no channel
can exceed sqrt(hidden) * |1 + weight|.

Gemma 2 also:
  - scales attention scores by query_pre_attn_scalar ** -0.5 (not head_dim);
  - soft-caps them, cap * tanh(score / cap), before the mask (attn_logit_softcapping),
    and the final logits likewise (final_logit_softcapping);
  - alternates sliding-window (even layers) and global attention (`layer_types`).
Gemma 3 (gemma3.py) keeps this block and changes its attention.
"""

import numpy as np

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture
from swtool.arch.gemma import refuse_bidirectional


class Gemma2(Architecture):
    model_types = ("gemma2",)

    def __init__(self, config):
        super().__init__(config)
        refuse_bidirectional(self)
        self.heads = blocks.attention_heads(self, head_dim=256)
        self.intermediate_size = self.require("intermediate_size", int)
        self.norm = blocks.RmsNorm(float(config.get("rms_norm_eps", 1e-6)), plus_one=True)
        self.tied = bool(config.get("tie_word_embeddings", True))
        # Gemma 2/3 read hidden_activation, taken literally (no "gelu" rewrite as in Gemma 1)
        self.activation = blocks.activation(config.get("hidden_activation") or "gelu_pytorch_tanh")
        self.attn_bias = bool(config.get("attention_bias", False))
        self.query_scale = float(config.get("query_pre_attn_scalar", 256)) ** -0.5
        self.attn_softcap = config.get("attn_logit_softcapping", 50.0)
        self.final_softcap = config.get("final_logit_softcapping", 30.0)

    def gguf_arch(self):
        return "GEMMA2"

    def tensor_shapes(self):
        return gemma2_tensors(self)

    def sliding_window(self, layer):
        return self.config.get("sliding_window") if layer_type(self.config, layer, 2) == "sliding_attention" else None

    def embed(self, ctx, tokens):
        return super().embed(ctx, tokens) * np.float32(self.hidden_size ** 0.5)

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        attn = self.attention(ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
        x = x + self.norm(ctx, attn, p + "post_attention_layernorm")
        ctx.observe(RESID_MID, layer, x)
        down = blocks.gated_mlp(ctx, layer, self.norm(ctx, x, p + "pre_feedforward_layernorm"), p + "mlp",
                                self.activation)
        x = x + self.norm(ctx, down, p + "post_feedforward_layernorm")
        ctx.observe(RESID, layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn"
        q, k, v = blocks.qkv_projections(ctx, h, p, self.attn_bias)
        out = blocks.attend(ctx, self.heads, q, k, v, rope=blocks.rope_tables(ctx, self.config, self.heads.dim),
                            window=self.sliding_window(layer), scale=self.query_scale, softcap=self.attn_softcap)
        return ctx.linear(out, p + ".o_proj.weight", self.attn_bias)

    def head(self, ctx, x):
        return softcap(super().head(ctx, x), self.final_softcap)


def softcap(logits, cap):
    """cap * tanh(logits / cap), or the logits when cap is None."""
    if cap is None:
        return logits
    cap = np.float32(cap)
    return np.tanh(logits / cap) * cap


def layer_type(config, layer, sliding_pattern):
    """ "sliding_attention" or "full_attention", from layer_types, else layer i slides unless
    (i + 1) is a multiple of `sliding_pattern`."""
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and layer < len(layer_types):
        return layer_types[layer]
    return "sliding_attention" if (layer + 1) % sliding_pattern else "full_attention"


def gemma2_tensors(arch):
    """Gemma 2 and 3: four norms around the two sub-blocks."""
    d, shapes = arch.hidden_size, arch.model_tensors()
    for layer in range(arch.n_layers):
        p = f"model.layers.{layer}."
        shapes.update(arch.norm.tensors(p + "input_layernorm", d))
        shapes.update(blocks.attention_tensors(p + "self_attn", d, arch.heads, arch.attn_bias, arch.attn_bias))
        shapes.update(arch.norm.tensors(p + "post_attention_layernorm", d))
        shapes.update(arch.norm.tensors(p + "pre_feedforward_layernorm", d))
        shapes.update(blocks.gated_mlp_tensors(p + "mlp", d, arch.intermediate_size))
        shapes.update(arch.norm.tensors(p + "post_feedforward_layernorm", d))
    return shapes

"""Gemma 2 and Gemma 3 (text): Gemma with every sub-block's output renormalised.

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

Gemma 3 (model_type "gemma3_text") replaces the attention soft-cap by RMSNorms on
each query and key head (transformers never applies attn_logit_softcapping to
it), slides the window on five of every six layers (`sliding_window_pattern`),
and gives sliding and global layers their own RoPE: base rope_local_base_freq
(10 000) unscaled for sliding layers, rope_theta (1 000 000) with rope_scaling
for global ones.
"""

import numpy as np

from swtool import ops
from swtool.arch.gemma import Gemma
from swtool.arch.rope import inv_freq


class Gemma2(Gemma):
    model_types = ("gemma2",)
    sliding_pattern = 2  # layer i slides unless (i + 1) is a multiple of this
    default_attn_softcap = 50.0
    default_final_softcap = 30.0

    def __init__(self, config):
        super().__init__(config)
        self.query_scale = float(config.get("query_pre_attn_scalar", 256)) ** -0.5
        self.attn_softcap = config.get("attn_logit_softcapping", self.default_attn_softcap)
        self.final_softcap = config.get("final_logit_softcapping", self.default_final_softcap)

    def activation_name(self):
        # Gemma 2/3 read hidden_activation, taken literally (no "gelu" rewrite as in Gemma 1)
        return self.config.get("hidden_activation") or "gelu_pytorch_tanh"

    def gguf_arch(self):
        return "GEMMA2"

    def tensor_shapes(self):
        shapes = super().tensor_shapes()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes[p + "pre_feedforward_layernorm.weight"] = (self.hidden_size,)
            shapes[p + "post_feedforward_layernorm.weight"] = (self.hidden_size,)
        return shapes

    def layer_type(self, layer):
        """ "sliding_attention" or "full_attention", from layer_types or the family's pattern."""
        layer_types = self.config.get("layer_types")
        if isinstance(layer_types, list) and layer < len(layer_types):
            return layer_types[layer]
        return "sliding_attention" if (layer + 1) % self.sliding_pattern else "full_attention"

    def sliding_window(self, layer):
        return self.config.get("sliding_window") if self.layer_type(layer) == "sliding_attention" else None

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        # attention sub-block: pre-norm, attention, post-norm, add
        attn = self.attention(ctx, layer, self.norm(ctx, p + "input_layernorm.weight", x))
        x = x + self.norm(ctx, p + "post_attention_layernorm.weight", attn)
        ctx.observe("resid_mid", layer, x)
        # MLP sub-block: pre-norm, GeGLU, down projection (observed raw), post-norm, add
        down = self.mlp(ctx, layer, self.norm(ctx, p + "pre_feedforward_layernorm.weight", x))
        x = x + self.norm(ctx, p + "post_feedforward_layernorm.weight", down)
        ctx.observe("resid", layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn."
        n_worlds, n_tokens, _ = h.shape
        q, k, v = self.project_heads(ctx, p, h)
        q, k = self.qk_norm(ctx, layer, q, k)
        cos, sin = self.layer_rope(ctx, layer)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        mask = ops.causal_mask(n_tokens, self.sliding_window(layer))
        out = ops.attention(q, k, v, mask, scale=self.query_scale, softcap=self.attn_softcap)
        out = out.transpose(0, 2, 1, 3).reshape(n_worlds, n_tokens, self.n_heads * self.head_dim)
        return ctx.linear(out, p + "o_proj.weight", self.o_bias)

    def qk_norm(self, ctx, layer, q, k):
        return q, k  # Gemma 2 has none

    def layer_rope(self, ctx, layer):
        return self.rope_tables(ctx)  # one RoPE for every layer

    def head(self, ctx, x):
        logits = super().head(ctx, x)
        if self.final_softcap is not None:
            cap = np.float32(self.final_softcap)
            logits = np.tanh(logits / cap) * cap
        return logits


class Gemma3(Gemma2):
    model_types = ("gemma3_text",)
    default_final_softcap = None

    def __init__(self, config):
        super().__init__(config)
        self.attn_softcap = None  # transformers' Gemma3Attention does not pass it on: q/k norms replace it
        self.sliding_pattern = int(config.get("sliding_window_pattern", 6))

    def gguf_arch(self):
        return "GEMMA3"

    def tensor_shapes(self):
        shapes = super().tensor_shapes()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}.self_attn."
            shapes[p + "q_norm.weight"] = shapes[p + "k_norm.weight"] = (self.head_dim,)
        return shapes

    def qk_norm(self, ctx, layer, q, k):
        """(1 + weight) RMSNorm over each head's head_dim values, before RoPE."""
        p = f"model.layers.{layer}.self_attn."
        return self.norm(ctx, p + "q_norm.weight", q), self.norm(ctx, p + "k_norm.weight", k)

    def layer_rope(self, ctx, layer):
        """cos/sin of this layer's type (sliding or global), computed once per pass per type."""
        layer_type = self.layer_type(layer)
        key = f"gemma3.rope.{layer_type}"
        if key not in ctx.cache:
            frequencies = inv_freq(self.rope_config(layer_type), self.head_dim, ctx.n_tokens)
            ctx.cache[key] = ops.rope_cos_sin(frequencies, np.arange(ctx.n_tokens))
        return ctx.cache[key]

    def rope_config(self, layer_type):
        """A config-like dict holding only this layer type's RoPE, in either config spelling."""
        config = {"max_position_embeddings": self.config.get("max_position_embeddings", 131072)}
        sliding = layer_type == "sliding_attention"
        params = self.config.get("rope_parameters")
        if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
            # transformers 5: {"sliding_attention": {...}, "full_attention": {...}}
            return {**config, "rope_parameters": {"rope_theta": 1e4 if sliding else 1e6, **params[layer_type]}}
        if sliding:
            # Hub configs: local layers use rope_local_base_freq and are never scaled
            return {**config, "rope_theta": self.config.get("rope_local_base_freq", 1e4)}
        return {**config, "rope_theta": self.config.get("rope_theta", 1e6), "rope_scaling": self.config.get("rope_scaling")}

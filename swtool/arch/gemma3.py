"""Gemma 3 (text): Gemma 2's block (gemma2.py) with a different attention.

    h   = x + post_attention_layernorm(attention(input_layernorm(x)))
    out = h + post_feedforward_layernorm(down_proj(gelu_tanh(gate_proj(n)) * up_proj(n))),
          n = pre_feedforward_layernorm(h)

The attention soft-cap is replaced by (1 + weight) RMSNorms on each query and key head,
before RoPE (transformers never applies attn_logit_softcapping to Gemma 3). The window
slides on five of every six layers (`sliding_window_pattern`, or `layer_types`), and
sliding and global layers have their own RoPE: base rope_local_base_freq (10 000)
unscaled for sliding layers, rope_theta (1 000 000) with rope_scaling for global ones.
The final logits are soft-capped only if the config says so.
"""

import numpy as np

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture
from swtool.arch.gemma import refuse_bidirectional
from swtool.arch.gemma2 import gemma2_tensors, layer_type, softcap


class Gemma3(Architecture):
    model_types = ("gemma3_text",)

    def __init__(self, config):
        super().__init__(config)
        refuse_bidirectional(self)
        self.heads = blocks.attention_heads(self, head_dim=256)
        self.intermediate_size = self.require("intermediate_size", int)
        self.norm = blocks.RmsNorm(float(config.get("rms_norm_eps", 1e-6)), plus_one=True)
        self.tied = bool(config.get("tie_word_embeddings", True))
        self.activation = blocks.activation(config.get("hidden_activation") or "gelu_pytorch_tanh")
        self.attn_bias = bool(config.get("attention_bias", False))
        self.query_scale = float(config.get("query_pre_attn_scalar", 256)) ** -0.5
        self.final_softcap = config.get("final_logit_softcapping")
        self.sliding_pattern = int(config.get("sliding_window_pattern", 6))

    def gguf_arch(self):
        return "GEMMA3"

    def tensor_shapes(self):
        shapes = gemma2_tensors(self)
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}.self_attn."
            shapes.update(self.norm.tensors(p + "q_norm", self.heads.dim))
            shapes.update(self.norm.tensors(p + "k_norm", self.heads.dim))
        return shapes

    def sliding_window(self, layer):
        sliding = layer_type(self.config, layer, self.sliding_pattern) == "sliding_attention"
        return self.config.get("sliding_window") if sliding else None

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
        kind = layer_type(self.config, layer, self.sliding_pattern)
        rope = blocks.rope_tables(ctx, self.rope_config(kind), self.heads.dim, key=f"rope.{kind}")
        out = blocks.attend(ctx, self.heads, q, k, v, rope=rope, window=self.sliding_window(layer),
                            scale=self.query_scale,
                            qk_norm=lambda q, k: (self.norm(ctx, q, p + ".q_norm"), self.norm(ctx, k, p + ".k_norm")))
        return ctx.linear(out, p + ".o_proj.weight", self.attn_bias)

    def head(self, ctx, x):
        return softcap(super().head(ctx, x), self.final_softcap)

    def rope_config(self, kind):
        """A config-like dict holding only this layer type's RoPE, in either config spelling."""
        config = {"max_position_embeddings": self.config.get("max_position_embeddings", 131072)}
        sliding = kind == "sliding_attention"
        params = self.config.get("rope_parameters")
        if isinstance(params, dict) and isinstance(params.get(kind), dict):
            # transformers 5: {"sliding_attention": {...}, "full_attention": {...}}
            return {**config, "rope_parameters": {"rope_theta": 1e4 if sliding else 1e6, **params[kind]}}
        if sliding:
            # Hub configs: local layers use rope_local_base_freq and are never scaled
            return {**config, "rope_theta": self.config.get("rope_local_base_freq", 1e4)}
        return {**config, "rope_theta": self.config.get("rope_theta", 1e6), "rope_scaling": self.config.get("rope_scaling")}

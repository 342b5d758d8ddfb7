"""OLMo (1) and OLMo 2: Llama-like blocks with different norms.

OLMo: every norm is a LayerNorm with no weight and no bias (eps fixed at 1e-5),
and `clip_qkv`, when set, clamps q, k and v to [-clip, clip] after projection:

    h   = x + o_proj(attention(clip(q_proj(ln(x))), clip(k_proj(..)), clip(v_proj(..))))
    out = h + down_proj(silu(gate_proj(ln(h))) * up_proj(ln(h)))

OLMo 2: no norm before the sub-blocks; instead each sub-block's output is
RMS-normalised before the residual add, and q/k get an RMSNorm over the whole
projection (all heads together, before the split into heads):

    h   = x + post_attention_layernorm(o_proj(attention(rope(q_norm(q_proj(x))), ..)))
    out = h + post_feedforward_layernorm(down_proj(silu(gate_proj(h)) * up_proj(h)))

So in OLMo 2 the down projection's raw output is renormalised before it reaches
the residual stream: "down_out" is observed before post_feedforward_layernorm.
"""

import numpy as np

from swtool import ops
from swtool.arch.llama import Llama

OLMO_LAYER_NORM_EPS = 1e-5  # OlmoLayerNorm ignores the config and uses this


class Olmo(Llama):
    model_types = ("olmo",)

    def __init__(self, config):
        super().__init__(config)
        clip = config.get("clip_qkv")
        self.clip_qkv = None if clip is None else float(clip)

    def gguf_arch(self):
        return "OLMO"

    def tensor_shapes(self):
        # Llama's tensors without any norm weight: OLMo's LayerNorms are non-parametric
        return {name: shape for name, shape in super().tensor_shapes().items() if not name.endswith("norm.weight")}

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        # attention sub-block: non-parametric LayerNorm, attention with clipped q/k/v, add
        h = ops.layer_norm(x, eps=OLMO_LAYER_NORM_EPS)
        x = x + self.attention(ctx, layer, h)
        ctx.observe("resid_mid", layer, x)
        # MLP sub-block: LayerNorm, SwiGLU, down projection, add
        h = ops.layer_norm(x, eps=OLMO_LAYER_NORM_EPS)
        act = self.activation(ctx.linear(h, p + "mlp.gate_proj.weight")) * ctx.linear(h, p + "mlp.up_proj.weight")
        ctx.observe("down_in", layer, act)
        down = ctx.linear(act, p + "mlp.down_proj.weight")
        ctx.observe("down_out", layer, down)
        x = x + down
        ctx.observe("resid", layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn."
        q = self.clip(ctx.linear(h, p + "q_proj.weight", self.qkv_bias))
        k = self.clip(ctx.linear(h, p + "k_proj.weight", self.qkv_bias))
        v = self.clip(ctx.linear(h, p + "v_proj.weight", self.qkv_bias))
        return self.attend(ctx, layer, q, k, v)

    def clip(self, x):
        return x if self.clip_qkv is None else np.clip(x, -self.clip_qkv, self.clip_qkv)

    def attend(self, ctx, layer, q, k, v):
        """Projected q, k, v [W, T, heads * d] -> rotate, causal attention, o_proj: [W, T, hidden]."""
        p = f"model.layers.{layer}.self_attn."
        n_worlds, n_tokens, _ = q.shape
        q = q.reshape(n_worlds, n_tokens, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(n_worlds, n_tokens, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(n_worlds, n_tokens, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        cos, sin = self.rope_tables(ctx)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        out = ops.attention(q, k, v, ops.causal_mask(n_tokens), scale=self.head_dim ** -0.5)
        out = out.transpose(0, 2, 1, 3).reshape(n_worlds, n_tokens, self.n_heads * self.head_dim)
        return ctx.linear(out, p + "o_proj.weight", self.o_bias)

    def head(self, ctx, x):
        x = ops.layer_norm(x, eps=OLMO_LAYER_NORM_EPS)
        lm_head = "model.embed_tokens.weight" if self.tied else "lm_head.weight"
        return ctx.linear(x, lm_head)


class Olmo2(Olmo):
    model_types = ("olmo2",)

    def __init__(self, config):
        super().__init__(config)
        self.clip_qkv = None  # OLMo 2 has no qkv clipping
        self.eps = float(config.get("rms_norm_eps", 1e-5))

    def gguf_arch(self):
        return "OLMO2"

    def tensor_shapes(self):
        shapes = super().tensor_shapes()
        d, q, kv = self.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        shapes["model.norm.weight"] = (d,)
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes[p + "post_attention_layernorm.weight"] = shapes[p + "post_feedforward_layernorm.weight"] = (d,)
            shapes[p + "self_attn.q_norm.weight"] = (q,)
            shapes[p + "self_attn.k_norm.weight"] = (kv,)
        return shapes

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        # attention sub-block on the raw residual; its output is normalised, then added
        attn = self.attention(ctx, layer, x)
        x = x + ops.rms_norm(attn, ctx.weight(p + "post_attention_layernorm.weight"), self.eps)
        ctx.observe("resid_mid", layer, x)
        # MLP sub-block on the raw residual; the raw down projection output is what detection sees
        act = self.activation(ctx.linear(x, p + "mlp.gate_proj.weight")) * ctx.linear(x, p + "mlp.up_proj.weight")
        ctx.observe("down_in", layer, act)
        down = ctx.linear(act, p + "mlp.down_proj.weight")
        ctx.observe("down_out", layer, down)
        x = x + ops.rms_norm(down, ctx.weight(p + "post_feedforward_layernorm.weight"), self.eps)
        ctx.observe("resid", layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn."
        # q/k norms span the whole projection (every head at once), before the split into heads;
        # clip is a no-op for OLMo 2 (OLMoE, a subclass, clamps after the norms)
        q = ops.rms_norm(ctx.linear(h, p + "q_proj.weight", self.qkv_bias), ctx.weight(p + "q_norm.weight"), self.eps)
        k = ops.rms_norm(ctx.linear(h, p + "k_proj.weight", self.qkv_bias), ctx.weight(p + "k_norm.weight"), self.eps)
        v = ctx.linear(h, p + "v_proj.weight", self.qkv_bias)
        return self.attend(ctx, layer, self.clip(q), self.clip(k), self.clip(v))

    def head(self, ctx, x):
        x = ops.rms_norm(x, ctx.weight("model.norm.weight"), self.eps)
        lm_head = "model.embed_tokens.weight" if self.tied else "lm_head.weight"
        return ctx.linear(x, lm_head)

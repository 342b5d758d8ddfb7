"""Phi-3 (and Phi-3.5 / Phi-4-mini): Llama's block with fused projections.

    q, k, v  = split(qkv_proj(norm(x)))                  one matrix [q + k + v rows, hidden]
    h        = x + o_proj(attention(rope(q), rope(k), v))
    gate, up = split(gate_up_proj(norm(h)))               one matrix [2 * intermediate, hidden]
    out      = h + down_proj(up * silu(gate))

The fused matrices are split along their output rows: qkv_proj holds all query
heads, then all key heads, then all value heads; gate_up_proj holds the gate
rows first, then the up rows. No biases anywhere.

RoPE: `longrope` (older configs say "su") divides each frequency by its own
factor, `short_factor` while the prompt fits the trained context
(original_max_position_embeddings) and `long_factor` beyond it, and multiplies
cos/sin by sqrt(1 + ln(factor) / ln(trained context)); see rope.py.
`partial_rotary_factor` < 1 rotates only the first dims of each head (Phi-4-mini).
A `sliding_window` in the config applies to every layer.
"""

from swtool import ops
from swtool.arch.llama import Llama


class Phi3(Llama):
    model_types = ("phi3",)

    def __init__(self, config):
        super().__init__(config)
        self.eps = float(config.get("rms_norm_eps", 1e-5))  # Phi3Config's default, not Llama's
        self.qkv_bias = self.o_bias = self.mlp_bias = False
        self.intermediate_size = self.require("intermediate_size", int)

    # --- names ---------------------------------------------------------------------
    def gguf_arch(self):
        return "PHI3"

    def tensor_shapes(self):
        d, q, kv, ff = self.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, \
            self.intermediate_size
        shapes = {"model.embed_tokens.weight": (self.vocab_size, d), "model.norm.weight": (d,)}
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (d,)
            shapes[p + "self_attn.qkv_proj.weight"] = (q + 2 * kv, d)
            shapes[p + "self_attn.o_proj.weight"] = (d, q)
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * ff, d)
            shapes[p + "mlp.down_proj.weight"] = (d, ff)
        return shapes

    def sliding_window(self, layer):
        return self.config.get("sliding_window")  # transformers masks every layer when it is set

    # --- math ------------------------------------------------------------------------
    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        # attention sub-block: pre-norm, fused q/k/v, rotate, attend, project back, add
        h = ops.rms_norm(x, ctx.weight(p + "input_layernorm.weight"), self.eps)
        x = x + self.attention(ctx, layer, h)
        ctx.observe("resid_mid", layer, x)
        # MLP sub-block: pre-norm, one fused gate/up product split in two, gated activation, down projection, add
        h = ops.rms_norm(x, ctx.weight(p + "post_attention_layernorm.weight"), self.eps)
        gate_up = ctx.linear(h, p + "mlp.gate_up_proj.weight")
        gate, up = gate_up[..., :self.intermediate_size], gate_up[..., self.intermediate_size:]
        act = up * self.activation(gate)
        del gate_up, gate, up
        ctx.observe("down_in", layer, act)
        down = ctx.linear(act, p + "mlp.down_proj.weight")
        ctx.observe("down_out", layer, down)
        x = x + down
        ctx.observe("resid", layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn."
        n_worlds, n_tokens, _ = h.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        qkv = ctx.linear(h, p + "qkv_proj.weight")
        # the fused rows: all query heads, then all key heads, then all value heads
        q = qkv[..., :q_size]
        k = qkv[..., q_size:q_size + kv_size]
        v = qkv[..., q_size + kv_size:]
        # [W, T, heads * d] -> [W, heads, T, d]
        q = q.reshape(n_worlds, n_tokens, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(n_worlds, n_tokens, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(n_worlds, n_tokens, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        cos, sin = self.rope_tables(ctx)  # partial rotary and longrope's scaling are in the tables
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        mask = ops.causal_mask(n_tokens, self.sliding_window(layer))
        out = ops.attention(q, k, v, mask, scale=self.attention_scale())
        out = out.transpose(0, 2, 1, 3).reshape(n_worlds, n_tokens, q_size)
        return ctx.linear(out, p + "o_proj.weight")

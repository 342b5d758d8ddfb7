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

from dataclasses import dataclass

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture, DecoderArgs, Positive


@dataclass(frozen=True, kw_only=True)
class Phi3Args(DecoderArgs):
    rms_norm_eps: Positive = 1e-5  # Phi3Config's default, not Llama's


class Phi3(Architecture):
    model_types = ("phi3",)
    Args = Phi3Args

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.RmsNorm(args.rms_norm_eps)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_act)

    def gguf_arch(self):
        return "PHI3"

    def tensor_shapes(self):
        d, ff, shapes = self.hidden_size, self.intermediate_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(blocks.linear(p + "self_attn.qkv_proj", self.heads.q_size + 2 * self.heads.kv_size, d))
            shapes.update(blocks.linear(p + "self_attn.o_proj", d, self.heads.q_size))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(blocks.linear(p + "mlp.gate_up_proj", 2 * ff, d))
            shapes.update(blocks.linear(p + "mlp.down_proj", d, ff))
        return shapes

    def sliding_window(self, layer):
        return self.args.sliding_window  # transformers masks every layer when it is set

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + self.attention(ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
        ctx.observe(RESID_MID, layer, x)
        x = x + self.mlp(ctx, layer, self.norm(ctx, x, p + "post_attention_layernorm"))
        ctx.observe(RESID, layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn."
        qkv = ctx.linear(h, p + "qkv_proj.weight")
        # the fused rows: all query heads, then all key heads, then all value heads
        q_size, kv_size = self.heads.q_size, self.heads.kv_size
        q, k, v = qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]
        # partial rotary and longrope's scaling are in the tables
        out = blocks.attend(ctx, self.heads, q, k, v, rope=blocks.rope_tables(ctx, self.config, self.heads.dim),
                            window=self.sliding_window(layer))
        return ctx.linear(out, p + "o_proj.weight")

    def mlp(self, ctx, layer, h):
        """One fused gate/up product split in two (gate rows first), gated activation, down projection."""
        p = f"model.layers.{layer}.mlp."
        gate_up = ctx.linear(h, p + "gate_up_proj.weight")
        gate, up = gate_up[..., :self.intermediate_size], gate_up[..., self.intermediate_size:]
        act = up * self.activation(gate)
        del gate_up, gate, up
        return blocks.down_projection(ctx, layer, act, p + "down_proj.weight")

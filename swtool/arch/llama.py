"""The Llama family: Llama 1/2/3, Mistral, Qwen2.

    h   = x + o_proj(attention(rope(q_proj(norm(x))), rope(k_proj(..)), v_proj(..)))
    out = h + down_proj(silu(gate_proj(norm(h))) * up_proj(norm(h)))

They differ only in config: Llama 3 scales RoPE frequencies (rope_type llama3),
Mistral may use a sliding attention window, Qwen2 has q/k/v biases and slides
its window only from `max_window_layers` on; GQA wherever
num_key_value_heads < num_attention_heads.
"""

import numpy as np

from swtool import ops
from swtool.arch.base import Architecture
from swtool.arch.rope import attention_factor, inv_freq, rotary_dim
from swtool.errors import SwtoolError

class Llama(Architecture):
    model_types = ("llama", "mistral", "qwen2")

    def __init__(self, config):
        super().__init__(config)
        self.n_heads = self.require("num_attention_heads", int)
        self.n_kv_heads = int(config.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(config.get("head_dim") or self.hidden_size // self.n_heads)
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.activation = _activation(config.get("hidden_act", "silu"))
        # which linears carry a bias: Llama's two flags, Qwen2's fixed q/k/v biases
        attn_bias = bool(config.get("attention_bias", False))
        self.qkv_bias = attn_bias or self.model_type == "qwen2"
        self.o_bias = attn_bias
        self.mlp_bias = bool(config.get("mlp_bias", False))
        if self.n_heads % self.n_kv_heads:
            raise SwtoolError(f"config.json: {self.n_heads} attention heads do not divide "
                              f"into {self.n_kv_heads} key/value heads")

    # --- names ---------------------------------------------------------------------
    def down_proj_name(self, layer):
        return f"model.layers.{layer}.mlp.down_proj.weight"

    def gguf_arch(self):
        return "QWEN2" if self.model_type == "qwen2" else "LLAMA"  # llama.cpp converts Mistral as llama

    def tensor_shapes(self):
        d, q, kv = self.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        ff = self.require("intermediate_size", int)
        shapes = {"model.embed_tokens.weight": (self.vocab_size, d), "model.norm.weight": (d,)}
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        linears = {"self_attn.q_proj": (q, d, self.qkv_bias), "self_attn.k_proj": (kv, d, self.qkv_bias),
                   "self_attn.v_proj": (kv, d, self.qkv_bias), "self_attn.o_proj": (d, q, self.o_bias),
                   "mlp.gate_proj": (ff, d, self.mlp_bias), "mlp.up_proj": (ff, d, self.mlp_bias),
                   "mlp.down_proj": (d, ff, self.mlp_bias)}
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (d,)
            for name, (n_out, n_in, has_bias) in linears.items():
                shapes[f"{p}{name}.weight"] = (n_out, n_in)
                if has_bias:
                    shapes[f"{p}{name}.bias"] = (n_out,)
        return shapes

    def sliding_window(self, layer):
        """Attention window of a layer in tokens, or None for full causal attention."""
        layer_types = self.config.get("layer_types")
        window = self.config.get("sliding_window")
        if isinstance(layer_types, list) and layer < len(layer_types):
            return window if layer_types[layer] == "sliding_attention" else None
        if self.model_type == "qwen2":
            use = self.config.get("use_sliding_window", False)
            return window if use and layer >= self.config.get("max_window_layers", 0) else None
        if self.model_type == "mistral":
            return window
        return None

    # --- math ------------------------------------------------------------------------
    def embed(self, ctx, tokens):
        return ctx.embedding("model.embed_tokens.weight", tokens)

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        # attention sub-block: pre-norm, project, rotate, attend, project back, add
        h = ops.rms_norm(x, ctx.weight(p + "input_layernorm.weight"), self.eps)
        x = x + self.attention(ctx, layer, h)
        ctx.observe("resid_mid", layer, x)
        # MLP sub-block: pre-norm, gated activation, down projection, add
        h = ops.rms_norm(x, ctx.weight(p + "post_attention_layernorm.weight"), self.eps)
        gate = ctx.linear(h, p + "mlp.gate_proj.weight", self.mlp_bias)
        up = ctx.linear(h, p + "mlp.up_proj.weight", self.mlp_bias)
        act = self.activation(gate) * up
        del gate, up
        ctx.observe("down_in", layer, act)
        down = ctx.linear(act, p + "mlp.down_proj.weight", self.mlp_bias)
        ctx.observe("down_out", layer, down)
        x = x + down
        ctx.observe("resid", layer, x)
        return x

    def project_heads(self, ctx, p, h):
        """q, k, v projections of h [W, T, hidden], split into heads: [W, heads, T, head_dim]."""
        n_worlds, n_tokens, _ = h.shape

        def split(x, n_heads):
            return x.reshape(n_worlds, n_tokens, n_heads, self.head_dim).transpose(0, 2, 1, 3)

        return (split(ctx.linear(h, p + "q_proj.weight", self.qkv_bias), self.n_heads),
                split(ctx.linear(h, p + "k_proj.weight", self.qkv_bias), self.n_kv_heads),
                split(ctx.linear(h, p + "v_proj.weight", self.qkv_bias), self.n_kv_heads))

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn."
        n_worlds, n_tokens, _ = h.shape
        q, k, v = self.project_heads(ctx, p, h)
        cos, sin = self.rope_tables(ctx)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        mask = ops.causal_mask(n_tokens, self.sliding_window(layer))
        out = ops.attention(q, k, v, mask, scale=self.attention_scale())
        out = out.transpose(0, 2, 1, 3).reshape(n_worlds, n_tokens, self.n_heads * self.head_dim)
        return ctx.linear(out, p + "o_proj.weight", self.o_bias)

    def attention_scale(self):
        """What q.k is multiplied by before the softmax (Granite sets its own)."""
        return self.head_dim ** -0.5

    def rope_tables(self, ctx):
        """cos/sin for the prompt's positions, computed once per pass.

        Only the first rotary_dim dims of a head rotate (partial_rotary_factor, e.g. Phi-4-mini);
        longrope also scales cos and sin (its attention factor), as transformers does.
        """
        key = "llama.rope"
        if key not in ctx.cache:
            frequencies = inv_freq(self.config, rotary_dim(self.config, self.head_dim), ctx.n_tokens)
            cos, sin = ops.rope_cos_sin(frequencies, np.arange(ctx.n_tokens))
            scale = np.float32(attention_factor(self.config))
            ctx.cache[key] = (cos * scale, sin * scale)
        return ctx.cache[key]

    def head(self, ctx, x):
        x = ops.rms_norm(x, ctx.weight("model.norm.weight"), self.eps)
        lm_head = "model.embed_tokens.weight" if self.tied else "lm_head.weight"
        return ctx.linear(x, lm_head)


def _activation(name):
    try:
        return ops.ACTIVATIONS[name]
    except KeyError:
        raise SwtoolError(f"config.json: hidden_act {name!r} is not supported "
                          f"(supported: {', '.join(ops.ACTIVATIONS)})") from None

"""StableLM (StableLM-2, StableLM-3B-4E1T, StableCode): Llama's SwiGLU MLP with LayerNorms.

Sequential residual (the default):

    h   = x + o_proj(attention(rope(qk_norm(q_proj(ln1(x)))), rope(qk_norm(k_proj(..))), v_proj(..)))
    out = h + down_proj(silu(gate_proj(ln2(h))) * up_proj(ln2(h)))

Parallel residual (`use_parallel_residual`, StableLM-2-12B): attention and MLP
both read the same input_layernorm(x), and there is no post_attention_layernorm:

    out = x + attention(ln1(x)) + mlp(ln1(x))

Every norm is a LayerNorm with weight and bias (eps = layer_norm_eps). Only
`partial_rotary_factor` of each head rotates (0.25 when the config names none).
`use_qkv_bias` puts biases on q/k/v (not on o_proj). `qk_layernorm` adds a
LayerNorm without bias to each query and key head, one weight vector per head
(`self_attn.q_layernorm.norms.{h}.weight`), before RoPE.
"""

import re

import numpy as np

from swtool import ops
from swtool.arch.llama import Llama
from swtool.arch.rope import attention_factor, inv_freq, rotary_dim

STABLELM_ROTARY_DEFAULT = 0.25  # StableLmConfig's partial_rotary_factor when config.json names none
PER_HEAD_NORM = re.compile(r"^(model\.layers\.\d+\.self_attn\.[qk]_layernorm)\.norms\.\d+\.weight$")


class StableLm(Llama):
    model_types = ("stablelm",)

    def __init__(self, config):
        super().__init__(config)
        self.head_dim = self.hidden_size // self.n_heads  # StableLmAttention ignores config head_dim
        self.eps = float(config.get("layer_norm_eps", 1e-5))
        self.qkv_bias = bool(config.get("use_qkv_bias", False))
        self.o_bias = self.mlp_bias = False
        self.parallel = bool(config.get("use_parallel_residual", False))
        self.qk_norm = bool(config.get("qk_layernorm", False))

    # --- names ---------------------------------------------------------------------
    def gguf_arch(self):
        return "STABLELM"

    def gguf_name(self, hf_name):
        """llama.cpp stacks the per-head q/k norms into one [heads, head_dim] tensor, blk.N.attn_{q,k}_norm."""
        stacked = PER_HEAD_NORM.match(hf_name)
        return super().gguf_name(stacked.group(1) + ".weight" if stacked else hf_name)

    def tensor_shapes(self):
        d = self.hidden_size
        shapes = super().tensor_shapes()  # Llama's names and linears, with this family's bias flags
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes[p + "input_layernorm.bias"] = (d,)
            if self.parallel:
                del shapes[p + "post_attention_layernorm.weight"]
            else:
                shapes[p + "post_attention_layernorm.bias"] = (d,)
            if self.qk_norm:
                for h in range(self.n_heads):
                    shapes[f"{p}self_attn.q_layernorm.norms.{h}.weight"] = (self.head_dim,)
                for h in range(self.n_kv_heads):
                    shapes[f"{p}self_attn.k_layernorm.norms.{h}.weight"] = (self.head_dim,)
        shapes["model.norm.bias"] = (d,)
        return shapes

    def rope_tables(self, ctx):
        """As Llama's, but a quarter of each head rotates when the config does not say."""
        key = "stablelm.rope"
        if key not in ctx.cache:
            dim = rotary_dim(self.config, self.head_dim, default=STABLELM_ROTARY_DEFAULT)
            cos, sin = ops.rope_cos_sin(inv_freq(self.config, dim, ctx.n_tokens), np.arange(ctx.n_tokens))
            scale = np.float32(attention_factor(self.config))
            ctx.cache[key] = (cos * scale, sin * scale)
        return ctx.cache[key]

    # --- math ------------------------------------------------------------------------
    def layer_norm(self, ctx, x, prefix):
        return ops.layer_norm(x, ctx.weight(prefix + ".weight"), ctx.weight(prefix + ".bias"), self.eps)

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        h = self.layer_norm(ctx, x, p + "input_layernorm")
        attn = self.attention(ctx, layer, h)
        if self.parallel:
            # parallel residual: the MLP reads the same normed input as attention.
            # "resid_mid" is x + attention: the residual before the MLP's contribution is added
            x = x + attn
            ctx.observe("resid_mid", layer, x)
        else:
            x = x + attn
            ctx.observe("resid_mid", layer, x)
            h = self.layer_norm(ctx, x, p + "post_attention_layernorm")
        del attn
        # MLP: gated activation, down projection, add
        act = self.activation(ctx.linear(h, p + "mlp.gate_proj.weight")) * ctx.linear(h, p + "mlp.up_proj.weight")
        ctx.observe("down_in", layer, act)
        down = ctx.linear(act, p + "mlp.down_proj.weight")
        ctx.observe("down_out", layer, down)
        x = x + down
        ctx.observe("resid", layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn."
        n_worlds, n_tokens, _ = h.shape
        q, k, v = self.project_heads(ctx, p, h)
        if self.qk_norm:
            # one bias-free LayerNorm per head, each with its own weight
            q = self.per_head_norm(ctx, q, p + "q_layernorm")
            k = self.per_head_norm(ctx, k, p + "k_layernorm")
        cos, sin = self.rope_tables(ctx)  # only the first rotary_dim dims of a head rotate
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        mask = ops.causal_mask(n_tokens, self.sliding_window(layer))
        out = ops.attention(q, k, v, mask, scale=self.attention_scale())
        out = out.transpose(0, 2, 1, 3).reshape(n_worlds, n_tokens, self.n_heads * self.head_dim)
        return ctx.linear(out, p + "o_proj.weight", self.o_bias)

    def per_head_norm(self, ctx, x, prefix):
        """x [W, heads, T, d]: head h normalised with its own weight norms.{h}."""
        weights = np.stack([ctx.weight(f"{prefix}.norms.{h}.weight") for h in range(x.shape[1])])
        return ops.layer_norm(x, weights[None, :, None, :], None, self.eps)

    def head(self, ctx, x):
        x = self.layer_norm(ctx, x, "model.norm")
        lm_head = "model.embed_tokens.weight" if self.tied else "lm_head.weight"
        return ctx.linear(x, lm_head)

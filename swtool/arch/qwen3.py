"""Qwen3: Llama's block with an RMSNorm on every query and key head before RoPE.

    q = rope(rms_norm_per_head(q_proj(norm(x)))), k likewise, v = v_proj(norm(x))

The q/k norms have one weight vector of size head_dim, shared by all heads.
No q/k/v biases (unlike Qwen2) unless `attention_bias`; head_dim comes from
the config (128 when absent, transformers' default), not hidden / heads.
"""

from swtool import ops
from swtool.arch.llama import Llama


class Qwen3(Llama):
    model_types = ("qwen3",)

    def __init__(self, config):
        super().__init__(config)
        self.head_dim = int(config.get("head_dim") or 128)

    def gguf_arch(self):
        return "QWEN3"

    def tensor_shapes(self):
        shapes = super().tensor_shapes()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}.self_attn."
            shapes[p + "q_norm.weight"] = shapes[p + "k_norm.weight"] = (self.head_dim,)
        return shapes

    def sliding_window(self, layer):
        """Without layer_types the window slides from max_window_layers on."""
        return qwen_window(self.config, layer, lambda i: i >= self.config.get("max_window_layers", 28))

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn."
        n_worlds, n_tokens, _ = h.shape
        q = ctx.linear(h, p + "q_proj.weight", self.qkv_bias)
        k = ctx.linear(h, p + "k_proj.weight", self.qkv_bias)
        v = ctx.linear(h, p + "v_proj.weight", self.qkv_bias)
        # [W, T, heads * d] -> [W, T, heads, d]: the q/k norms act on each head's d values
        q = q.reshape(n_worlds, n_tokens, self.n_heads, self.head_dim)
        k = k.reshape(n_worlds, n_tokens, self.n_kv_heads, self.head_dim)
        v = v.reshape(n_worlds, n_tokens, self.n_kv_heads, self.head_dim)
        q = ops.rms_norm(q, ctx.weight(p + "q_norm.weight"), self.eps)
        k = ops.rms_norm(k, ctx.weight(p + "k_norm.weight"), self.eps)
        # -> [W, heads, T, d], rotate, attend
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        cos, sin = self.rope_tables(ctx)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        mask = ops.causal_mask(n_tokens, self.sliding_window(layer))
        out = ops.attention(q, k, v, mask, scale=self.head_dim ** -0.5)
        out = out.transpose(0, 2, 1, 3).reshape(n_worlds, n_tokens, self.n_heads * self.head_dim)
        return ctx.linear(out, p + "o_proj.weight", self.o_bias)


def qwen_window(config, layer, slides_by_default):
    """Attention window of a Qwen-family layer, or None: transformers drops the window entirely
    unless use_sliding_window; then layer_types says, or (Hub configs without them) the family's
    default rule `slides_by_default(layer)`."""
    window = config.get("sliding_window")
    if not config.get("use_sliding_window", False) or window is None:
        return None
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and layer < len(layer_types):
        return window if layer_types[layer] == "sliding_attention" else None
    return window if slides_by_default(layer) else None

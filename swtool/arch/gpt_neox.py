"""GPT-NeoX (Pythia, GPT-NeoX-20B, RedPajama-INCITE, ...).

Parallel residual (`use_parallel_residual`, the default and what Pythia uses):
attention and MLP read the layer input, each through its own LayerNorm, and
both outputs are added to it at once:

    out = x + dense(attention(ln1(x))) + dense_4h_to_h(gelu(dense_h_to_4h(ln2(x))))

Sequential residual (use_parallel_residual false) is the usual pre-norm block:

    h   = x + dense(attention(ln1(x)))
    out = h + dense_4h_to_h(gelu(dense_h_to_4h(ln2(h))))

For the parallel block "resid_mid" is x + attention: the residual before the
MLP's contribution is added, so "resid" - "resid_mid" is the MLP's output, as
in the sequential block.

The down projection is `mlp.dense_4h_to_h` (nn.Linear, [hidden, intermediate]).
Every linear and LayerNorm has a bias (`attention_bias` can drop the attention
ones). `query_key_value` is fused per head: its output rows hold, head after
head, that head's q, k and v ([heads, 3, head_size]), not all queries first.
Only `rotary_pct` (transformers 5: partial_rotary_factor; 0.25 when absent) of
each head rotates, with base `rotary_emb_base` (or rope_theta). The LM head is
`embed_out` in Hub checkpoints (transformers 5 calls the module lm_head).
"""

import numpy as np

from swtool import ops
from swtool.arch.base import Architecture
from swtool.arch.llama import _activation
from swtool.arch.rope import attention_factor, inv_freq, rotary_dim

NEOX_ROTARY_DEFAULT = 0.25  # GPTNeoXConfig's rotary_pct when config.json names none
HEAD_NAMES = ("embed_out.weight", "lm_head.weight")  # Hub checkpoints, then transformers 5's module name


class GPTNeoX(Architecture):
    model_types = ("gpt_neox",)

    def __init__(self, config):
        super().__init__(config)
        self.n_heads = self.require("num_attention_heads", int)
        self.head_size = self.hidden_size // self.n_heads
        self.intermediate_size = self.require("intermediate_size", int)
        self.eps = float(config.get("layer_norm_eps", 1e-5))
        self.parallel = bool(config.get("use_parallel_residual", True))
        self.attention_bias = bool(config.get("attention_bias", True))
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.activation = _activation(config.get("hidden_act", "gelu"))
        # RoPE settings under this family's names (rotary_emb_base), read by rope.py as rope_theta
        self.rope_config = dict(config)
        if "rotary_emb_base" in config and "rope_theta" not in config:
            self.rope_config["rope_theta"] = config["rotary_emb_base"]
        self.lm_head = HEAD_NAMES[0]

    def adapt(self, names):
        """The untied LM head is `embed_out` on the Hub; a checkpoint may call it lm_head."""
        if HEAD_NAMES[0] not in names and HEAD_NAMES[1] in names:
            self.lm_head = HEAD_NAMES[1]

    # --- names ---------------------------------------------------------------------
    def down_proj_name(self, layer):
        return f"gpt_neox.layers.{layer}.mlp.dense_4h_to_h.weight"

    def gguf_arch(self):
        return "GPTNEOX"

    def tensor_shapes(self):
        d, ff = self.hidden_size, self.intermediate_size
        shapes = {"gpt_neox.embed_in.weight": (self.vocab_size, d),
                  "gpt_neox.final_layer_norm.weight": (d,), "gpt_neox.final_layer_norm.bias": (d,)}
        if not self.tied:
            shapes[self.lm_head] = (self.vocab_size, d)
        linears = {"attention.query_key_value": (3 * d, d, self.attention_bias),
                   "attention.dense": (d, d, self.attention_bias),
                   "mlp.dense_h_to_4h": (ff, d, True), "mlp.dense_4h_to_h": (d, ff, True)}
        for layer in range(self.n_layers):
            p = f"gpt_neox.layers.{layer}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                shapes[f"{p}{norm}.weight"] = shapes[f"{p}{norm}.bias"] = (d,)
            for name, (n_out, n_in, has_bias) in linears.items():
                shapes[f"{p}{name}.weight"] = (n_out, n_in)
                if has_bias:
                    shapes[f"{p}{name}.bias"] = (n_out,)
        return shapes

    # --- math ------------------------------------------------------------------------
    def embed(self, ctx, tokens):
        return ctx.embedding("gpt_neox.embed_in.weight", tokens)

    def layer_norm(self, ctx, x, prefix):
        return ops.layer_norm(x, ctx.weight(prefix + ".weight"), ctx.weight(prefix + ".bias"), self.eps)

    def block(self, ctx, layer, x):
        p = f"gpt_neox.layers.{layer}."
        attn = self.attention(ctx, layer, self.layer_norm(ctx, x, p + "input_layernorm"))
        if self.parallel:
            h = self.layer_norm(ctx, x, p + "post_attention_layernorm")  # the MLP reads the layer input
            x = x + attn  # resid_mid: the residual before the MLP's contribution
        else:
            x = x + attn
            h = self.layer_norm(ctx, x, p + "post_attention_layernorm")
        del attn
        ctx.observe("resid_mid", layer, x)
        # MLP: up, GELU, down (dense_4h_to_h), add
        act = self.activation(ctx.linear(h, p + "mlp.dense_h_to_4h.weight", bias=True))
        ctx.observe("down_in", layer, act)
        down = ctx.linear(act, p + "mlp.dense_4h_to_h.weight", bias=True)
        ctx.observe("down_out", layer, down)
        x = x + down
        ctx.observe("resid", layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"gpt_neox.layers.{layer}.attention."
        n_worlds, n_tokens, _ = h.shape
        qkv = ctx.linear(h, p + "query_key_value.weight", self.attention_bias)
        # fused per head: [W, T, heads, 3 * head_size] -> q, k, v each [W, heads, T, head_size]
        qkv = qkv.reshape(n_worlds, n_tokens, self.n_heads, 3 * self.head_size).transpose(0, 2, 1, 3)
        q, k, v = np.split(qkv, 3, axis=-1)
        cos, sin = self.rope_tables(ctx)  # only the first rotary_dim dims of each head rotate
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        out = ops.attention(q, k, v, ops.causal_mask(n_tokens), scale=self.head_size ** -0.5)
        out = out.transpose(0, 2, 1, 3).reshape(n_worlds, n_tokens, self.hidden_size)
        return ctx.linear(out, p + "dense.weight", self.attention_bias)

    def rope_tables(self, ctx):
        key = "gpt_neox.rope"
        if key not in ctx.cache:
            dim = rotary_dim(self.rope_config, self.head_size, default=NEOX_ROTARY_DEFAULT)
            cos, sin = ops.rope_cos_sin(inv_freq(self.rope_config, dim, ctx.n_tokens), np.arange(ctx.n_tokens))
            scale = np.float32(attention_factor(self.rope_config))
            ctx.cache[key] = (cos * scale, sin * scale)
        return ctx.cache[key]

    def head(self, ctx, x):
        x = self.layer_norm(ctx, x, "gpt_neox.final_layer_norm")
        return ctx.linear(x, "gpt_neox.embed_in.weight" if self.tied else self.lm_head)

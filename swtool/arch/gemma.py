"""The Gemma family: Gemma (1), Gemma 2 and Gemma 3 (text).

Gemma (1): Llama's block with three differences.

    x   = embed(tokens) * sqrt(hidden)
    h   = x + o_proj(attention(rope(q_proj(norm(x))), ..))
    out = h + down_proj(gelu_tanh(gate_proj(norm(h))) * up_proj(norm(h)))

  - every RMSNorm multiplies by (1 + weight): the stored weights are offsets from 1;
  - the MLP is GeGLU with the tanh approximation of GELU (configs that say
    "gelu" mean it too: transformers rewrites it to gelu_pytorch_tanh);
  - the embedding is scaled by sqrt(hidden) in the model's compute dtype. swtool
    computes in float32, so the factor is float32(sqrt(hidden)), as transformers
    uses for a float32 model (a bf16 transformers run rounds it).

head_dim defaults to 256 (Gemma 7B: 16 heads x 256 > hidden 3072) and the
embeddings are tied unless the config says otherwise.

Gemma 2: Gemma with every sub-block's output renormalised, and soft-capped scores.

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

Gemma 3 (model_type gemma3_text): Gemma 2's block with a different attention.
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
from swtool.errors import SwtoolError


class Gemma(Architecture):
    model_types = ("gemma",)

    def __init__(self, config):
        super().__init__(config)
        refuse_bidirectional(self)
        self.heads = blocks.attention_heads(self, head_dim=256)
        self.intermediate_size = self.require("intermediate_size", int)
        self.norm = blocks.RmsNorm(float(config.get("rms_norm_eps", 1e-6)), plus_one=True)
        self.tied = bool(config.get("tie_word_embeddings", True))
        name = config.get("hidden_act") or "gelu_pytorch_tanh"
        self.activation = blocks.activation("gelu_pytorch_tanh" if name == "gelu" else name)
        self.attn_bias = bool(config.get("attention_bias", False))

    def gguf_arch(self):
        return "GEMMA"

    def tensor_shapes(self):
        d, shapes = self.hidden_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(blocks.attention_tensors(p + "self_attn", d, self.heads, self.attn_bias, self.attn_bias))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(blocks.gated_mlp_tensors(p + "mlp", d, self.intermediate_size))
        return shapes

    def embed(self, ctx, tokens):
        return super().embed(ctx, tokens) * np.float32(self.hidden_size ** 0.5)

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + self.attention(ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
        ctx.observe(RESID_MID, layer, x)
        x = x + blocks.gated_mlp(ctx, layer, self.norm(ctx, x, p + "post_attention_layernorm"), p + "mlp",
                                 self.activation)
        ctx.observe(RESID, layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn"
        q, k, v = blocks.qkv_projections(ctx, h, p, self.attn_bias)
        out = blocks.attend(ctx, self.heads, q, k, v, rope=blocks.rope_tables(ctx, self.config, self.heads.dim))
        return ctx.linear(out, p + ".o_proj.weight", self.attn_bias)


def refuse_bidirectional(arch):
    """Gemma configs with use_bidirectional_attention are embedding models (Gemma 2 and 3 too)."""
    if arch.config.get("use_bidirectional_attention"):
        raise SwtoolError(f"config.json ({arch.model_type}): use_bidirectional_attention is set: "
                          f"an embedding model, not a causal language model")


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

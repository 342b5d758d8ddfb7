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

from dataclasses import dataclass

import numpy as np

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture, Count, DecoderArgs, Positive, null_is_off
from swtool.errors import SwtoolError



def scaled_embed(self, ctx, tokens):
    """Gemma's embedding lookup, times sqrt(hidden_size) (every Gemma)."""
    return Architecture.embed(self, ctx, tokens) * np.float32(self.hidden_size ** 0.5)


def sandwich_block(self, ctx, layer, x):
    """Gemma 2 and 3: each sub-block's input and output are normalised (four norms a layer)."""
    p = f"model.layers.{layer}."
    attn = self.attention(ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
    x = x + self.norm(ctx, attn, p + "post_attention_layernorm")
    ctx.observe(RESID_MID, layer, x)
    down = blocks.gated_mlp(ctx, layer, self.norm(ctx, x, p + "pre_feedforward_layernorm"), p + "mlp",
                            self.activation)
    x = x + self.norm(ctx, down, p + "post_feedforward_layernorm")
    ctx.observe(RESID, layer, x)
    return x


def softcapped_head(self, ctx, x):
    """Gemma 2 and 3: the logits soft-capped (when the config names a cap)."""
    return softcap(Architecture.head(self, ctx, x), self.final_softcap)

def refuse_bidirectional(args):
    """Gemma configs with bidirectional attention are embedding models (EmbeddingGemma)."""
    if args.use_bidirectional_attention:
        raise SwtoolError(f"config.json ({args.model_type}): use_bidirectional_attention is set: "
                          f"an embedding model, not a causal language model")


@dataclass(frozen=True, kw_only=True)
class GemmaArgs(DecoderArgs):
    head_dim: Count = 256
    tie_word_embeddings: bool = True
    hidden_act: str = "gelu_pytorch_tanh"
    use_bidirectional_attention: bool = False

    def check(self):
        super().check()
        refuse_bidirectional(self)


class Gemma(Architecture):
    model_types = ("gemma",)
    Args = GemmaArgs

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.RmsNorm(args.rms_norm_eps, plus_one=True)
        self.tied = args.tie_word_embeddings
        # transformers runs "gelu" as gelu_pytorch_tanh in Gemma 1
        self.activation = blocks.activation("gelu_pytorch_tanh" if args.hidden_act == "gelu" else args.hidden_act)
        self.attn_bias = args.attention_bias

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

    embed = scaled_embed

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


@dataclass(frozen=True, kw_only=True)
class Gemma2Args(DecoderArgs):
    head_dim: Count = 256
    tie_word_embeddings: bool = True
    hidden_act: str = "gelu_pytorch_tanh"
    hidden_activation: str = "gelu_pytorch_tanh"  # read literally (no "gelu" rewrite as in Gemma 1)
    use_bidirectional_attention: bool = False
    query_pre_attn_scalar: Positive = 256
    attn_logit_softcapping: Positive = null_is_off(50.0)
    final_logit_softcapping: Positive = null_is_off(30.0)

    def check(self):
        super().check()
        refuse_bidirectional(self)


class Gemma2(Architecture):
    model_types = ("gemma2",)
    Args = Gemma2Args

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.RmsNorm(args.rms_norm_eps, plus_one=True)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_activation)
        self.attn_bias = args.attention_bias
        self.query_scale = args.query_pre_attn_scalar ** -0.5
        self.attn_softcap = args.attn_logit_softcapping
        self.final_softcap = args.final_logit_softcapping

    def gguf_arch(self):
        return "GEMMA2"

    def tensor_shapes(self):
        return gemma2_tensors(self)

    def sliding_window(self, layer):
        return self.args.sliding_window if sliding(self.args, layer, 2) else None

    embed = scaled_embed

    block = sandwich_block

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn"
        q, k, v = blocks.qkv_projections(ctx, h, p, self.attn_bias)
        out = blocks.attend(ctx, self.heads, q, k, v, rope=blocks.rope_tables(ctx, self.config, self.heads.dim),
                            window=self.sliding_window(layer), scale=self.query_scale, softcap=self.attn_softcap)
        return ctx.linear(out, p + ".o_proj.weight", self.attn_bias)

    head = softcapped_head


def softcap(logits, cap):
    """cap * tanh(logits / cap), or the logits when cap is None."""
    if cap is None:
        return logits
    cap = np.float32(cap)
    return np.tanh(logits / cap) * cap


def sliding(args, layer, pattern):
    """Does `layer` attend through a sliding window? layer_types says, else layer i slides unless
    (i + 1) is a multiple of `pattern`."""
    slides = args.layer_slides(layer)
    return bool((layer + 1) % pattern) if slides is None else slides


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


@dataclass(frozen=True, kw_only=True)
class Gemma3Args(DecoderArgs):
    head_dim: Count = 256
    tie_word_embeddings: bool = True
    hidden_act: str = "gelu_pytorch_tanh"
    hidden_activation: str = "gelu_pytorch_tanh"
    use_bidirectional_attention: bool = False
    query_pre_attn_scalar: Positive = 256
    attn_logit_softcapping: Positive = null_is_off(50.0)
    final_logit_softcapping: Positive = None  # no soft-cap unless the config names one
    sliding_window_pattern: Count = 6  # without layer_types, layer i slides unless (i + 1) is a multiple

    def check(self):
        super().check()
        refuse_bidirectional(self)


class Gemma3(Architecture):
    model_types = ("gemma3_text",)
    Args = Gemma3Args

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.RmsNorm(args.rms_norm_eps, plus_one=True)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_activation)
        self.attn_bias = args.attention_bias
        self.query_scale = args.query_pre_attn_scalar ** -0.5
        self.final_softcap = args.final_logit_softcapping

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
        return self.args.sliding_window if sliding(self.args, layer, self.args.sliding_window_pattern) else None

    embed = scaled_embed

    block = sandwich_block

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn"
        q, k, v = blocks.qkv_projections(ctx, h, p, self.attn_bias)
        kind = "sliding_attention" if sliding(self.args, layer, self.args.sliding_window_pattern) else "full_attention"
        rope = blocks.rope_tables(ctx, self.rope_config(kind), self.heads.dim, key=f"rope.{kind}")
        out = blocks.attend(ctx, self.heads, q, k, v, rope=rope, window=self.sliding_window(layer),
                            scale=self.query_scale,
                            qk_norm=lambda q, k: (self.norm(ctx, q, p + ".q_norm"), self.norm(ctx, k, p + ".k_norm")))
        return ctx.linear(out, p + ".o_proj.weight", self.attn_bias)

    head = softcapped_head

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

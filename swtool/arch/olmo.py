"""The OLMo family: OLMo (1), OLMo 2 and OLMoE, Llama-like blocks with different norms.

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

OLMoE: OLMo 2's attention and a sparse mixture of experts (moe.py), in pre-norm Llama-style blocks.

    h      = x + o_proj(attention(rope(clip(q_norm(q_proj(norm(x))))), rope(clip(k_norm(..))), clip(v_proj(..))))
    p      = softmax(mlp.gate(norm(h)))                 router over num_experts, per token
    top    = the num_experts_per_tok most probable; weights p, / their sum if norm_topk_prob
    out    = h + sum over e in top: weight_e * down_e(silu(gate_e(norm(h))) * up_e(norm(h)))

Unlike OLMo 2, the sub-blocks normalise their input (input_layernorm,
post_attention_layernorm) and nothing after. The q/k norms span the whole
projection (all heads at once, as OLMo 2's), and `clip_qkv`, when set, clamps
q, k and v after those norms. Routing and both expert layouts: moe.py.

GGUF: llama.cpp's converter writes OLMo as "olmo", permuting Q and K rows as for
Llama and recording clip_qkv as attention.clamp_kqv, and OLMo 2 as "olmo2", unpermuted.

GGUF (OLMoE): llama.cpp's "olmoe" (OlmoeModel: TextModel's keys, the RMS epsilon always 1e-5),
the whole-projection q/k norms as attn_q_norm / attn_k_norm. The converter writes no key for
clip_qkv, and llama.cpp's olmoe neither clamps nor divides the top-k weights by their sum.
"""

from dataclasses import dataclass

import numpy as np

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture, DecoderArgs, Positive
from swtool.arch.gguf_text import text_model_config, text_model_keys
from swtool.arch.llama import PERMUTED, decoder_config_from_gguf, text_model_hyperparameters, unpermute_order
from swtool.arch.moe import Mixture, MixtureArgs, mixture_config_from_gguf

OLMO_LAYER_NORM_EPS = 1e-5  # OlmoLayerNorm ignores the config and uses this
OLMOE_GGUF_RMS_EPS = 1e-5  # OlmoeModel.set_gguf_parameters writes this, whatever the config says


@dataclass(frozen=True, kw_only=True)
class OlmoArgs(DecoderArgs):
    rms_norm_eps: Positive = 1e-5  # OLMo 2's and OLMoE's norms; OLMo's ignore it (OLMO_LAYER_NORM_EPS)
    clip_qkv: Positive = None  # clamp q, k and v to [-clip, clip]


class Olmo(Architecture):
    model_types = ("olmo",)
    Args = OlmoArgs

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.FreeLayerNorm(OLMO_LAYER_NORM_EPS)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_act)
        self.attn_bias = args.attention_bias
        self.clip_qkv = args.clip_qkv

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("olmo",)

    def gguf_arch(self):
        return "OLMO"

    def gguf_arch_name(self):
        return "olmo"

    def gguf_stored_rows(self, gguf_name, n_rows):
        """OlmoModel permutes the Q and K weights as LlamaModel does, but not their biases."""
        kind, part = gguf_name.split(".")[-2:]
        if kind not in PERMUTED or part != "weight":
            return None
        return unpermute_order(n_rows, self.heads.n if kind == "attn_q" else self.heads.n_kv)

    def gguf_hyperparameters(self, writer):
        """OlmoModel.set_gguf_parameters: TextModel's keys, OlmoLayerNorm's fixed epsilon, clip_qkv."""
        text_model_keys(writer, self.config, self.n_layers)
        writer.add_layer_norm_eps(OLMO_LAYER_NORM_EPS)
        if self.clip_qkv is not None:
            writer.add_clamp_kqv(self.clip_qkv)

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        config = olmo_config_from_gguf(hparams, gguf_tensors, "olmo", "OlmoForCausalLM")
        clip = hparams("attention.clamp_kqv", None, required=False, kind=float)
        if clip is not None:
            config["clip_qkv"] = hparams.float32(clip)
        return config

    def tensor_shapes(self):
        d, shapes = self.hidden_size, self.model_tensors()  # no norm weights: OLMo's LayerNorms have none
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(blocks.attention_tensors(p + "self_attn", d, self.heads, self.attn_bias, self.attn_bias))
            shapes.update(blocks.gated_mlp_tensors(p + "mlp", d, self.intermediate_size))
        return shapes

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + self.attention(ctx, layer, self.norm(ctx, x))
        ctx.observe(RESID_MID, layer, x)
        x = x + blocks.gated_mlp(ctx, layer, self.norm(ctx, x), p + "mlp", self.activation)
        ctx.observe(RESID, layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn"
        q, k, v = (clip(t, self.clip_qkv) for t in blocks.qkv_projections(ctx, h, p, self.attn_bias))
        out = blocks.attend(ctx, self.heads, q, k, v, rope=blocks.rope_tables(ctx, self.config, self.heads.dim))
        return ctx.linear(out, p + ".o_proj.weight", self.attn_bias)


class Olmo2(Architecture):
    mlp_output_norm = "post_feedforward_layernorm"
    model_types = ("olmo2",)
    Args = OlmoArgs

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.RmsNorm(args.rms_norm_eps)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_act)
        self.attn_bias = args.attention_bias
        self.clip_qkv = None  # OLMo 2 has no qkv clipping

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("olmo2",)

    def gguf_arch(self):
        return "OLMO2"

    def gguf_arch_name(self):
        return "olmo2"

    def gguf_hyperparameters(self, writer):
        """Olmo2Model.set_gguf_parameters: TextModel's keys (OLMo 2 has no sliding window)."""
        text_model_keys(writer, self.config, self.n_layers)

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        return olmo_config_from_gguf(hparams, gguf_tensors, "olmo2", "Olmo2ForCausalLM")

    def tensor_shapes(self):
        d, shapes = self.hidden_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(olmo2_attention_tensors(self, p + "self_attn"))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(blocks.gated_mlp_tensors(p + "mlp", d, self.intermediate_size))
            shapes.update(self.norm.tensors(p + "post_feedforward_layernorm", d))
        return shapes

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + self.norm(ctx, olmo2_attention(self, ctx, layer, x), p + "post_attention_layernorm")
        ctx.observe(RESID_MID, layer, x)
        down = blocks.gated_mlp(ctx, layer, x, p + "mlp", self.activation)  # observed raw, before its norm
        x = x + self.norm(ctx, down, p + "post_feedforward_layernorm")
        ctx.observe(RESID, layer, x)
        return x


@dataclass(frozen=True, kw_only=True)
class OlmoeArgs(MixtureArgs):
    rms_norm_eps: Positive = 1e-5
    clip_qkv: Positive = None  # clamps q, k and v after the q/k norms


class Olmoe(Architecture):
    model_types = ("olmoe",)
    Args = OlmoeArgs

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.RmsNorm(args.rms_norm_eps)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_act)
        self.attn_bias = args.attention_bias
        self.clip_qkv = args.clip_qkv
        self.moe = Mixture(self, args.intermediate_size, normalise=args.norm_topk_prob)

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("olmoe",)

    def gguf_arch(self):
        return "OLMOE"

    def gguf_arch_name(self):
        return "olmoe"

    def gguf_hyperparameters(self, writer):
        text_model_hyperparameters(self, writer, rms_norm_eps=OLMOE_GGUF_RMS_EPS)

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        return {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", **decoder_config_from_gguf(hparams),
                **mixture_config_from_gguf(hparams, normalised=False),
                "attention_bias": "blk.0.attn_q.bias" in gguf_tensors}

    def tensor_shapes(self):
        d, shapes = self.hidden_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(olmo2_attention_tensors(self, p + "self_attn"))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(self.moe.tensors(layer, self.intermediate_size))
        return shapes

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + olmo2_attention(self, ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
        ctx.observe(RESID_MID, layer, x)
        x = x + self.moe(ctx, layer, self.norm(ctx, x, p + "post_attention_layernorm"))
        ctx.observe(RESID, layer, x)
        return x


def olmo_config_from_gguf(hparams, gguf_tensors, model_type, architecture):
    """config.json of an OLMo or OLMo 2 GGUF: TextModel's keys, the RMSNorm epsilon, q/k/v/o biases."""
    config = {"architectures": [architecture], "model_type": model_type, **text_model_config(hparams),
              "hidden_act": "silu", "attention_bias": "blk.0.attn_q.bias" in gguf_tensors}
    eps = hparams("attention.layer_norm_rms_epsilon", None, required=False, kind=float)
    if eps is not None:
        config["rms_norm_eps"] = hparams.float32(eps)
    head_dim = hparams("attention.key_length", None, required=False)
    if head_dim is not None:
        config["head_dim"] = head_dim
    return config


def clip(x, limit):
    return x if limit is None else np.clip(x, -limit, limit)


def olmo2_attention(arch, ctx, layer, h):
    """OLMo 2's attention (OLMoE's too): RMSNorms over the whole q and k projections (every head at
    once, before the split into heads), then clip_qkv's clamp when set (OLMoE), RoPE, causal attention."""
    p = f"model.layers.{layer}.self_attn"
    q, k, v = blocks.qkv_projections(ctx, h, p, arch.attn_bias)
    q, k = arch.norm(ctx, q, p + ".q_norm"), arch.norm(ctx, k, p + ".k_norm")
    q, k, v = (clip(t, arch.clip_qkv) for t in (q, k, v))
    out = blocks.attend(ctx, arch.heads, q, k, v, rope=blocks.rope_tables(ctx, arch.config, arch.heads.dim))
    return ctx.linear(out, p + ".o_proj.weight", arch.attn_bias)


def olmo2_attention_tensors(arch, module):
    return {**blocks.attention_tensors(module, arch.hidden_size, arch.heads, arch.attn_bias, arch.attn_bias),
            **arch.norm.tensors(module + ".q_norm", arch.heads.q_size),
            **arch.norm.tensors(module + ".k_norm", arch.heads.kv_size)}

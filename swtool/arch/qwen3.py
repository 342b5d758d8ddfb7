"""Qwen3 and Qwen3-MoE.

Qwen3: Llama's block with an RMSNorm on every query and key head before RoPE.

    h   = x + o_proj(attention(rope(q_norm(q_proj(norm(x)))), rope(k_norm(k_proj(..))), v_proj(..)))
    out = h + down_proj(silu(gate_proj(norm(h))) * up_proj(norm(h)))

The q/k norms have one weight vector of size head_dim, shared by all heads.
No q/k/v biases (unlike Qwen2) unless `attention_bias`; head_dim comes from
the config (128 when absent, transformers' default), not hidden / heads.

Qwen3-MoE: Qwen3's attention (an RMSNorm on every q/k head) and a sparse mixture of experts.

    p      = softmax(mlp.gate(norm(h)))                 router over num_experts, per token
    top    = the num_experts_per_tok most probable; weights p, / their sum if norm_topk_prob
    out    = h + sum over e in top: weight_e * down_e(silu(gate_e(norm(h))) * up_e(norm(h)))

Experts are `mlp.experts.E.{gate,up,down}_proj` (Hub) or stacked (transformers 5), sized
moe_intermediate_size; layers that decoder_sparse_step / mlp_only_layers keep dense have
Qwen3's plain MLP (intermediate_size). Routing, layouts and dense layers: moe.py.

GGUF: llama.cpp's "qwen3" and "qwen3moe" (Qwen3Model, Qwen3MoeModel: TextModel's keys, plus
expert_feed_forward_length for the experts' moe_intermediate_size), rows unpermuted, the
q/k norms as attn_q_norm / attn_k_norm. llama.cpp's qwen3moe has no dense MLP layers (export
refuses them: Mixture.check_gguf_export) and always divides the top-k weights by their sum,
which is what a file reads back as.
"""

from dataclasses import dataclass

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture, Count, DecoderArgs, Index
from swtool.arch.llama import decoder_config_from_gguf, text_model_hyperparameters
from swtool.arch.moe import Mixture, MixtureArgs, mixture_config_from_gguf


@dataclass(frozen=True, kw_only=True)
class Qwen3Args(DecoderArgs):
    head_dim: Count = 128
    max_window_layers: Index = 28  # without layer_types, the first layer whose window slides


class Qwen3(Architecture):
    model_types = ("qwen3",)
    Args = Qwen3Args

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.RmsNorm(args.rms_norm_eps)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_act)
        self.attn_bias, self.mlp_bias = args.attention_bias, args.mlp_bias

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("qwen3",)

    def gguf_arch(self):
        return "QWEN3"

    def gguf_arch_name(self):
        return "qwen3"

    def gguf_hyperparameters(self, writer):
        text_model_hyperparameters(self, writer)

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **decoder_config_from_gguf(hparams),
                "attention_bias": "blk.0.attn_q.bias" in gguf_tensors}

    def tensor_shapes(self):
        d, shapes = self.hidden_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(qwen3_attention_tensors(self, p + "self_attn"))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(blocks.gated_mlp_tensors(p + "mlp", d, self.intermediate_size, self.mlp_bias))
        return shapes

    def sliding_window(self, layer):
        """Without layer_types the window slides from max_window_layers on."""
        return qwen_window(self.args, layer, lambda i: i >= self.args.max_window_layers)

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + qwen3_attention(self, ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
        ctx.observe(RESID_MID, layer, x)
        x = x + blocks.gated_mlp(ctx, layer, self.norm(ctx, x, p + "post_attention_layernorm"), p + "mlp",
                                 self.activation, self.mlp_bias)
        ctx.observe(RESID, layer, x)
        return x


@dataclass(frozen=True, kw_only=True)
class Qwen3MoeArgs(MixtureArgs):
    head_dim: Count = 128
    max_window_layers: Index = 28
    moe_intermediate_size: Count


class Qwen3Moe(Architecture):
    model_types = ("qwen3_moe",)
    Args = Qwen3MoeArgs

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size  # of the dense layers
        self.norm = blocks.RmsNorm(args.rms_norm_eps)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_act)
        self.attn_bias = args.attention_bias
        self.moe = Mixture(self, args.moe_intermediate_size, normalise=args.norm_topk_prob)

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("qwen3moe",)

    def gguf_arch(self):
        return "QWEN3MOE"

    def gguf_arch_name(self):
        return "qwen3moe"

    def gguf_hyperparameters(self, writer):
        text_model_hyperparameters(self, writer)
        writer.add_expert_feed_forward_length(self.moe.expert_ff)

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                **decoder_config_from_gguf(hparams), **mixture_config_from_gguf(hparams, normalised=True),
                "moe_intermediate_size": hparams("expert_feed_forward_length"),
                "attention_bias": "blk.0.attn_q.bias" in gguf_tensors}

    def tensor_shapes(self):
        d, shapes = self.hidden_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(qwen3_attention_tensors(self, p + "self_attn"))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(self.moe.tensors(layer, self.intermediate_size))
        return shapes

    def sliding_window(self, layer):
        """Without layer_types the window slides from max_window_layers on."""
        return qwen_window(self.args, layer, lambda i: i >= self.args.max_window_layers)

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + qwen3_attention(self, ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
        ctx.observe(RESID_MID, layer, x)
        x = x + self.moe(ctx, layer, self.norm(ctx, x, p + "post_attention_layernorm"))
        ctx.observe(RESID, layer, x)
        return x


def qwen3_attention(arch, ctx, layer, h):
    """Qwen3's attention (Qwen3-MoE's too): RMSNorm over each q/k head's head_dim values, then RoPE."""
    p = f"model.layers.{layer}.self_attn"
    q, k, v = blocks.qkv_projections(ctx, h, p, arch.attn_bias)
    out = blocks.attend(ctx, arch.heads, q, k, v, rope=blocks.rope_tables(ctx, arch.config, arch.heads.dim),
                        window=arch.sliding_window(layer),
                        qk_norm=lambda q, k: (arch.norm(ctx, q, p + ".q_norm"), arch.norm(ctx, k, p + ".k_norm")))
    return ctx.linear(out, p + ".o_proj.weight", arch.attn_bias)


def qwen3_attention_tensors(arch, module):
    return {**blocks.attention_tensors(module, arch.hidden_size, arch.heads, arch.attn_bias, arch.attn_bias),
            **arch.norm.tensors(module + ".q_norm", arch.heads.dim),
            **arch.norm.tensors(module + ".k_norm", arch.heads.dim)}


def qwen_window(args, layer, slides_by_default):
    """Attention window of a Qwen-family layer, or None: transformers drops the window entirely
    unless use_sliding_window; then layer_types says, or (Hub configs without them) the family's
    default rule `slides_by_default(layer)`."""
    if not args.use_sliding_window or args.sliding_window is None:
        return None
    slides = args.layer_slides(layer)
    return args.sliding_window if (slides_by_default(layer) if slides is None else slides) else None

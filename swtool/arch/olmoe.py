"""OLMoE: OLMo 2's attention and a sparse mixture of experts, in pre-norm Llama-style blocks.

    h      = x + o_proj(attention(rope(clip(q_norm(q_proj(norm(x))))), rope(clip(k_norm(..))), clip(v_proj(..))))
    p      = softmax(mlp.gate(norm(h)))                 router over num_experts, per token
    top    = the num_experts_per_tok most probable; weights p, / their sum if norm_topk_prob
    out    = h + sum over e in top: weight_e * down_e(silu(gate_e(norm(h))) * up_e(norm(h)))

Unlike OLMo 2, the sub-blocks normalise their input (input_layernorm,
post_attention_layernorm) and nothing after. The q/k norms span the whole
projection (all heads at once, as OLMo 2's), and `clip_qkv`, when set, clamps
q, k and v after those norms. Routing and both expert layouts: moe.py.
"""

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture
from swtool.arch.moe import Mixture
from swtool.arch.olmo import olmo2_attention, olmo2_attention_tensors


class Olmoe(Architecture):
    model_types = ("olmoe",)

    def __init__(self, config):
        super().__init__(config)
        self.heads = blocks.attention_heads(self)
        self.intermediate_size = self.require("intermediate_size", int)
        self.norm = blocks.RmsNorm(float(config.get("rms_norm_eps", 1e-5)))
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.activation = blocks.activation(config.get("hidden_act", "silu"))
        self.attn_bias = bool(config.get("attention_bias", False))
        clip = config.get("clip_qkv")  # clamps q, k and v after the q/k norms
        self.clip_qkv = None if clip is None else float(clip)
        self.moe = Mixture(self, "intermediate_size", normalise=config.get("norm_topk_prob", False))

    def adapt(self, names):
        self.moe.adapt(names)

    def down_proj_name(self, layer, expert=None):
        return self.moe.down_proj_name(layer, expert)

    def gguf_arch(self):
        return "OLMOE"

    def gguf_name(self, hf_name):
        return self.moe.gguf_name(hf_name, super().gguf_name)

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

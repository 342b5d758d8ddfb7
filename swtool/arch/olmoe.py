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

from swtool.arch.moe import Mixture
from swtool.arch.olmo import Olmo2


class Olmoe(Mixture, Olmo2):
    model_types = ("olmoe",)

    def __init__(self, config):
        super().__init__(config)
        clip = config.get("clip_qkv")  # Olmo2 drops it; OLMoE clamps after the q/k norms
        self.clip_qkv = None if clip is None else float(clip)
        self.init_mixture("intermediate_size", normalise=config.get("norm_topk_prob", False))

    def gguf_arch(self):
        return "OLMOE"

    def tensor_shapes(self):
        # OLMo 2's tensors (q/k norms over the projection) with pre-norms in place of its post-MLP norm
        shapes = super().tensor_shapes()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            del shapes[p + "post_feedforward_layernorm.weight"]
            shapes[p + "input_layernorm.weight"] = (self.hidden_size,)
        return shapes

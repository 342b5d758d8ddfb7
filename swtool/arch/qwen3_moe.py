"""Qwen3-MoE: Qwen3's attention (an RMSNorm on every q/k head) and a sparse mixture of experts.

    p      = softmax(mlp.gate(norm(h)))                 router over num_experts, per token
    top    = the num_experts_per_tok most probable; weights p, / their sum if norm_topk_prob
    out    = h + sum over e in top: weight_e * down_e(silu(gate_e(norm(h))) * up_e(norm(h)))

Experts are `mlp.experts.E.{gate,up,down}_proj` (Hub) or stacked (transformers 5), sized
moe_intermediate_size; layers that decoder_sparse_step / mlp_only_layers keep dense have
Qwen3's plain MLP (intermediate_size). Routing, layouts and dense layers: moe.py.
"""

from swtool.arch.moe import Mixture
from swtool.arch.qwen3 import Qwen3


class Qwen3Moe(Mixture, Qwen3):
    model_types = ("qwen3_moe",)

    def __init__(self, config):
        super().__init__(config)
        self.init_mixture("moe_intermediate_size", normalise=config.get("norm_topk_prob", False))

    def gguf_arch(self):
        return "QWEN3MOE"

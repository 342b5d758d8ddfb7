"""Mixtral: Llama attention and a sparse mixture of experts in place of every MLP.

    p      = softmax(gate(norm(h)))                           router over n experts, per token
    top    = the k most probable experts, weights p / sum(p over top)
    out    = h + sum over e in top: weight_e * w2_e(silu(w1_e(norm(h))) * w3_e(norm(h)))

The down projection of expert e is its `w2`. Per-expert checkpoints keep the experts in
`model.layers.N.block_sparse_moe.experts.E.w{1,2,3}.weight` (router `block_sparse_moe.gate`);
transformers 5's stacked layout is moe.py's. Routing and both layouts: see moe.py.
"""

from swtool.arch.llama import Llama
from swtool.arch.moe import Mixture


class Mixtral(Mixture, Llama):
    model_types = ("mixtral",)
    per_expert_block = "block_sparse_moe"
    expert_matrices = ("w1", "w3", "w2")  # gate, up, down

    def __init__(self, config):
        super().__init__(config)
        self.init_mixture("intermediate_size", normalise=True)

    def sliding_window(self, layer):
        return self.config.get("sliding_window")  # as Mistral: every layer, when set

"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases) and a sparse
mixture of experts beside an always-on shared expert scaled by its own sigmoid gate:

    p      = softmax(mlp.gate(norm(h)))                 router over num_experts, per token
    top    = the num_experts_per_tok most probable; weights p, / their sum if norm_topk_prob (default off)
    routed = sum over e in top: weight_e * down_e(silu(gate_e(norm(h))) * up_e(norm(h)))
    shared = sigmoid(shared_expert_gate(norm(h))) * shared_expert.down_proj(silu(..gate_proj..) * ..up_proj..)
    out    = h + routed + shared

The shared expert is one dense gated MLP (`mlp.shared_expert.{gate,up,down}_proj`, sized
shared_expert_intermediate_size) in every sparse layer. Its output is part of "down_out";
its down projection's input is observed like an expert's (label SHARED, every token, the
sigmoid gate as its weight), so scan traces a spike to it as well as to the routed experts.
Routing, layouts and dense layers: moe.py.
"""

import numpy as np

from swtool.arch.llama import Llama
from swtool.arch.moe import SHARED, Mixture, Routed
from swtool.arch.qwen3 import qwen_window


class Qwen2Moe(Mixture, Llama):
    model_types = ("qwen2_moe",)

    def __init__(self, config):
        super().__init__(config)
        self.qkv_bias = bool(config.get("qkv_bias", True))  # Qwen2's q/k/v biases, a config flag here
        self.init_mixture("moe_intermediate_size", normalise=config.get("norm_topk_prob", False))
        self.shared_ff = self.require("shared_expert_intermediate_size", int)

    def gguf_arch(self):
        return "QWEN2MOE"

    def sliding_window(self, layer):
        """Without layer_types transformers slides odd-numbered (1-based) layers below max_window_layers."""
        return qwen_window(self.config, layer, lambda i: (i + 1) % 2 and i < self.config.get("max_window_layers", 28))

    def down_proj_name(self, layer, expert=None):
        if expert == SHARED and self.is_sparse(layer):
            return f"model.layers.{layer}.mlp.shared_expert.down_proj.weight"
        return super().down_proj_name(layer, expert)

    def tensor_shapes(self):
        shapes = super().tensor_shapes()
        d, ff = self.hidden_size, self.shared_ff
        for layer in range(self.n_layers):
            if not self.is_sparse(layer):
                continue
            p = f"model.layers.{layer}.mlp.shared_expert"
            shapes[p + ".gate_proj.weight"] = shapes[p + ".up_proj.weight"] = (ff, d)
            shapes[p + ".down_proj.weight"] = (d, ff)
            shapes[p + "_gate.weight"] = (1, d)
        return shapes

    def mixture(self, ctx, layer, h):
        """The routed experts' weighted sum plus the gated shared expert."""
        routed = super().mixture(ctx, layer, h)
        p = f"model.layers.{layer}.mlp.shared_expert"
        act = self.activation(ctx.linear(h, p + ".gate_proj.weight")) * ctx.linear(h, p + ".up_proj.weight")
        gate = 1.0 / (1.0 + np.exp(-ctx.linear(h, p + "_gate.weight")))  # sigmoid, [W, T, 1]
        # every token of every row goes through the shared expert, its sigmoid gate the weight
        rows, tokens = (index.reshape(-1) for index in np.indices(h.shape[:2]))
        everyone = Routed(rows, tokens, gate.reshape(-1))
        ctx.observe_expert("down_in", layer, SHARED, everyone, act.reshape(-1, act.shape[-1]))
        shared = ctx.linear(act, p + ".down_proj.weight")
        ctx.observe_expert("down_out", layer, SHARED, everyone, shared.reshape(-1, shared.shape[-1]))
        return routed + gate * shared

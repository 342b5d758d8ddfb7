"""Mixtral: Llama attention and a sparse mixture of experts in place of the MLP.

    h      = x + o_proj(attention(...))                       as in llama.py
    p      = softmax(gate(norm(h)))                           router over n experts, per token
    top    = the k most probable experts, weights p / sum(p over top)
    out    = h + sum over e in top: weight_e * w2_e(silu(w1_e(norm(h))) * w3_e(norm(h)))

The down projection of expert e is its `w2`. Two checkpoint layouts hold the same weights:
  - per expert (the Hub's Mixtral checkpoints; transformers' save_pretrained by default):
      model.layers.N.block_sparse_moe.gate.weight          [experts, hidden]
      model.layers.N.block_sparse_moe.experts.E.w1.weight  [ff, hidden]   gate
      model.layers.N.block_sparse_moe.experts.E.w3.weight  [ff, hidden]   up
      model.layers.N.block_sparse_moe.experts.E.w2.weight  [hidden, ff]   down
  - stacked (transformers 5's own modules, save_pretrained(save_original_format=False)):
      model.layers.N.mlp.gate.weight                       [experts, hidden]
      model.layers.N.mlp.experts.gate_up_proj              [experts, 2 ff, hidden]  gate rows, then up rows
      model.layers.N.mlp.experts.down_proj                 [experts, hidden, ff]

Routing is computed per world: removing a weight upstream changes the router's
input, so a world may send a token to other experts than the intact model does.
Each expert still reads its weights once per pass, for the rows of all worlds it receives.
"""

import re
from dataclasses import dataclass

import numpy as np

from swtool import ops
from swtool.arch.llama import Llama
from swtool.errors import SwtoolError


@dataclass
class Routed:
    """The rows one expert receives: row n is token `token[n]` of batch row `world[n]` (the world,
    with one sequence per world as in a scan), with router weight `weight[n]`."""

    world: np.ndarray
    token: np.ndarray
    weight: np.ndarray


class Mixtral(Llama):
    model_types = ("mixtral",)

    def __init__(self, config):
        super().__init__(config)
        self.n_experts = self.require("num_local_experts", int)
        self.top_k = self.require("num_experts_per_tok", int)
        if not 1 <= self.top_k <= self.n_experts:
            raise SwtoolError(f"config.json: num_experts_per_tok = {self.top_k} must be between 1 and "
                              f"num_local_experts = {self.n_experts}")
        self.stacked = False  # per-expert tensors until adapt() sees the stacked ones

    def adapt(self, names):
        self.stacked = "model.layers.0.mlp.experts.down_proj" in names

    # --- names ---------------------------------------------------------------------
    def router_name(self, layer):
        return f"model.layers.{layer}.{'mlp' if self.stacked else 'block_sparse_moe'}.gate.weight"

    def down_proj_name(self, layer, expert=None):
        if expert is None:
            raise SwtoolError("Mixtral's down projections are per expert: give the expert")
        if self.stacked:
            return f"model.layers.{layer}.mlp.experts.down_proj"
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight"

    def gguf_name(self, hf_name):
        # llama.cpp's converter stacks a layer's experts into one 3-D tensor per matrix
        # (blk.N.ffn_down_exps.weight: expert = slowest axis, ne[2]); gguf-py names the
        # stacked tensor, so a per-expert name maps through its stacked spelling
        per_expert = re.fullmatch(r"(model\.layers\.\d+\.block_sparse_moe\.experts)\.\d+\.(w[123]\.weight)", hf_name)
        if per_expert:
            hf_name = f"{per_expert[1]}.{per_expert[2]}"
        elif re.fullmatch(r"model\.layers\.\d+\.mlp\.experts\.down_proj", hf_name):
            hf_name += ".weight"  # transformers 5 names the stacked parameter without the suffix
        return super().gguf_name(hf_name)

    def tensor_shapes(self):
        shapes = super().tensor_shapes()
        d, ff, n = self.hidden_size, self.require("intermediate_size", int), self.n_experts
        for layer in range(self.n_layers):
            for name in ("gate_proj", "up_proj", "down_proj"):  # Llama's dense MLP is not there
                del shapes[f"model.layers.{layer}.mlp.{name}.weight"]
            shapes[self.router_name(layer)] = (n, d)
            if self.stacked:
                shapes[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = (n, 2 * ff, d)
                shapes[f"model.layers.{layer}.mlp.experts.down_proj"] = (n, d, ff)
                continue
            for expert in range(n):
                p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
                shapes[p + "w1.weight"] = shapes[p + "w3.weight"] = (ff, d)
                shapes[p + "w2.weight"] = (d, ff)
        return shapes

    def sliding_window(self, layer):
        return self.config.get("sliding_window")  # as Mistral: every layer, when set

    # --- math ------------------------------------------------------------------------
    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        # attention sub-block: exactly Llama's
        h = ops.rms_norm(x, ctx.weight(p + "input_layernorm.weight"), self.eps)
        x = x + self.attention(ctx, layer, h)
        ctx.observe("resid_mid", layer, x)
        # mixture sub-block: pre-norm, route, experts, weighted sum, add
        h = ops.rms_norm(x, ctx.weight(p + "post_attention_layernorm.weight"), self.eps)
        moe = self.mixture(ctx, layer, h)
        ctx.observe("down_out", layer, moe)  # what the down projections add to the residual
        x = x + moe
        ctx.observe("resid", layer, x)
        return x

    def mixture(self, ctx, layer, h):
        """Route every token of every world to its top-k experts; sum their weighted outputs."""
        top, weights = self.route(ctx.linear(h, self.router_name(layer)))
        out = np.zeros_like(h)
        for expert in range(self.n_experts):
            world, token, slot = np.nonzero(top == expert)  # each (world, token) picks an expert at most once
            if len(world) == 0:
                continue
            routed = Routed(world, token, weights[world, token, slot])
            y = self.expert(ctx, layer, expert, h[world, token][None], routed)
            out[world, token] += routed.weight[:, None] * y[0]
        return out

    def route(self, logits):
        """Router logits [W, T, experts] -> (top-k expert ids, their renormalised softmax weights), [W, T, k]."""
        probs = ops.softmax(logits)
        top = np.argsort(-probs, axis=-1, kind="stable")[..., : self.top_k]  # exact ties: the lower id
        weights = np.take_along_axis(probs, top, axis=-1)
        return top, weights / weights.sum(axis=-1, keepdims=True)

    def expert(self, ctx, layer, expert, x, routed):
        """One expert's gated MLP on the rows it receives: x [1, N, hidden] -> [1, N, hidden]."""
        if self.stacked:
            base = f"model.layers.{layer}.mlp.experts."
            gate_up = ctx.linear(x, base + "gate_up_proj", world=routed.world, expert=expert)
            gate, up = np.split(gate_up, 2, axis=-1)  # gate rows first, then up rows
            down, down_expert = base + "down_proj", expert
        else:
            base = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
            gate = ctx.linear(x, base + "w1.weight", world=routed.world)
            up = ctx.linear(x, base + "w3.weight", world=routed.world)
            down, down_expert = base + "w2.weight", None  # the name already is the expert's
        act = self.activation(gate) * up
        ctx.observe_expert("down_in", layer, expert, routed, act[0])
        y = ctx.linear(act, down, world=routed.world, expert=down_expert)
        ctx.observe_expert("down_out", layer, expert, routed, y[0])
        return y

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

GGUF: llama.cpp's "qwen2moe" (Qwen2MoeModel: TextModel's keys, expert_feed_forward_length and
expert_shared_feed_forward_length), the shared expert as ffn_{gate,up,down}_shexp and its gate
as ffn_gate_inp_shexp; llama.cpp does not divide the top-k weights by their sum.
"""

from dataclasses import dataclass

import numpy as np

from swtool.arch import blocks
from swtool.arch.base import DOWN_IN, DOWN_OUT, RESID, RESID_MID, Architecture, Count, Index
from swtool.arch.llama import decoder_config_from_gguf, llama_attention, text_model_hyperparameters
from swtool.arch.moe import SHARED, Mixture, MixtureArgs, Routed, mixture_config_from_gguf
from swtool.arch.qwen3 import qwen_window
from swtool.errors import SwtoolError


@dataclass(frozen=True, kw_only=True)
class Qwen2MoeArgs(MixtureArgs):
    moe_intermediate_size: Count
    shared_expert_intermediate_size: Count
    qkv_bias: bool = True  # Qwen2's q/k/v biases, a config flag here
    max_window_layers: Index = 28
    sliding_window: Index = None  # transformers 5 saves 0 when use_sliding_window is off

    def check(self):
        super().check()
        if self.use_sliding_window and self.sliding_window == 0:
            raise SwtoolError("config.json: use_sliding_window with sliding_window = 0")


class Qwen2Moe(Architecture):
    model_types = ("qwen2_moe",)
    Args = Qwen2MoeArgs

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size  # of the dense layers
        self.norm = blocks.RmsNorm(args.rms_norm_eps)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_act)
        self.qkv_bias, self.o_bias = args.qkv_bias, args.attention_bias
        self.moe = Mixture(self, args.moe_intermediate_size, normalise=args.norm_topk_prob)
        self.shared_ff = args.shared_expert_intermediate_size

    def down_proj_name(self, layer, expert=None):
        if expert == SHARED and self.moe.is_sparse(layer):
            return f"model.layers.{layer}.mlp.shared_expert.down_proj.weight"
        return self.moe.down_proj_name(layer, expert)

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("qwen2moe",)

    def gguf_arch(self):
        return "QWEN2MOE"

    def gguf_arch_name(self):
        return "qwen2moe"

    def gguf_hyperparameters(self, writer):
        text_model_hyperparameters(self, writer)
        writer.add_expert_feed_forward_length(self.moe.expert_ff)
        writer.add_expert_shared_feed_forward_length(self.shared_ff)

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                **decoder_config_from_gguf(hparams), **mixture_config_from_gguf(hparams, normalised=False),
                "moe_intermediate_size": hparams("expert_feed_forward_length"),
                "shared_expert_intermediate_size": hparams("expert_shared_feed_forward_length"),
                "qkv_bias": "blk.0.attn_q.bias" in gguf_tensors,
                "attention_bias": "blk.0.attn_output.bias" in gguf_tensors}

    def tensor_shapes(self):
        d, shapes = self.hidden_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(blocks.attention_tensors(p + "self_attn", d, self.heads, self.qkv_bias, self.o_bias))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(self.moe.tensors(layer, self.intermediate_size))
            if self.moe.is_sparse(layer):
                shapes.update(blocks.gated_mlp_tensors(p + "mlp.shared_expert", d, self.shared_ff))
                shapes.update(blocks.linear(p + "mlp.shared_expert_gate", 1, d))
        return shapes

    def sliding_window(self, layer):
        """Without layer_types transformers slides odd-numbered (1-based) layers below max_window_layers."""
        return qwen_window(self.args, layer, lambda i: (i + 1) % 2 and i < self.args.max_window_layers)

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + llama_attention(self, ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
        ctx.observe(RESID_MID, layer, x)
        x = x + self.moe(ctx, layer, self.norm(ctx, x, p + "post_attention_layernorm"), shared=self.shared_expert)
        ctx.observe(RESID, layer, x)
        return x

    def shared_expert(self, ctx, layer, h):
        """The always-on expert, scaled by its sigmoid gate; observed like a routed expert (label SHARED)."""
        p = f"model.layers.{layer}.mlp.shared_expert"
        act = self.activation(ctx.linear(h, p + ".gate_proj.weight")) * ctx.linear(h, p + ".up_proj.weight")
        gate = 1.0 / (1.0 + np.exp(-ctx.linear(h, p + "_gate.weight")))  # sigmoid, [W, T, 1]
        # every token of every row goes through the shared expert, its sigmoid gate the weight
        rows, tokens = (index.reshape(-1) for index in np.indices(h.shape[:2]))
        everyone = Routed(rows, tokens, gate.reshape(-1))
        ctx.observe_expert(DOWN_IN, layer, SHARED, everyone, act.reshape(-1, act.shape[-1]))
        shared = ctx.linear(act, p + ".down_proj.weight")
        ctx.observe_expert(DOWN_OUT, layer, SHARED, everyone, shared.reshape(-1, shared.shape[-1]))
        return gate * shared

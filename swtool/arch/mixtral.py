"""Mixtral: Llama attention and a sparse mixture of experts in place of every MLP.

    h      = x + o_proj(attention(rope(q_proj(norm(x))), rope(k_proj(..)), v_proj(..)))
    p      = softmax(gate(norm(h)))                           router over n experts, per token
    top    = the k most probable experts, weights p / sum(p over top)
    out    = h + sum over e in top: weight_e * w2_e(silu(w1_e(norm(h))) * w3_e(norm(h)))

The down projection of expert e is its `w2`. Per-expert checkpoints keep the experts in
`model.layers.N.block_sparse_moe.experts.E.w{1,2,3}.weight` (router `block_sparse_moe.gate`);
transformers 5's stacked layout is moe.py's. Routing and both layouts: see moe.py.
A `sliding_window` in the config applies to every layer, as in Mistral.

GGUF: llama.cpp converts Mixtral as Llama (its "llama" architecture, Q and K rows permuted,
LlamaModel's keys and vocabulary) plus llama.expert_count / expert_used_count, its experts
stacked per matrix (blk.N.ffn_{gate,up,down}_exps); a "llama" file with experts reads back
as Mixtral (Llama.config_from_gguf).
"""

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture
from swtool.arch.llama import Llama, llama_attention
from swtool.arch.moe import Mixture, MixtureArgs


class Mixtral(Architecture):
    model_types = ("mixtral",)
    Args = MixtureArgs

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.norm = blocks.RmsNorm(args.rms_norm_eps)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_act)
        self.qkv_bias = self.o_bias = args.attention_bias
        self.moe = Mixture(self, args.intermediate_size, normalise=True, module="block_sparse_moe",
                           matrices=("w1", "w3", "w2"))

    # --- GGUF: Llama's, the expert counts included (llama.text_model_hyperparameters) ----------
    gguf_exports = True
    gguf_derived = Llama.gguf_derived
    gguf_stored_rows = Llama.gguf_stored_rows
    gguf_extra_tensors = Llama.gguf_extra_tensors
    gguf_hyperparameters = Llama.gguf_hyperparameters
    gguf_vocabulary = Llama.gguf_vocabulary

    def gguf_arch(self):
        return "LLAMA"  # llama.cpp converts Mixtral as llama, its experts stacked

    def gguf_arch_name(self):
        return "llama"

    def tensor_shapes(self):
        d, shapes = self.hidden_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(blocks.attention_tensors(p + "self_attn", d, self.heads, self.qkv_bias, self.o_bias))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(self.moe.tensors(layer, self.moe.expert_ff))
        return shapes

    def sliding_window(self, layer):
        return self.args.sliding_window

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + llama_attention(self, ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
        ctx.observe(RESID_MID, layer, x)
        x = x + self.moe(ctx, layer, self.norm(ctx, x, p + "post_attention_layernorm"))
        ctx.observe(RESID, layer, x)
        return x

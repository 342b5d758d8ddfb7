"""StableLM (StableLM-2, StableLM-3B-4E1T, StableCode): Llama's SwiGLU MLP with LayerNorms.

Sequential residual (the default):

    h   = x + o_proj(attention(rope(qk_norm(q_proj(ln1(x)))), rope(qk_norm(k_proj(..))), v_proj(..)))
    out = h + down_proj(silu(gate_proj(ln2(h))) * up_proj(ln2(h)))

Parallel residual (`use_parallel_residual`, StableLM-2-12B): attention and MLP
both read the same input_layernorm(x), and there is no post_attention_layernorm:

    out = x + attention(ln1(x)) + mlp(ln1(x))

Every norm is a LayerNorm with weight and bias (eps = layer_norm_eps). Only
`partial_rotary_factor` of each head rotates (0.25 when the config names none).
`use_qkv_bias` puts biases on q/k/v (not on o_proj). `qk_layernorm` adds a
LayerNorm without bias to each query and key head, one weight vector per head
(`self_attn.q_layernorm.norms.{h}.weight`), before RoPE.

GGUF: llama.cpp's converter writes StableLM as "stablelm" with keys of its own
(no RoPE base: llama.cpp assumes 10000) and stacks each layer's per-head norms
into one [heads, head_dim] tensor, blk.N.attn_{q,k}_norm; read from a GGUF file,
the family uses that stacked tensor (`self_attn.q_layernorm.weight`) as it is.
"""

import re
from dataclasses import dataclass

import numpy as np

from swtool import ops
from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture, DecoderArgs, Positive
from swtool.arch.gguf_text import gguf_flag, layer_norm_rope_keys, rotary_fraction, text_model_config
from swtool.arch.rope import rotary_dim

STABLELM_ROTARY_DEFAULT = 0.25  # StableLmConfig's partial_rotary_factor when config.json names none
PER_HEAD_NORM = re.compile(r"^(model\.layers\.\d+\.self_attn\.[qk]_layernorm)\.norms\.\d+\.weight$")


@dataclass(frozen=True, kw_only=True)
class StableLmArgs(DecoderArgs):
    layer_norm_eps: Positive = 1e-5
    use_qkv_bias: bool = False
    use_parallel_residual: bool = False
    qk_layernorm: bool = False


class StableLm(Architecture):
    model_types = ("stablelm",)
    Args = StableLmArgs

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        n_heads = args.num_attention_heads  # StableLmAttention ignores config head_dim
        self.heads = blocks.Heads(n_heads, args.num_key_value_heads or n_heads, self.hidden_size // n_heads)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.LayerNorm(args.layer_norm_eps)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_act)
        self.qkv_bias = args.use_qkv_bias
        self.parallel = args.use_parallel_residual
        self.qk_norm = args.qk_layernorm
        self.stacked_norms = False  # the per-head norms as one [heads, head_dim] tensor (a GGUF file's)

    def use_gguf_layout(self):
        self.stacked_norms = True

    def gguf_arch(self):
        return "STABLELM"

    def gguf_name(self, hf_name):
        """llama.cpp stacks the per-head q/k norms into one [heads, head_dim] tensor, blk.N.attn_{q,k}_norm."""
        stacked = PER_HEAD_NORM.match(hf_name)
        return super().gguf_name(stacked.group(1) + ".weight" if stacked else hf_name)

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("stablelm",)

    def gguf_arch_name(self):
        return "stablelm"

    def gguf_hyperparameters(self, writer):
        """StableLMModel.set_gguf_parameters' keys."""
        rotary_dims = rotary_dim(self.config, self.heads.dim, STABLELM_ROTARY_DEFAULT)
        layer_norm_rope_keys(writer, self, self.config, rotary_dims, "StableLM", head_count_kv=self.heads.n_kv)

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        config = {"architectures": ["StableLmForCausalLM"], "model_type": "stablelm", **text_model_config(hparams),
                  "hidden_act": "silu",
                  "layer_norm_eps": hparams.float32(hparams("attention.layer_norm_epsilon", kind=float)),
                  "use_qkv_bias": "blk.0.attn_q.bias" in gguf_tensors,
                  "qk_layernorm": "blk.0.attn_q_norm.weight" in gguf_tensors,
                  "use_parallel_residual": gguf_flag(hparams, "use_parallel_residual", True)}
        config["partial_rotary_factor"] = rotary_fraction(hparams, config["hidden_size"] // config["num_attention_heads"])
        return config

    def tensor_shapes(self):
        d, shapes = self.hidden_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(blocks.attention_tensors(p + "self_attn", d, self.heads, self.qkv_bias))
            if self.qk_norm and self.stacked_norms:
                shapes[f"{p}self_attn.q_layernorm.weight"] = (self.heads.n, self.heads.dim)
                shapes[f"{p}self_attn.k_layernorm.weight"] = (self.heads.n_kv, self.heads.dim)
            elif self.qk_norm:
                for h in range(self.heads.n):
                    shapes[f"{p}self_attn.q_layernorm.norms.{h}.weight"] = (self.heads.dim,)
                for h in range(self.heads.n_kv):
                    shapes[f"{p}self_attn.k_layernorm.norms.{h}.weight"] = (self.heads.dim,)
            if not self.parallel:
                shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(blocks.gated_mlp_tensors(p + "mlp", d, self.intermediate_size))
        return shapes

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        h = self.norm(ctx, x, p + "input_layernorm")
        x = x + self.attention(ctx, layer, h)
        ctx.observe(RESID_MID, layer, x)  # parallel too: the residual before the MLP's contribution
        if not self.parallel:  # the parallel MLP reads the same normed input as attention
            h = self.norm(ctx, x, p + "post_attention_layernorm")
        x = x + blocks.gated_mlp(ctx, layer, h, p + "mlp", self.activation)
        ctx.observe(RESID, layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn."
        q, k, v = blocks.qkv_projections(ctx, h, p[:-1], self.qkv_bias)
        rope = blocks.rope_tables(ctx, self.config, self.heads.dim, STABLELM_ROTARY_DEFAULT)
        out = blocks.attend(ctx, self.heads, q, k, v, rope=rope, qk_norm=self.qk_norms(ctx, p))
        return ctx.linear(out, p + "o_proj.weight")

    def qk_norms(self, ctx, p):
        """With qk_layernorm, a step normalising each q and k head with its own weight; else None."""
        if not self.qk_norm:
            return None
        return lambda q, k: (self.per_head_norm(ctx, q, p + "q_layernorm"),
                             self.per_head_norm(ctx, k, p + "k_layernorm"))

    def per_head_norm(self, ctx, x, prefix):
        """x [W, heads, T, d]: head h normalised by a bias-free LayerNorm with its own weight norms.{h}."""
        if self.stacked_norms:
            weights = ctx.weight(prefix + ".weight")
        else:
            weights = np.stack([ctx.weight(f"{prefix}.norms.{h}.weight") for h in range(x.shape[1])])
        return ops.layer_norm(x, weights[None, :, None, :], None, self.norm.eps)


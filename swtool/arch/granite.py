"""IBM Granite (3.x): Llama's block with four scalar multipliers from config.json.

    x      = embed(tokens) * embedding_multiplier
    h      = x + residual_multiplier * o_proj(attention(...))     q.k scaled by attention_multiplier
    out    = h + residual_multiplier * down_proj(silu(gate_proj(norm(h))) * up_proj(norm(h)))
    logits = lm_head(norm(out)) / logits_scaling

attention_multiplier replaces 1/sqrt(head_dim). "down_out" is observed raw,
before residual_multiplier scales it on its way into the residual stream.

GGUF: llama.cpp's converter writes Granite as Llama (Q and K permuted, its keys)
under "granite", with the multipliers as attention.scale, embedding_scale,
residual_scale and logit_scale, each only when it is not 0. It ignores head_dim.
"""

from dataclasses import dataclass

import numpy as np

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture, DecoderArgs, Number, Positive
from swtool.arch.gguf_text import text_model_config, text_model_keys
from swtool.arch.llama import PERMUTED, add_prefix_space_key, unpermute_order
from swtool.errors import SwtoolError


@dataclass(frozen=True, kw_only=True)
class GraniteArgs(DecoderArgs):
    embedding_multiplier: Number = 1.0
    residual_multiplier: Number = 1.0
    attention_multiplier: Number = 1.0
    logits_scaling: Positive = 1.0


class Granite(Architecture):
    model_types = ("granite",)
    Args = GraniteArgs

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.RmsNorm(args.rms_norm_eps)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_act)
        self.attn_bias, self.mlp_bias = args.attention_bias, args.mlp_bias
        self.embedding_multiplier = np.float32(args.embedding_multiplier)
        self.residual_multiplier = np.float32(args.residual_multiplier)
        self.attention_multiplier = args.attention_multiplier
        self.logits_scaling = np.float32(args.logits_scaling)

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("granite",)
    # (config.json key, GGUFWriter method, the `{arch}.*` key it writes)
    GGUF_MULTIPLIERS = (("attention_multiplier", "add_attention_scale", "attention.scale"),
                        ("embedding_multiplier", "add_embedding_scale", "embedding_scale"),
                        ("residual_multiplier", "add_residual_scale", "residual_scale"),
                        ("logits_scaling", "add_logit_scale", "logit_scale"))

    def gguf_arch(self):
        return "GRANITE"

    def gguf_arch_name(self):
        return "granite"

    def gguf_stored_rows(self, gguf_name, n_rows):
        kind = gguf_name.split(".")[-2]  # weights and biases alike, as LlamaModel permutes them
        if kind not in PERMUTED:
            return None
        return unpermute_order(n_rows, self.heads.n if kind == "attn_q" else self.heads.n_kv)

    def gguf_hyperparameters(self, writer):
        """GraniteModel.set_gguf_parameters: LlamaModel's keys without head_dim, then the multipliers."""
        if self.args.head_dim not in (None, self.hidden_size // self.heads.n):
            raise SwtoolError(f"head_dim {self.args.head_dim}: llama.cpp's granite architecture has heads "
                              f"of hidden_size / num_attention_heads = {self.hidden_size // self.heads.n} dims")
        text_model_keys(writer, {k: v for k, v in self.config.items() if k != "head_dim"}, self.n_layers)
        writer.add_vocab_size(self.vocab_size)
        writer.add_rope_dimension_count(self.heads.dim)
        for key, method, _ in self.GGUF_MULTIPLIERS:
            if self.config.get(key):  # the converter skips a multiplier that is absent or 0
                getattr(writer, method)(self.config[key])

    def gguf_vocabulary(self, writer, directory, kind):
        if kind == "gpt2":  # GraniteModel's set_vocab is LlamaModel's
            add_prefix_space_key(writer, directory)

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        config = {"architectures": ["GraniteForCausalLM"], "model_type": "granite", **text_model_config(hparams),
                  "hidden_act": "silu",
                  "rms_norm_eps": hparams.float32(hparams("attention.layer_norm_rms_epsilon", kind=float)),
                  "attention_bias": "blk.0.attn_q.bias" in gguf_tensors,
                  "mlp_bias": "blk.0.ffn_down.bias" in gguf_tensors}
        for key, _, gguf_key in cls.GGUF_MULTIPLIERS:
            value = hparams(gguf_key, None, required=False, kind=float)
            config[key] = hparams.float32(value) if value is not None else 1.0
        return config

    def tensor_shapes(self):
        d, shapes = self.hidden_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(blocks.attention_tensors(p + "self_attn", d, self.heads, self.attn_bias, self.attn_bias))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(blocks.gated_mlp_tensors(p + "mlp", d, self.intermediate_size, self.mlp_bias))
        return shapes

    def embed(self, ctx, tokens):
        return super().embed(ctx, tokens) * self.embedding_multiplier

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + self.attention(ctx, layer, self.norm(ctx, x, p + "input_layernorm")) * self.residual_multiplier
        ctx.observe(RESID_MID, layer, x)
        down = blocks.gated_mlp(ctx, layer, self.norm(ctx, x, p + "post_attention_layernorm"), p + "mlp",
                                self.activation, self.mlp_bias)
        x = x + down * self.residual_multiplier
        ctx.observe(RESID, layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn"
        q, k, v = blocks.qkv_projections(ctx, h, p, self.attn_bias)
        out = blocks.attend(ctx, self.heads, q, k, v, rope=blocks.rope_tables(ctx, self.config, self.heads.dim),
                            scale=self.attention_multiplier)
        return ctx.linear(out, p + ".o_proj.weight", self.attn_bias)

    def head(self, ctx, x):
        return super().head(ctx, x) / self.logits_scaling

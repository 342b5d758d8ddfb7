"""StarCoder2: Llama's attention with biases, a plain (non-gated) MLP, LayerNorms.

    h   = x + o_proj(attention(rope(q_proj(ln1(x))), rope(k_proj(..)), v_proj(..)))
    out = h + c_proj(gelu_tanh(c_fc(ln2(h))))

The down projection is `mlp.c_proj` (an nn.Linear, [hidden, intermediate]).
`use_bias` (default true) puts a bias on every linear, o_proj and the MLP
included; norms are LayerNorms with bias (eps = norm_epsilon). A
`sliding_window` in the config applies to every layer. Embeddings are tied
unless the config says otherwise.

GGUF: llama.cpp's converter writes StarCoder2 as "starcoder2" with TextModel's keys
and the tensors unchanged. It keeps no sliding window: llama.cpp attends to the
whole context, so a file read back has none either.
"""

from dataclasses import dataclass

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture, DecoderArgs, Positive
from swtool.arch.gguf_text import text_model_config, text_model_keys


@dataclass(frozen=True, kw_only=True)
class Starcoder2Args(DecoderArgs):
    norm_epsilon: Positive = 1e-5
    tie_word_embeddings: bool = True
    hidden_act: str = "gelu_pytorch_tanh"
    use_bias: bool = True  # on every linear


class Starcoder2(Architecture):
    model_types = ("starcoder2",)
    Args = Starcoder2Args

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.LayerNorm(args.norm_epsilon)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_act)
        self.bias = args.use_bias

    def down_proj_name(self, layer):
        return f"model.layers.{layer}.mlp.c_proj.weight"

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("starcoder2",)

    def gguf_arch(self):
        return "STARCODER2"

    def gguf_arch_name(self):
        return "starcoder2"

    def gguf_hyperparameters(self, writer):
        """StarCoder2Model: TextModel.set_gguf_parameters' keys."""
        text_model_keys(writer, self.config, self.n_layers)

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        return {"architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2", **text_model_config(hparams),
                "hidden_act": "gelu_pytorch_tanh",
                "norm_epsilon": hparams.float32(hparams("attention.layer_norm_epsilon", kind=float)),
                "use_bias": "blk.0.attn_q.bias" in gguf_tensors}

    def tensor_shapes(self):
        d, ff, shapes = self.hidden_size, self.intermediate_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(blocks.attention_tensors(p + "self_attn", d, self.heads, self.bias, self.bias))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(blocks.linear(p + "mlp.c_fc", ff, d, self.bias))
            shapes.update(blocks.linear(p + "mlp.c_proj", d, ff, self.bias))
        return shapes

    def sliding_window(self, layer):
        return self.args.sliding_window  # every layer, as transformers masks them

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + self.attention(ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
        ctx.observe(RESID_MID, layer, x)
        x = x + blocks.plain_mlp(ctx, layer, self.norm(ctx, x, p + "post_attention_layernorm"),
                                 p + "mlp.c_fc.weight", p + "mlp.c_proj.weight", self.activation, self.bias)
        ctx.observe(RESID, layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn"
        q, k, v = blocks.qkv_projections(ctx, h, p, self.bias)
        out = blocks.attend(ctx, self.heads, q, k, v, rope=blocks.rope_tables(ctx, self.config, self.heads.dim),
                            window=self.sliding_window(layer))
        return ctx.linear(out, p + ".o_proj.weight", self.bias)

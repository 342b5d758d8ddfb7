"""GPT-NeoX (Pythia, GPT-NeoX-20B, RedPajama-INCITE, ...).

Parallel residual (`use_parallel_residual`, the default and what Pythia uses):
attention and MLP read the layer input, each through its own LayerNorm, and
both outputs are added to it at once:

    out = x + dense(attention(ln1(x))) + dense_4h_to_h(gelu(dense_h_to_4h(ln2(x))))

Sequential residual (use_parallel_residual false) is the usual pre-norm block:

    h   = x + dense(attention(ln1(x)))
    out = h + dense_4h_to_h(gelu(dense_h_to_4h(ln2(h))))

For the parallel block "resid_mid" is x + attention: the residual before the
MLP's contribution is added, so "resid" - "resid_mid" is the MLP's output, as
in the sequential block.

The down projection is `mlp.dense_4h_to_h` (nn.Linear, [hidden, intermediate]).
Every linear and LayerNorm has a bias (`attention_bias` can drop the attention
ones). `query_key_value` is fused per head: its output rows hold, head after
head, that head's q, k and v ([heads, 3, head_size]), not all queries first.
Only `rotary_pct` (transformers 5: partial_rotary_factor; 0.25 when absent) of
each head rotates, with base `rotary_emb_base` (or rope_theta). The LM head is
`embed_out` in Hub checkpoints (transformers 5 calls the module lm_head).

GGUF: llama.cpp's converter writes GPT-NeoX as "gptneox" with keys of its own (no
RoPE base: llama.cpp assumes 10000) and reorders the rows of query_key_value (and
its bias) to all queries, then all keys, then all values (gguf_stored_rows).
"""

from dataclasses import dataclass

import numpy as np

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture, DecoderArgs, Positive
from swtool.arch.gguf_text import gguf_flag, layer_norm_rope_keys, rotary_fraction, text_model_config
from swtool.arch.rope import rotary_dim

NEOX_ROTARY_DEFAULT = 0.25  # GPTNeoXConfig's rotary_pct when config.json names none
HEAD_NAMES = ("embed_out.weight", "lm_head.weight")  # Hub checkpoints, then transformers 5's module name


@dataclass(frozen=True, kw_only=True)
class GPTNeoXArgs(DecoderArgs):
    layer_norm_eps: Positive = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    hidden_act: str = "gelu"


class GPTNeoX(Architecture):
    model_types = ("gpt_neox",)
    Args = GPTNeoXArgs

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        n_heads = args.num_attention_heads
        self.heads = blocks.Heads(n_heads, n_heads, self.hidden_size // n_heads)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.LayerNorm(args.layer_norm_eps)
        self.parallel = args.use_parallel_residual
        self.attention_bias = args.attention_bias
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_act)
        # RoPE settings under this family's names (rotary_emb_base), read by rope.py as rope_theta
        self.rope_config = dict(config)
        if "rotary_emb_base" in config and "rope_theta" not in config:
            self.rope_config["rope_theta"] = config["rotary_emb_base"]
        self.lm_head = HEAD_NAMES[0]

    def adapt(self, names):
        """The untied LM head is `embed_out` on the Hub; a checkpoint may call it lm_head."""
        if HEAD_NAMES[0] not in names and HEAD_NAMES[1] in names:
            self.lm_head = HEAD_NAMES[1]

    # --- names ---------------------------------------------------------------------
    def down_proj_name(self, layer):
        return f"gpt_neox.layers.{layer}.mlp.dense_4h_to_h.weight"

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("gptneox",)

    def gguf_arch(self):
        return "GPTNEOX"

    def gguf_arch_name(self):
        return "gptneox"

    def gguf_stored_rows(self, gguf_name, n_rows):
        """attn_qkv holds all queries, then all keys, then all values: HF row (head h, part s, dim i)
        is stored at s * hidden + h * head_dim + i."""
        if gguf_name.split(".")[-2] != "attn_qkv":
            return None
        head, part, i = np.unravel_index(np.arange(n_rows), (self.heads.n, 3, self.heads.dim))
        return part * self.hidden_size + head * self.heads.dim + i

    def gguf_hyperparameters(self, writer):
        """GPTNeoXModel.set_gguf_parameters' keys."""
        rotary_dims = rotary_dim(self.rope_config, self.heads.dim, NEOX_ROTARY_DEFAULT)
        layer_norm_rope_keys(writer, self, self.rope_config, rotary_dims, "GPT-NeoX")

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        config = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", **text_model_config(hparams),
                  "hidden_act": "gelu",
                  "layer_norm_eps": hparams.float32(hparams("attention.layer_norm_epsilon", kind=float)),
                  "attention_bias": "blk.0.attn_qkv.bias" in gguf_tensors,
                  "use_parallel_residual": gguf_flag(hparams, "use_parallel_residual", True)}
        config["partial_rotary_factor"] = rotary_fraction(hparams, config["hidden_size"] // config["num_attention_heads"])
        return config

    def tensor_shapes(self):
        d, ff = self.hidden_size, self.intermediate_size
        shapes = {"gpt_neox.embed_in.weight": (self.vocab_size, d), **self.norm.tensors("gpt_neox.final_layer_norm", d)}
        if not self.tied:
            shapes[self.lm_head] = (self.vocab_size, d)
        for layer in range(self.n_layers):
            p = f"gpt_neox.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(blocks.linear(p + "attention.query_key_value", 3 * d, d, self.attention_bias))
            shapes.update(blocks.linear(p + "attention.dense", d, d, self.attention_bias))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(blocks.linear(p + "mlp.dense_h_to_4h", ff, d, bias=True))
            shapes.update(blocks.linear(p + "mlp.dense_4h_to_h", d, ff, bias=True))
        return shapes

    # --- math ------------------------------------------------------------------------
    def embed(self, ctx, tokens):
        return ctx.embedding("gpt_neox.embed_in.weight", tokens)

    def block(self, ctx, layer, x):
        p = f"gpt_neox.layers.{layer}."
        attn = self.attention(ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
        if self.parallel:
            h = self.norm(ctx, x, p + "post_attention_layernorm")  # the MLP reads the layer input
            x = x + attn  # resid_mid: the residual before the MLP's contribution
        else:
            x = x + attn
            h = self.norm(ctx, x, p + "post_attention_layernorm")
        del attn
        ctx.observe(RESID_MID, layer, x)
        x = x + blocks.plain_mlp(ctx, layer, h, p + "mlp.dense_h_to_4h.weight", p + "mlp.dense_4h_to_h.weight",
                                 self.activation, bias=True)
        ctx.observe(RESID, layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"gpt_neox.layers.{layer}.attention."
        n_rows, n_tokens, _ = h.shape
        qkv = ctx.linear(h, p + "query_key_value.weight", self.attention_bias)
        # fused per head: each head's q, k and v in turn ([heads, 3, head_size]), not all queries first
        per_head = qkv.reshape(n_rows, n_tokens, self.heads.n, 3, self.heads.dim)
        q, k, v = (per_head[..., i, :].reshape(n_rows, n_tokens, -1) for i in range(3))
        # only the first rotary_dim dims of each head rotate
        rope = blocks.rope_tables(ctx, self.rope_config, self.heads.dim, NEOX_ROTARY_DEFAULT)
        out = blocks.attend(ctx, self.heads, q, k, v, rope=rope)
        return ctx.linear(out, p + "dense.weight", self.attention_bias)

    def head(self, ctx, x):
        x = self.norm(ctx, x, "gpt_neox.final_layer_norm")
        return ctx.linear(x, "gpt_neox.embed_in.weight" if self.tied else self.lm_head)

"""Gemma (1): Llama's block with three differences.

    x   = embed(tokens) * sqrt(hidden)
    h   = x + o_proj(attention(rope(q_proj(norm(x))), ..))
    out = h + down_proj(gelu_tanh(gate_proj(norm(h))) * up_proj(norm(h)))

  - every RMSNorm multiplies by (1 + weight): the stored weights are offsets from 1;
  - the MLP is GeGLU with the tanh approximation of GELU (configs that say
    "gelu" mean it too: transformers rewrites it to gelu_pytorch_tanh);
  - the embedding is scaled by sqrt(hidden) in the model's compute dtype. swtool
    computes in float32, so the factor is float32(sqrt(hidden)), as transformers
    uses for a float32 model (a bf16 transformers run rounds it, 55.43 -> 55.5
    for hidden 3072).

head_dim defaults to 256 (Gemma 7B: 16 heads x 256 > hidden 3072) and the
embeddings are tied unless the config says otherwise.
"""

import numpy as np

from swtool import ops
from swtool.arch.llama import Llama, _activation
from swtool.errors import SwtoolError


class Gemma(Llama):
    model_types = ("gemma",)

    def __init__(self, config):
        super().__init__(config)
        self.head_dim = int(config.get("head_dim") or 256)
        self.tied = bool(config.get("tie_word_embeddings", True))
        self.activation = _activation(self.activation_name())
        if config.get("use_bidirectional_attention"):
            raise SwtoolError(f"config.json ({self.model_type}): use_bidirectional_attention is set: "
                              f"an embedding model, not a causal language model")

    def activation_name(self):
        name = self.config.get("hidden_act") or "gelu_pytorch_tanh"
        return "gelu_pytorch_tanh" if name == "gelu" else name

    def gguf_arch(self):
        return "GEMMA"

    def norm(self, ctx, name, x):
        """Gemma's RMSNorm: x / rms(x) * (1 + weight)."""
        return ops.rms_norm(x, 1.0 + ctx.weight(name), self.eps)

    def embed(self, ctx, tokens):
        return ctx.embedding("model.embed_tokens.weight", tokens) * np.float32(self.hidden_size ** 0.5)

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        # attention sub-block: pre-norm, attention, add
        x = x + self.attention(ctx, layer, self.norm(ctx, p + "input_layernorm.weight", x))
        ctx.observe("resid_mid", layer, x)
        # MLP sub-block: pre-norm, GeGLU, down projection, add
        down = self.mlp(ctx, layer, self.norm(ctx, p + "post_attention_layernorm.weight", x))
        x = x + down
        ctx.observe("resid", layer, x)
        return x

    def mlp(self, ctx, layer, h):
        """Gated MLP; observes the down projection's input and raw output."""
        p = f"model.layers.{layer}.mlp."
        act = self.activation(ctx.linear(h, p + "gate_proj.weight")) * ctx.linear(h, p + "up_proj.weight")
        ctx.observe("down_in", layer, act)
        down = ctx.linear(act, p + "down_proj.weight")
        ctx.observe("down_out", layer, down)
        return down

    def head(self, ctx, x):
        x = self.norm(ctx, "model.norm.weight", x)
        lm_head = "model.embed_tokens.weight" if self.tied else "lm_head.weight"
        return ctx.linear(x, lm_head)

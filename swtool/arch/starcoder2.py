"""StarCoder2: Llama's attention with biases, a plain (non-gated) MLP, LayerNorms.

    h   = x + o_proj(attention(rope(q_proj(ln1(x))), rope(k_proj(..)), v_proj(..)))
    out = h + c_proj(gelu_tanh(c_fc(ln2(h))))

The down projection is `mlp.c_proj` (an nn.Linear, [hidden, intermediate]).
`use_bias` (default true) puts a bias on every linear, o_proj and the MLP
included; norms are LayerNorms with bias (eps = norm_epsilon). A
`sliding_window` in the config applies to every layer. Embeddings are tied
unless the config says otherwise.
"""

from swtool import ops
from swtool.arch.llama import Llama, _activation


class Starcoder2(Llama):
    model_types = ("starcoder2",)

    def __init__(self, config):
        super().__init__(config)
        self.eps = float(config.get("norm_epsilon", 1e-5))
        self.activation = _activation(config.get("hidden_act", "gelu_pytorch_tanh"))
        self.tied = bool(config.get("tie_word_embeddings", True))
        self.bias = bool(config.get("use_bias", True))
        self.qkv_bias = self.o_bias = self.mlp_bias = self.bias

    # --- names ---------------------------------------------------------------------
    def down_proj_name(self, layer):
        return f"model.layers.{layer}.mlp.c_proj.weight"

    def gguf_arch(self):
        return "STARCODER2"

    def tensor_shapes(self):
        d, ff = self.hidden_size, self.require("intermediate_size", int)
        shapes = super().tensor_shapes()  # Llama's attention, embeddings and norm weights
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            for gone in ("gate_proj", "up_proj", "down_proj"):
                shapes.pop(f"{p}mlp.{gone}.weight")
                shapes.pop(f"{p}mlp.{gone}.bias", None)
            shapes[p + "mlp.c_fc.weight"], shapes[p + "mlp.c_proj.weight"] = (ff, d), (d, ff)
            if self.bias:
                shapes[p + "mlp.c_fc.bias"], shapes[p + "mlp.c_proj.bias"] = (ff,), (d,)
            shapes[p + "input_layernorm.bias"] = shapes[p + "post_attention_layernorm.bias"] = (d,)
        shapes["model.norm.bias"] = (d,)
        return shapes

    def sliding_window(self, layer):
        return self.config.get("sliding_window")  # every layer, as transformers masks them

    # --- math ------------------------------------------------------------------------
    def layer_norm(self, ctx, x, prefix):
        return ops.layer_norm(x, ctx.weight(prefix + ".weight"), ctx.weight(prefix + ".bias"), self.eps)

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        # attention sub-block: LayerNorm, attention (biases, window), add
        x = x + self.attention(ctx, layer, self.layer_norm(ctx, x, p + "input_layernorm"))
        ctx.observe("resid_mid", layer, x)
        # MLP sub-block: LayerNorm, c_fc, GELU, c_proj (the down projection), add
        h = self.layer_norm(ctx, x, p + "post_attention_layernorm")
        act = self.activation(ctx.linear(h, p + "mlp.c_fc.weight", self.bias))
        ctx.observe("down_in", layer, act)
        down = ctx.linear(act, p + "mlp.c_proj.weight", self.bias)
        ctx.observe("down_out", layer, down)
        x = x + down
        ctx.observe("resid", layer, x)
        return x

    def head(self, ctx, x):
        x = self.layer_norm(ctx, x, "model.norm")
        lm_head = "model.embed_tokens.weight" if self.tied else "lm_head.weight"
        return ctx.linear(x, lm_head)

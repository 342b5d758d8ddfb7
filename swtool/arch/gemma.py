"""The Gemma family: Gemma (1), Gemma 2 and Gemma 3 (text).

Gemma (1): Llama's block with three differences.

    x   = embed(tokens) * sqrt(hidden)
    h   = x + o_proj(attention(rope(q_proj(norm(x))), ..))
    out = h + down_proj(gelu_tanh(gate_proj(norm(h))) * up_proj(norm(h)))

  - every RMSNorm multiplies by (1 + weight): the stored weights are offsets from 1;
  - the MLP is GeGLU with the tanh approximation of GELU (configs that say
    "gelu" mean it too: transformers rewrites it to gelu_pytorch_tanh);
  - the embedding is scaled by sqrt(hidden) in the model's compute dtype. swtool
    computes in float32, so the factor is float32(sqrt(hidden)), as transformers
    uses for a float32 model (a bf16 transformers run rounds it).

head_dim defaults to 256 (Gemma 7B: 16 heads x 256 > hidden 3072) and the
embeddings are tied unless the config says otherwise.

Gemma 2: Gemma with every sub-block's output renormalised, and soft-capped scores.

    h   = x + post_attention_layernorm(attention(input_layernorm(x)))
    out = h + post_feedforward_layernorm(down_proj(gelu_tanh(gate_proj(n)) * up_proj(n))),
          n = pre_feedforward_layernorm(h)

All norms are Gemma's (1 + weight) RMSNorms. The down projection's raw output
passes through post_feedforward_layernorm before the residual add, so a super
weight's spike is observed ("down_out") before that norm: after it, no channel
can exceed sqrt(hidden) * |1 + weight|.

Gemma 2 also:
  - scales attention scores by query_pre_attn_scalar ** -0.5 (not head_dim);
  - soft-caps them, cap * tanh(score / cap), before the mask (attn_logit_softcapping),
    and the final logits likewise (final_logit_softcapping);
  - alternates sliding-window (even layers) and global attention (`layer_types`).

Gemma 3 (model_type gemma3_text): Gemma 2's block with a different attention.
The attention soft-cap is replaced by (1 + weight) RMSNorms on each query and key head,
before RoPE (transformers never applies attn_logit_softcapping to Gemma 3). The window
slides on five of every six layers (`sliding_window_pattern`, or `layer_types`), and
sliding and global layers have their own RoPE: base rope_local_base_freq (10 000)
unscaled for sliding layers, rope_theta (1 000 000) with rope_scaling for global ones.
The final logits are soft-capped only if the config says so.

GGUF: llama.cpp's converter writes Gemma, Gemma 2 and Gemma 3 as its "gemma", "gemma2" and
"gemma3" architectures, with every norm weight stored as 1 + w (gguf_value_offset) and the
vocabulary from tokenizer.model. Some of the config it does not store, llama.cpp derives:
  - the attention scale: 1 / sqrt(head_dim), or 1 / sqrt(hidden / heads) for the 27B models
    (46 layers for Gemma 2, 62 for Gemma 3), which is query_pre_attn_scalar on reading;
  - the layers that slide: Gemma 2 every other one (2), Gemma 3 five of every six (6), and
    Gemma 3's sliding layers use RoPE unscaled (`rope.freq_base_swa`, else 10 000);
  - Gemma 2's soft-caps, 50 and 30 when the keys are absent.
Export refuses a config those rules would misread rather than write a file llama.cpp runs differently.
"""

from dataclasses import dataclass

import numpy as np

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture, Count, DecoderArgs, Positive, null_is_off
from swtool.arch.gguf_text import add_rope_scaling
from swtool.arch.rope import rope_settings
from swtool.errors import SwtoolError

EOT_TOKEN = 107  # GemmaModel.set_vocab's end-of-turn id (the other CodeGemma ids have no gguf-py key)
LARGEST = {"gemma2": 46, "gemma3": 62}  # llama.cpp's 27B layer counts, which scale attention by hidden / heads
SWA_PATTERN = {"gemma2": 2, "gemma3": 6}  # llama.cpp slides layer i unless (i + 1) is a multiple


def scaled_embed(self, ctx, tokens):
    """Gemma's embedding lookup, times sqrt(hidden_size) (every Gemma)."""
    return Architecture.embed(self, ctx, tokens) * np.float32(self.hidden_size ** 0.5)


def sandwich_block(self, ctx, layer, x):
    """Gemma 2 and 3: each sub-block's input and output are normalised (four norms a layer)."""
    p = f"model.layers.{layer}."
    attn = self.attention(ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
    x = x + self.norm(ctx, attn, p + "post_attention_layernorm")
    ctx.observe(RESID_MID, layer, x)
    down = blocks.gated_mlp(ctx, layer, self.norm(ctx, x, p + "pre_feedforward_layernorm"), p + "mlp",
                            self.activation)
    x = x + self.norm(ctx, down, p + "post_feedforward_layernorm")
    ctx.observe(RESID, layer, x)
    return x


def softcapped_head(self, ctx, x):
    """Gemma 2 and 3: the logits soft-capped (when the config names a cap)."""
    return softcap(Architecture.head(self, ctx, x), self.final_softcap)

def refuse_bidirectional(args):
    """Gemma configs with bidirectional attention are embedding models (EmbeddingGemma)."""
    if args.use_bidirectional_attention:
        raise SwtoolError(f"config.json ({args.model_type}): use_bidirectional_attention is set: "
                          f"an embedding model, not a causal language model")


@dataclass(frozen=True, kw_only=True)
class GemmaArgs(DecoderArgs):
    head_dim: Count = 256
    tie_word_embeddings: bool = True
    hidden_act: str = "gelu_pytorch_tanh"
    use_bidirectional_attention: bool = False

    def check(self):
        super().check()
        refuse_bidirectional(self)


class Gemma(Architecture):
    model_types = ("gemma",)
    Args = GemmaArgs

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.RmsNorm(args.rms_norm_eps, plus_one=True)
        self.tied = args.tie_word_embeddings
        # transformers runs "gelu" as gelu_pytorch_tanh in Gemma 1
        self.activation = blocks.activation("gelu_pytorch_tanh" if args.hidden_act == "gelu" else args.hidden_act)
        self.attn_bias = args.attention_bias

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("gemma",)

    def gguf_arch(self):
        return "GEMMA"

    def gguf_arch_name(self):
        return "gemma"

    def gguf_value_offset(self, gguf_name):
        return norm_offset(gguf_name)

    def gguf_hyperparameters(self, writer):
        """GemmaModel.set_gguf_parameters."""
        write_gemma_hyperparameters(self, writer)

    def gguf_tokenizer(self, writer, directory):
        return write_gemma_tokenizer(self, writer, directory)

    def gguf_vocabulary(self, writer, directory, kind):
        writer.add_eot_token_id(EOT_TOKEN)
        no_space_prefix(writer, directory)

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        return {**gemma_config(hparams, "gemma", "GemmaForCausalLM"), "hidden_act": "gelu_pytorch_tanh"}

    def tensor_shapes(self):
        d, shapes = self.hidden_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(blocks.attention_tensors(p + "self_attn", d, self.heads, self.attn_bias, self.attn_bias))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(blocks.gated_mlp_tensors(p + "mlp", d, self.intermediate_size))
        return shapes

    embed = scaled_embed

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + self.attention(ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
        ctx.observe(RESID_MID, layer, x)
        x = x + blocks.gated_mlp(ctx, layer, self.norm(ctx, x, p + "post_attention_layernorm"), p + "mlp",
                                 self.activation)
        ctx.observe(RESID, layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn"
        q, k, v = blocks.qkv_projections(ctx, h, p, self.attn_bias)
        out = blocks.attend(ctx, self.heads, q, k, v, rope=blocks.rope_tables(ctx, self.config, self.heads.dim))
        return ctx.linear(out, p + ".o_proj.weight", self.attn_bias)


@dataclass(frozen=True, kw_only=True)
class Gemma2Args(DecoderArgs):
    head_dim: Count = 256
    tie_word_embeddings: bool = True
    hidden_act: str = "gelu_pytorch_tanh"
    hidden_activation: str = "gelu_pytorch_tanh"  # read literally (no "gelu" rewrite as in Gemma 1)
    use_bidirectional_attention: bool = False
    query_pre_attn_scalar: Positive = 256
    attn_logit_softcapping: Positive = null_is_off(50.0)
    final_logit_softcapping: Positive = null_is_off(30.0)

    def check(self):
        super().check()
        refuse_bidirectional(self)


class Gemma2(Architecture):
    mlp_output_norm = "post_feedforward_layernorm"
    model_types = ("gemma2",)
    Args = Gemma2Args

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.RmsNorm(args.rms_norm_eps, plus_one=True)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_activation)
        self.attn_bias = args.attention_bias
        self.query_scale = args.query_pre_attn_scalar ** -0.5
        self.attn_softcap = args.attn_logit_softcapping
        self.final_softcap = args.final_logit_softcapping

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("gemma2",)
    gguf_windows = True

    def gguf_arch(self):
        return "GEMMA2"

    def gguf_arch_name(self):
        return "gemma2"

    def gguf_value_offset(self, gguf_name):
        return norm_offset(gguf_name)

    def gguf_hyperparameters(self, writer):
        """Gemma2Model.set_gguf_parameters: Gemma's keys, the soft-caps and the window."""
        check_llama_cpp_rules(self, "gemma2")
        if self.attn_softcap is None or self.final_softcap is None:
            raise SwtoolError("gemma2 without a soft-cap cannot be exported: llama.cpp's gemma2 always caps "
                              "(50 and 30 when the file names none)")
        write_gemma_hyperparameters(self, writer)
        writer.add_attn_logit_softcapping(self.attn_softcap)
        writer.add_final_logit_softcapping(self.final_softcap)
        writer.add_sliding_window(self.args.sliding_window)

    def gguf_tokenizer(self, writer, directory):
        return write_gemma_tokenizer(self, writer, directory)

    def gguf_vocabulary(self, writer, directory, kind):
        no_space_prefix(writer, directory)

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        config = gemma_config(hparams, "gemma2", "Gemma2ForCausalLM")
        config.update(gemma_attention_from_gguf(hparams, config))
        config["attn_logit_softcapping"] = hparams.float32(hparams("attn_logit_softcapping", 50.0, kind=float))
        config["final_logit_softcapping"] = hparams.float32(hparams("final_logit_softcapping", 30.0, kind=float))
        return config

    def tensor_shapes(self):
        return gemma2_tensors(self)

    def sliding_window(self, layer):
        return self.args.sliding_window if sliding(self.args, layer, 2) else None

    embed = scaled_embed

    block = sandwich_block

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn"
        q, k, v = blocks.qkv_projections(ctx, h, p, self.attn_bias)
        out = blocks.attend(ctx, self.heads, q, k, v, rope=blocks.rope_tables(ctx, self.config, self.heads.dim),
                            window=self.sliding_window(layer), scale=self.query_scale, softcap=self.attn_softcap)
        return ctx.linear(out, p + ".o_proj.weight", self.attn_bias)

    head = softcapped_head


def softcap(logits, cap):
    """cap * tanh(logits / cap), or the logits when cap is None."""
    if cap is None:
        return logits
    cap = np.float32(cap)
    return np.tanh(logits / cap) * cap


def sliding(args, layer, pattern):
    """Does `layer` attend through a sliding window? layer_types says, else layer i slides unless
    (i + 1) is a multiple of `pattern`."""
    slides = args.layer_slides(layer)
    return bool((layer + 1) % pattern) if slides is None else slides


def gemma2_tensors(arch):
    """Gemma 2 and 3: four norms around the two sub-blocks."""
    d, shapes = arch.hidden_size, arch.model_tensors()
    for layer in range(arch.n_layers):
        p = f"model.layers.{layer}."
        shapes.update(arch.norm.tensors(p + "input_layernorm", d))
        shapes.update(blocks.attention_tensors(p + "self_attn", d, arch.heads, arch.attn_bias, arch.attn_bias))
        shapes.update(arch.norm.tensors(p + "post_attention_layernorm", d))
        shapes.update(arch.norm.tensors(p + "pre_feedforward_layernorm", d))
        shapes.update(blocks.gated_mlp_tensors(p + "mlp", d, arch.intermediate_size))
        shapes.update(arch.norm.tensors(p + "post_feedforward_layernorm", d))
    return shapes


@dataclass(frozen=True, kw_only=True)
class Gemma3Args(DecoderArgs):
    head_dim: Count = 256
    tie_word_embeddings: bool = True
    hidden_act: str = "gelu_pytorch_tanh"
    hidden_activation: str = "gelu_pytorch_tanh"
    use_bidirectional_attention: bool = False
    query_pre_attn_scalar: Positive = 256
    attn_logit_softcapping: Positive = null_is_off(50.0)
    final_logit_softcapping: Positive = None  # no soft-cap unless the config names one
    sliding_window_pattern: Count = 6  # without layer_types, layer i slides unless (i + 1) is a multiple

    def check(self):
        super().check()
        refuse_bidirectional(self)


class Gemma3(Architecture):
    mlp_output_norm = "post_feedforward_layernorm"
    model_types = ("gemma3_text",)
    Args = Gemma3Args

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.RmsNorm(args.rms_norm_eps, plus_one=True)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_activation)
        self.attn_bias = args.attention_bias
        self.query_scale = args.query_pre_attn_scalar ** -0.5
        self.final_softcap = args.final_logit_softcapping

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("gemma3",)
    gguf_windows = True

    def gguf_arch(self):
        return "GEMMA3"

    def gguf_arch_name(self):
        return "gemma3"

    def gguf_value_offset(self, gguf_name):
        return norm_offset(gguf_name)

    def gguf_hyperparameters(self, writer):
        """Gemma3Model.set_gguf_parameters (over TextModel's): global layers' RoPE, the sliding layers' base."""
        check_llama_cpp_rules(self, "gemma3")
        write_gemma_hyperparameters(self, writer)
        full_theta, scaling = rope_settings(self.rope_config("full_attention"))
        add_rope_scaling(writer, scaling)
        writer.add_rope_freq_base(full_theta)
        sliding_theta = self.named_sliding_theta()
        if sliding_theta is not None:
            writer.add_rope_freq_base_swa(sliding_theta)
        if self.final_softcap:
            writer.add_final_logit_softcapping(self.final_softcap)
        if self.args.sliding_window is not None and self.config.get("sliding_window_pattern") != 1:
            writer.add_sliding_window(self.args.sliding_window)

    def named_sliding_theta(self):
        """The sliding layers' RoPE base when the config names one (the converter writes only that)."""
        params = self.config.get("rope_parameters")
        if isinstance(params, dict) and isinstance(params.get("sliding_attention"), dict):
            return params["sliding_attention"].get("rope_theta")
        return self.config.get("rope_local_base_freq")

    def gguf_tokenizer(self, writer, directory):
        return write_gemma_tokenizer(self, writer, directory)

    def gguf_vocabulary(self, writer, directory, kind):
        no_space_prefix(writer, directory)

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        from swtool.arch.llama import rope_scaling_from_gguf

        config = gemma_config(hparams, "gemma3_text", "Gemma3ForCausalLM")
        config.update(gemma_attention_from_gguf(hparams, config))
        full = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
        full.update(rope_scaling_from_gguf(hparams) or {})
        sliding_theta = hparams.float32(hparams("rope.freq_base_swa", 10000.0, kind=float))
        config["rope_parameters"] = {"full_attention": full,
                                     "sliding_attention": {"rope_type": "default", "rope_theta": sliding_theta}}
        config["attn_logit_softcapping"] = None
        cap = hparams("final_logit_softcapping", None, required=False, kind=float)
        config["final_logit_softcapping"] = None if cap is None else hparams.float32(cap)
        return config

    def tensor_shapes(self):
        shapes = gemma2_tensors(self)
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}.self_attn."
            shapes.update(self.norm.tensors(p + "q_norm", self.heads.dim))
            shapes.update(self.norm.tensors(p + "k_norm", self.heads.dim))
        return shapes

    def sliding_window(self, layer):
        return self.args.sliding_window if sliding(self.args, layer, self.args.sliding_window_pattern) else None

    embed = scaled_embed

    block = sandwich_block

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn"
        q, k, v = blocks.qkv_projections(ctx, h, p, self.attn_bias)
        kind = "sliding_attention" if sliding(self.args, layer, self.args.sliding_window_pattern) else "full_attention"
        rope = blocks.rope_tables(ctx, self.rope_config(kind), self.heads.dim, key=f"rope.{kind}")
        out = blocks.attend(ctx, self.heads, q, k, v, rope=rope, window=self.sliding_window(layer),
                            scale=self.query_scale,
                            qk_norm=lambda q, k: (self.norm(ctx, q, p + ".q_norm"), self.norm(ctx, k, p + ".k_norm")))
        return ctx.linear(out, p + ".o_proj.weight", self.attn_bias)

    head = softcapped_head

    def rope_config(self, kind):
        """A config-like dict holding only this layer type's RoPE, in either config spelling."""
        config = {"max_position_embeddings": self.config.get("max_position_embeddings", 131072)}
        sliding = kind == "sliding_attention"
        params = self.config.get("rope_parameters")
        if isinstance(params, dict) and isinstance(params.get(kind), dict):
            # transformers 5: {"sliding_attention": {...}, "full_attention": {...}}
            return {**config, "rope_parameters": {"rope_theta": 1e4 if sliding else 1e6, **params[kind]}}
        if sliding:
            # Hub configs: local layers use rope_local_base_freq and are never scaled
            return {**config, "rope_theta": self.config.get("rope_local_base_freq", 1e4)}
        return {**config, "rope_theta": self.config.get("rope_theta", 1e6), "rope_scaling": self.config.get("rope_scaling")}


# --- GGUF --------------------------------------------------------------------------------

def norm_offset(gguf_name):
    """Every Gemma norm weight is stored as 1 + w: the (1 + weight) RMSNorm's factor itself."""
    return 1.0 if gguf_name.endswith("norm.weight") else 0.0


def write_gemma_hyperparameters(arch, writer):
    """The `{arch}.*` keys every Gemma converter writes."""
    writer.add_context_length(int(arch.config.get("max_position_embeddings", 131072)))
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(arch.n_layers)
    writer.add_feed_forward_length(arch.intermediate_size)
    writer.add_head_count(arch.heads.n)
    writer.add_head_count_kv(arch.heads.n_kv)
    writer.add_layer_norm_rms_eps(arch.args.rms_norm_eps)
    writer.add_key_length(arch.heads.dim)
    writer.add_value_length(arch.heads.dim)
    if arch.model_type in ("gemma", "gemma2"):  # their converters store no RoPE: llama.cpp's default base is 10 000
        theta, scaling = rope_settings(arch.config)
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise SwtoolError(f"{arch.model_type} with RoPE scaling is not supported for export")
        if theta != 10000.0:  # not written by the converter, which would lose it
            writer.add_rope_freq_base(theta)


def write_gemma_tokenizer(arch, writer, directory):
    """The vocabulary from tokenizer.model, as the converters build it; tokenizer.json when it is the only one."""
    from swtool.export_vocab import add_sentencepiece_vocabulary

    if (directory / "tokenizer.model").is_file():
        add_sentencepiece_vocabulary(writer, directory, arch.vocab_size)
        return "llama"
    return Architecture.gguf_tokenizer(arch, writer, directory)


def no_space_prefix(writer, directory):
    """The converters' add_space_prefix = false after a tokenizer.model vocabulary (a tokenizer.json one
    has already said whether its tokenizer prepends a space)."""
    if (directory / "tokenizer.model").is_file():
        writer.add_add_space_prefix(False)


def llama_cpp_query_scalar(model_type, n_layers, hidden, n_head, head_dim):
    """The query_pre_attn_scalar llama.cpp's gemma2/gemma3 use: hidden / heads for the 27B models, else head_dim."""
    return hidden // n_head if n_layers == LARGEST.get(model_type) else head_dim


def check_llama_cpp_rules(arch, gguf_arch):
    """Refuse a config that llama.cpp's rules for `gguf_arch` would run differently from transformers."""
    scalar = llama_cpp_query_scalar(gguf_arch, arch.n_layers, arch.hidden_size, arch.heads.n, arch.heads.dim)
    if arch.args.query_pre_attn_scalar != scalar:
        raise SwtoolError(f"query_pre_attn_scalar {arch.args.query_pre_attn_scalar:g} cannot be exported: "
                          f"llama.cpp's {gguf_arch} scales attention by 1/sqrt({scalar}) for this model")
    pattern = SWA_PATTERN[gguf_arch]
    theirs = [arch.args.sliding_window is not None and bool((layer + 1) % pattern) for layer in range(arch.n_layers)]
    ours = [arch.sliding_window(layer) is not None for layer in range(arch.n_layers)]
    if ours != theirs:
        raise SwtoolError(f"sliding layers {[i for i, s in enumerate(ours) if s]} cannot be exported: llama.cpp's "
                          f"{gguf_arch} slides layer i unless (i + 1) is a multiple of {pattern}")


def gemma_config(hparams, model_type, architecture):
    """config.json keys every Gemma GGUF gives."""
    hidden, n_head = hparams("embedding_length"), hparams("attention.head_count")
    head_dim = hparams("attention.key_length", hidden // n_head)
    if hparams("attention.value_length", head_dim) != head_dim:
        raise hparams.error("keys and values of different sizes do not fit a Gemma config")
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": hparams("feed_forward_length"),
        "num_hidden_layers": hparams("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": hparams("attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": hparams.float32(hparams("attention.layer_norm_rms_epsilon", kind=float)),
        "rope_theta": hparams.float32(hparams("rope.freq_base", 10000.0, kind=float)),
        "max_position_embeddings": hparams("context_length"),
        "attention_bias": False,
    }


def gemma_attention_from_gguf(hparams, config):
    """Gemma 2/3: the attention scale and sliding layers llama.cpp derives, in config.json's terms."""
    model_type = hparams.arch
    n_layers = config["num_hidden_layers"]
    window = hparams("attention.sliding_window", None, required=False)
    pattern = SWA_PATTERN[model_type]
    slides = [window is not None and bool((layer + 1) % pattern) for layer in range(n_layers)]
    return {
        "query_pre_attn_scalar": llama_cpp_query_scalar(model_type, n_layers, config["hidden_size"],
                                                        config["num_attention_heads"], config["head_dim"]),
        "sliding_window": window,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in slides],
    }

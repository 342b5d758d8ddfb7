"""The Llama family: Llama 1/2/3, Mistral, Qwen2.

    h   = x + o_proj(attention(rope(q_proj(norm(x))), rope(k_proj(..)), v_proj(..)))
    out = h + down_proj(silu(gate_proj(norm(h))) * up_proj(norm(h)))

They differ only in config: Llama 3 scales RoPE frequencies (rope_type llama3),
Mistral may use a sliding attention window, Qwen2 has q/k/v biases and slides
its window only from `max_window_layers` on; GQA wherever
num_key_value_heads < num_attention_heads.

GGUF: llama.cpp converts Llama and Mistral as its "llama" architecture, whose Q and K
rows it permutes (its RoPE rotates neighbouring pairs, Hugging Face's the two halves
of each head), and Qwen2 as "qwen2", unpermuted. Llama 3.1-style RoPE scaling travels
as a `rope_freqs.weight` tensor of per-frequency divisors. A "llama" file with
`llama.expert_count` is a Mixtral (mixtral.py), read here as its config says.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture, DecoderArgs, Index
from swtool.arch.moe import mixture_config_from_gguf
from swtool.arch.rope import inv_freq, rope_settings
from swtool.errors import SwtoolError

PERMUTED = ("attn_q", "attn_k")  # the tensors llama.cpp's "llama" architecture stores with permuted rows
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1-style RoPE scaling, as the converter writes it


@dataclass(frozen=True, kw_only=True)
class LlamaArgs(DecoderArgs):
    max_window_layers: Index = 0  # Qwen2: the first layer whose window slides


class Llama(Architecture):
    model_types = ("llama", "mistral", "qwen2")
    Args = LlamaArgs

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.eps = args.rms_norm_eps
        self.norm = blocks.RmsNorm(self.eps)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_act)
        # which linears carry a bias: Llama's two flags, Qwen2's fixed q/k/v biases
        self.qkv_bias = args.attention_bias or self.model_type == "qwen2"
        self.o_bias = args.attention_bias
        self.mlp_bias = args.mlp_bias

    # --- names ---------------------------------------------------------------------
    def tensor_shapes(self):
        d, shapes = self.hidden_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(blocks.attention_tensors(p + "self_attn", d, self.heads, self.qkv_bias, self.o_bias))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(blocks.gated_mlp_tensors(p + "mlp", d, self.intermediate_size, self.mlp_bias))
        return shapes

    def sliding_window(self, layer):
        """Attention window of a layer in tokens, or None for full causal attention."""
        args, window = self.args, self.args.sliding_window
        if args.layer_slides(layer) is not None:
            return window if args.layer_slides(layer) else None
        if self.model_type == "qwen2":
            return window if args.use_sliding_window and layer >= args.max_window_layers else None
        if self.model_type == "mistral":
            return window
        return None

    # --- math ------------------------------------------------------------------------
    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + self.attention(ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
        ctx.observe(RESID_MID, layer, x)
        x = x + blocks.gated_mlp(ctx, layer, self.norm(ctx, x, p + "post_attention_layernorm"), p + "mlp",
                                 self.activation, self.mlp_bias)
        ctx.observe(RESID, layer, x)
        return x

    def attention(self, ctx, layer, h):
        return llama_attention(self, ctx, layer, h)

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("llama", "qwen2")
    gguf_derived = (ROPE_FREQS,)

    def gguf_arch(self):
        return "QWEN2" if self.model_type == "qwen2" else "LLAMA"  # llama.cpp converts Mistral as llama

    def gguf_arch_name(self):
        return "qwen2" if self.model_type == "qwen2" else "llama"

    def gguf_stored_rows(self, gguf_name, n_rows):
        kind = gguf_name.split(".")[-2]  # "attn_q" in "blk.3.attn_q.weight"
        if self.gguf_arch_name() != "llama" or kind not in PERMUTED:
            return None
        return unpermute_order(n_rows, self.heads.n if kind == "attn_q" else self.heads.n_kv)

    def gguf_extra_tensors(self):
        factors = llama3_rope_factors(self.config, self.heads.dim)
        return {} if factors is None else {ROPE_FREQS: factors}

    def gguf_hyperparameters(self, writer):
        """The `{arch}.*` keys of convert_hf_to_gguf's LlamaModel (Llama, Mistral, Mixtral) / Qwen2Model."""
        text_model_hyperparameters(self, writer)
        if self.gguf_arch_name() == "llama":  # LlamaModel's own, beyond TextModel's
            writer.add_vocab_size(self.vocab_size)
            writer.add_rope_dimension_count(self.heads.dim)

    def gguf_vocabulary(self, writer, directory, kind):
        """LlamaModel.set_vocab (Llama, Mistral): tokenizer_config.json's add_prefix_space, when it says one,
        for a byte-level BPE (a SentencePiece vocabulary's own add_space_prefix overrides it there)."""
        if self.gguf_arch_name() == "llama" and kind == "gpt2":
            add_prefix_space_key(writer, directory)

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        model_type = hparams.arch  # "llama" or "qwen2", as the file says; "llama" with experts is Mixtral
        if model_type == "llama" and f"llama.{EXPERT_COUNT}" in hparams.meta:
            model_type = "mixtral"
        config = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
                  **decoder_config_from_gguf(hparams)}
        if model_type == "llama":
            config["attention_bias"] = "blk.0.attn_q.bias" in gguf_tensors
            config["attention_dropout"] = 0.0
            config["mlp_bias"] = "blk.0.ffn_down.bias" in gguf_tensors
        if model_type == "mixtral":
            config.update(mixture_config_from_gguf(hparams, normalised=True))  # llama.cpp's Mixtral normalises
        if ROPE_FREQS in gguf_tensors:
            config["rope_scaling"] = freq_factor_scaling(gguf_tensors[ROPE_FREQS], config, hparams)
        return config


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}
EXPERT_COUNT = "expert_count"


def decoder_config_from_gguf(hparams):
    """config.json's keys that llama-like GGUF architectures all store the same way: sizes, heads,
    RMS epsilon, RoPE (as convert_hf_to_gguf's TextModel writes them)."""
    hidden, n_head = hparams("embedding_length"), hparams("attention.head_count")
    head_dim = hparams("attention.key_length", hidden // n_head)
    if hparams("attention.value_length", head_dim) != head_dim:
        raise hparams.error("keys and values of different sizes do not fit a llama-style config")
    if hparams("rope.dimension_count", head_dim) != head_dim:
        raise hparams.error("partial rotary embeddings do not fit a llama-style config")
    return {
        "hidden_size": hidden,
        "intermediate_size": hparams("feed_forward_length"),
        "num_hidden_layers": hparams("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": hparams("attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": hparams.float32(hparams("attention.layer_norm_rms_epsilon", kind=float)),
        "rope_theta": hparams.float32(hparams("rope.freq_base", 10000.0, kind=float)),
        "rope_scaling": rope_scaling_from_gguf(hparams),
        "max_position_embeddings": hparams("context_length"),
    }


def text_model_hyperparameters(arch, writer, rms_norm_eps=None):
    """The `{arch}.*` keys convert_hf_to_gguf's TextModel.set_gguf_parameters writes for a llama-like
    family: sizes, heads, RoPE, RMS epsilon (`rms_norm_eps` when the family's converter overrides the
    config's), expert counts, head_dim when config.json gives one."""
    import gguf

    config = arch.config
    writer.add_block_count(arch.n_layers)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(arch.hidden_size)
    writer.add_feed_forward_length(arch.args.intermediate_size)  # a mixture's dense one: what the config says
    writer.add_head_count(arch.heads.n)
    writer.add_head_count_kv(arch.heads.n_kv)
    theta, scaling = rope_settings(config)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif rope_type not in ("default", "llama3"):  # llama3 travels as the rope_freqs tensor
        raise SwtoolError(f"RoPE scaling {rope_type!r} is not supported for export "
                          f"(supported: none, linear, llama3)")
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(arch.args.rms_norm_eps if rms_norm_eps is None else rms_norm_eps)
    if arch.moe is not None:
        writer.add_expert_count(arch.moe.n_experts)
        writer.add_expert_used_count(arch.moe.top_k)
    if arch.config.get("head_dim") is not None:
        writer.add_key_length(arch.heads.dim)
        writer.add_value_length(arch.heads.dim)


def add_prefix_space_key(writer, directory):
    """LlamaModel.set_vocab (Llama, Mistral, Granite): tokenizer_config.json's add_prefix_space, when it says one."""
    from swtool.jsonfile import read_json

    path = Path(directory) / "tokenizer_config.json"
    settings = read_json(path) if path.is_file() else {}
    add_prefix_space = settings.get("add_prefix_space") if isinstance(settings, dict) else None
    if isinstance(add_prefix_space, bool):
        writer.add_add_space_prefix(add_prefix_space)


def llama_attention(arch, ctx, layer, h):
    """Llama's attention (Mixtral's and Qwen2-MoE's too): q/k/v projections, RoPE, a causal window."""
    p = f"model.layers.{layer}.self_attn"
    q, k, v = blocks.qkv_projections(ctx, h, p, arch.qkv_bias)
    out = blocks.attend(ctx, arch.heads, q, k, v, rope=blocks.rope_tables(ctx, arch.config, arch.heads.dim),
                        window=arch.sliding_window(layer))
    return ctx.linear(out, p + ".o_proj.weight", arch.o_bias)


def unpermute_order(n_rows, n_head):
    """Stored row of each HF row of a Q or K matrix that convert_hf_to_gguf permuted.

    HF keeps each head's rotary rows as [first halves, second halves]; llama.cpp
    interleaves them, via w.reshape(n_head, 2, half, cols).swapaxes(1, 2):
    HF row h*2*half + s*half + i is stored at h*2*half + 2*i + s.
    """
    half = n_rows // n_head // 2
    if half * 2 * n_head != n_rows:
        raise SwtoolError(f"{n_rows} rows do not split into {n_head} heads of rotary pairs")
    head, rest = np.divmod(np.arange(n_rows), 2 * half)
    side, i = np.divmod(rest, half)
    return head * 2 * half + 2 * i + side


def llama3_rope_factors(config, head_dim):
    """rope_freqs.weight for Llama 3.1-style RoPE scaling: each frequency's divisor, or None."""
    theta, scaling = rope_settings(config)
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    unscaled = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    return (unscaled.astype(np.float64) / inv_freq(config, head_dim).astype(np.float64)).astype(np.float32)


def rope_scaling_from_gguf(hparams):
    """rope_scaling of config.json from `{arch}.rope.scaling.*`: none or linear."""
    kind = hparams.meta.get(f"{hparams.arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        factor = hparams.meta.get(f"{hparams.arch}.rope.scaling.factor")
        if not hparams.number(factor, float):
            raise hparams.error(f"metadata {hparams.arch}.rope.scaling.factor = {factor!r}: linear RoPE "
                                f"scaling needs a positive factor")
        return {"rope_type": "linear", "factor": hparams.float32(factor)}
    raise hparams.error(f"RoPE scaling {kind!r} is not supported for GGUF input (supported: none, linear)")


def freq_factor_scaling(info, config, hparams):
    """rope_scaling for a file with rope_freqs.weight: llama.cpp divides frequency i by factor i.

    convert_hf_to_gguf writes this tensor for Llama 3.1-style scaling (rope_type "llama3"),
    computed from the config's factor, low/high_freq_factor and original context, and keeps
    none of those numbers in the metadata. The factors themselves are what llama.cpp uses,
    so swtool uses them too: rope_type "freq_factors" (rope.py).
    """
    if config.get("rope_scaling"):
        raise hparams.error(f"{ROPE_FREQS} together with RoPE scaling "
                            f"{config['rope_scaling']['rope_type']!r} is not supported")
    n_freqs = config["head_dim"] // 2
    if info.shape != (n_freqs,):
        raise hparams.error(f"tensor {ROPE_FREQS!r} has shape {list(info.shape)}; "
                            f"a head of {config['head_dim']} dims has {n_freqs} frequencies")
    factors = info.read()
    if not (np.all(np.isfinite(factors)) and np.all(factors > 0)):
        raise hparams.error(f"tensor {ROPE_FREQS!r} holds factors that are not positive finite numbers")
    return {"rope_type": "freq_factors", "factors": [float(f) for f in factors]}

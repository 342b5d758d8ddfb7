"""Phi-3 (and Phi-3.5 / Phi-4-mini): Llama's block with fused projections.

    q, k, v  = split(qkv_proj(norm(x)))                  one matrix [q + k + v rows, hidden]
    h        = x + o_proj(attention(rope(q), rope(k), v))
    gate, up = split(gate_up_proj(norm(h)))               one matrix [2 * intermediate, hidden]
    out      = h + down_proj(up * silu(gate))

The fused matrices are split along their output rows: qkv_proj holds all query
heads, then all key heads, then all value heads; gate_up_proj holds the gate
rows first, then the up rows. No biases anywhere.

RoPE: `longrope` (older configs say "su") divides each frequency by its own
factor, `short_factor` while the prompt fits the trained context
(original_max_position_embeddings) and `long_factor` beyond it, and multiplies
cos/sin by sqrt(1 + ln(factor) / ln(trained context)); see rope.py.
`partial_rotary_factor` < 1 rotates only the first dims of each head (Phi-4-mini).
A `sliding_window` in the config applies to every layer.

GGUF: llama.cpp's "phi3" architecture keeps the fused matrices as they are (attn_qkv,
ffn_up holding gate then up). longrope travels as two tensors of per-frequency
divisors, rope_factors_long/short, with `rope.scaling.original_context_length` and
the attention factor; `rope.dimension_count` says how much of each head rotates.
A sliding window of 0 means none. The vocabulary comes from tokenizer.model, with
Phi-3's own treatment of added tokens (Phi3MiniModel.set_vocab), unless
tokenizer_config.json names GPT2Tokenizer (Phi-4). llama.cpp does not apply Phi-3's
sliding window (it attends to the whole context).
"""

import math
from dataclasses import dataclass

import numpy as np

from swtool.arch import blocks
from swtool.arch.base import RESID, RESID_MID, Architecture, DecoderArgs, Positive
from swtool.arch.rope import rope_settings
from swtool.errors import SwtoolError

LONG, SHORT = "rope_factors_long.weight", "rope_factors_short.weight"  # longrope's divisors, as the converter writes them


@dataclass(frozen=True, kw_only=True)
class Phi3Args(DecoderArgs):
    rms_norm_eps: Positive = 1e-5  # Phi3Config's default, not Llama's


class Phi3(Architecture):
    model_types = ("phi3",)
    Args = Phi3Args

    def __init__(self, config):
        super().__init__(config)
        args = self.args
        self.heads = blocks.attention_heads(args)
        self.intermediate_size = args.intermediate_size
        self.norm = blocks.RmsNorm(args.rms_norm_eps)
        self.tied = args.tie_word_embeddings
        self.activation = blocks.activation(args.hidden_act)

    # --- GGUF ------------------------------------------------------------------------
    gguf_exports = True
    gguf_reads = ("phi3",)
    gguf_derived = (LONG, SHORT)

    def gguf_arch(self):
        return "PHI3"

    def gguf_arch_name(self):
        return "phi3"

    def rope_dims(self):
        """Rotated dims of a head, as Phi3MiniModel computes them: int(factor * hidden) // heads."""
        theta, scaling = rope_settings(self.config)
        fraction = self.config.get("partial_rotary_factor", scaling.get("partial_rotary_factor", 1.0))
        return int(fraction * self.hidden_size) // self.heads.n

    def original_context(self):
        _, scaling = rope_settings(self.config)
        return self.config.get("original_max_position_embeddings", scaling.get("original_max_position_embeddings"))

    def longrope(self):
        """The config's longrope settings, or None without long factors (no scaling)."""
        _, scaling = rope_settings(self.config)
        if not scaling.get("long_factor"):
            return None
        if scaling.get("rope_type", scaling.get("type")) not in ("longrope", "su"):
            raise SwtoolError(f"phi3 RoPE scaling {scaling.get('rope_type')!r} is not supported for export "
                              f"(supported: none, longrope)")
        return scaling

    def gguf_hyperparameters(self, writer):
        """Phi3MiniModel.set_gguf_parameters, and the attention factor of its generate_extra_tensors."""
        theta, _ = rope_settings(self.config)
        context, original = int(self.config["max_position_embeddings"]), self.original_context()
        if original is None:
            raise SwtoolError("phi3 export needs original_max_position_embeddings in config.json (as the converter)")
        writer.add_context_length(context)
        writer.add_rope_scaling_orig_ctx_len(int(original))
        writer.add_embedding_length(self.hidden_size)
        writer.add_feed_forward_length(self.intermediate_size)
        writer.add_block_count(self.n_layers)
        writer.add_head_count(self.heads.n)
        writer.add_head_count_kv(self.heads.n_kv)
        writer.add_layer_norm_rms_eps(self.args.rms_norm_eps)
        writer.add_rope_dimension_count(self.rope_dims())
        writer.add_rope_freq_base(theta)
        writer.add_sliding_window(self.args.sliding_window or 0)  # 0: none
        if self.longrope() is not None:
            scale = context / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)

    def gguf_extra_tensors(self):
        scaling = self.longrope()
        if scaling is None:
            return {}
        return {LONG: np.asarray(scaling["long_factor"], dtype=np.float32),
                SHORT: np.asarray(scaling["short_factor"], dtype=np.float32)}

    def gguf_tokenizer(self, writer, directory):
        """Phi3MiniModel.set_vocab: tokenizer.model, whose added tokens (tokenizer_config.json's, then
        tokenizer.json's) become USER_DEFINED or CONTROL with score -1000; GPT2Tokenizer checkpoints
        (Phi-4) and those without tokenizer.model as tokenizer.json says."""
        from swtool.export_vocab import added_tokens_decoder, sentencepiece_tokens, write_sentencepiece
        from swtool.jsonfile import read_json

        config_path = directory / "tokenizer_config.json"
        settings = read_json(config_path) if config_path.is_file() else {}
        if (isinstance(settings, dict) and settings.get("tokenizer_class") == "GPT2Tokenizer"
                or not (directory / "tokenizer.model").is_file()):
            return super().gguf_tokenizer(writer, directory)
        tokens, scores, types = sentencepiece_tokens(directory, self.vocab_size)
        json_path = directory / "tokenizer.json"
        tokenizer = read_json(json_path) if json_path.is_file() else {}
        added = added_tokens_decoder(directory) + [(entry["id"], entry["content"], bool(entry.get("special")))
                                                   for entry in (tokenizer.get("added_tokens") or [])]
        for token_id, token, special in added:
            if token_id < self.vocab_size:
                tokens[token_id], scores[token_id] = token, -1000.0
                types[token_id] = 3 if special else 4  # CONTROL, USER_DEFINED
        write_sentencepiece(writer, directory, tokens, scores, types)
        return "llama"

    @classmethod
    def config_from_gguf(cls, hparams, gguf_tensors):
        hidden, n_head = hparams("embedding_length"), hparams("attention.head_count")
        head_dim = hidden // n_head
        rope_dims = hparams("rope.dimension_count", head_dim)
        window = hparams.meta.get("phi3.attention.sliding_window", 0)
        if type(window) is not int or window < 0:
            raise hparams.error(f"metadata phi3.attention.sliding_window = {window!r} is not a window size")
        config = {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "hidden_size": hidden,
            "intermediate_size": hparams("feed_forward_length"),
            "num_hidden_layers": hparams("block_count"),
            "num_attention_heads": n_head,
            "num_key_value_heads": hparams("attention.head_count_kv", n_head),
            "hidden_act": "silu",
            "rms_norm_eps": hparams.float32(hparams("attention.layer_norm_rms_epsilon", kind=float)),
            "rope_theta": hparams.float32(hparams("rope.freq_base", 10000.0, kind=float)),
            "max_position_embeddings": hparams("context_length"),
            "original_max_position_embeddings": hparams("rope.scaling.original_context_length", None, required=False),
            "sliding_window": window or None,
        }
        if rope_dims != head_dim:
            config["partial_rotary_factor"] = rope_dims / head_dim
        if LONG in gguf_tensors or SHORT in gguf_tensors:
            config["rope_scaling"] = longrope_from_gguf(hparams, gguf_tensors, rope_dims)
        return config

    def tensor_shapes(self):
        d, ff, shapes = self.hidden_size, self.intermediate_size, self.model_tensors()
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            shapes.update(self.norm.tensors(p + "input_layernorm", d))
            shapes.update(blocks.linear(p + "self_attn.qkv_proj", self.heads.q_size + 2 * self.heads.kv_size, d))
            shapes.update(blocks.linear(p + "self_attn.o_proj", d, self.heads.q_size))
            shapes.update(self.norm.tensors(p + "post_attention_layernorm", d))
            shapes.update(blocks.linear(p + "mlp.gate_up_proj", 2 * ff, d))
            shapes.update(blocks.linear(p + "mlp.down_proj", d, ff))
        return shapes

    def sliding_window(self, layer):
        return self.args.sliding_window  # transformers masks every layer when it is set

    def block(self, ctx, layer, x):
        p = f"model.layers.{layer}."
        x = x + self.attention(ctx, layer, self.norm(ctx, x, p + "input_layernorm"))
        ctx.observe(RESID_MID, layer, x)
        x = x + self.mlp(ctx, layer, self.norm(ctx, x, p + "post_attention_layernorm"))
        ctx.observe(RESID, layer, x)
        return x

    def attention(self, ctx, layer, h):
        p = f"model.layers.{layer}.self_attn."
        qkv = ctx.linear(h, p + "qkv_proj.weight")
        # the fused rows: all query heads, then all key heads, then all value heads
        q_size, kv_size = self.heads.q_size, self.heads.kv_size
        q, k, v = qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]
        # partial rotary and longrope's scaling are in the tables
        out = blocks.attend(ctx, self.heads, q, k, v, rope=blocks.rope_tables(ctx, self.config, self.heads.dim),
                            window=self.sliding_window(layer))
        return ctx.linear(out, p + "o_proj.weight")

    def mlp(self, ctx, layer, h):
        """One fused gate/up product split in two (gate rows first), gated activation, down projection."""
        p = f"model.layers.{layer}.mlp."
        gate_up = ctx.linear(h, p + "gate_up_proj.weight")
        gate, up = gate_up[..., :self.intermediate_size], gate_up[..., self.intermediate_size:]
        act = up * self.activation(gate)
        del gate_up, gate, up
        return blocks.down_projection(ctx, layer, act, p + "down_proj.weight")


def longrope_from_gguf(hparams, gguf_tensors, rope_dims):
    """rope_scaling from rope_factors_long/short.weight and the file's attention factor."""
    factors = {}
    for key, name in (("long_factor", LONG), ("short_factor", SHORT)):
        info = gguf_tensors.get(name)
        if info is None or info.shape != (rope_dims // 2,):
            raise hparams.error(f"longrope needs tensor {name!r} of {rope_dims // 2} factors")
        values = info.read()
        if not (np.all(np.isfinite(values)) and np.all(values > 0)):
            raise hparams.error(f"tensor {name!r} holds factors that are not positive finite numbers")
        factors[key] = [float(v) for v in values]
    scaling = {"rope_type": "longrope", **factors}
    attn_factor = hparams("rope.scaling.attn_factor", None, required=False, kind=float)
    if attn_factor is not None:
        scaling["attention_factor"] = hparams.float32(attn_factor)
    return scaling

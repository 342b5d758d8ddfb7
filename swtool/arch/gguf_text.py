"""What llama.cpp's converter writes for any text model, and how to read it back.

convert_hf_to_gguf's TextModel.set_gguf_parameters, which the converters of OLMo,
OLMo 2, StarCoder2 and (through LlamaModel) Granite start from, writes a `{arch}.*`
key for each config.json key it finds, the first present of a list of spellings
(its find_hparam); families add their own keys after. `text_model_keys` writes the
same from config.json, `text_model_config` reads the shared ones back.
"""

from swtool.arch.rope import rope_settings
from swtool.errors import SwtoolError

# (GGUFWriter method, config.json spellings in the order find_hparam tries them)
FOUND_KEYS = (
    ("add_context_length", ("max_position_embeddings", "n_ctx", "n_positions", "max_length",
                            "max_sequence_length", "model_max_length")),
    ("add_embedding_length", ("hidden_size", "n_embd", "dim")),
    ("add_feed_forward_length", ("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                                 "n_inner", "hidden_dim")),
    ("add_head_count", ("num_attention_heads", "n_head", "n_heads")),
    ("add_head_count_kv", ("num_key_value_heads", "n_kv_heads")),
    ("add_layer_norm_rms_eps", ("rms_norm_eps", "norm_eps")),
    ("add_layer_norm_eps", ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")),
    ("add_expert_count", ("num_local_experts", "num_experts", "n_routed_experts")),
    ("add_expert_used_count", ("num_experts_per_tok", "num_experts_per_token", "top_k_experts")),
)
LLAMA_CPP_ROPE_BASE = 10000.0  # what llama.cpp assumes when a file has no rope.freq_base


def found(config, spellings):
    """The value of the first of `spellings` config.json has (find_hparam), or None."""
    return next((config[key] for key in spellings if key in config), None)


def text_model_keys(writer, config, n_layers):
    """TextModel.set_gguf_parameters' keys for a config.json (transformers 5 spells every RoPE base)."""
    writer.add_block_count(n_layers)
    for method, spellings in FOUND_KEYS:
        value = found(config, spellings)
        if value is not None:
            getattr(writer, method)(value)
    if config.get("is_causal") is False:
        writer.add_causal_attention(False)
    theta, scaling = rope_settings(config)
    add_rope_scaling(writer, scaling)
    writer.add_rope_freq_base(theta)
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])


def add_rope_scaling(writer, scaling):
    """rope.scaling.* for linear scaling; other scalings llama.cpp's files of these families cannot hold."""
    import gguf

    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif rope_type != "default":
        raise SwtoolError(f"RoPE scaling {rope_type!r} is not supported for export (supported: none, linear)")


def text_model_config(hparams):
    """The config.json keys every family reads from the shared `{arch}.*` keys."""
    from swtool.arch.llama import rope_scaling_from_gguf

    n_head = hparams("attention.head_count")
    return {
        "hidden_size": hparams("embedding_length"),
        "intermediate_size": hparams("feed_forward_length"),
        "num_hidden_layers": hparams("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": hparams("attention.head_count_kv", n_head),
        "max_position_embeddings": hparams("context_length"),
        "rope_theta": hparams.float32(hparams("rope.freq_base", LLAMA_CPP_ROPE_BASE, kind=float)),
        "rope_scaling": rope_scaling_from_gguf(hparams),
    }


def rotary_fraction(hparams, head_dim):
    """partial_rotary_factor from rope.dimension_count: the rotating share of each head."""
    rotary = hparams("rope.dimension_count", head_dim)
    if rotary > head_dim or rotary % 2:
        raise hparams.error(f"metadata {hparams.arch}.rope.dimension_count = {rotary} does not fit "
                            f"heads of {head_dim} dims")
    return rotary / head_dim


def gguf_flag(hparams, key, default):
    """A boolean `{arch}.*` key, or `default` when the file has none."""
    value = hparams.meta.get(f"{hparams.arch}.{key}", default)
    if not isinstance(value, bool):
        raise hparams.error(f"metadata {hparams.arch}.{key} = {value!r} is not true or false")
    return value


def layer_norm_rope_keys(writer, arch, rope_config, rotary_dims, family, head_count_kv=None):
    """The keys GPTNeoXModel and StableLMModel write alike (LayerNorm blocks, partial RoPE, parallel
    residual or not). Neither writes a RoPE base, so llama.cpp takes 10000; swtool writes the base
    when it is another, which the converter's file would lose."""
    writer.add_context_length(arch.config["max_position_embeddings"])
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(arch.n_layers)
    writer.add_feed_forward_length(arch.intermediate_size)
    writer.add_rope_dimension_count(rotary_dims)
    writer.add_head_count(arch.heads.n)
    if head_count_kv is not None:
        writer.add_head_count_kv(head_count_kv)
    writer.add_parallel_residual(arch.parallel)
    writer.add_layer_norm_eps(arch.norm.eps)
    theta, scaling = rope_settings(rope_config)
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise SwtoolError(f"RoPE scaling is not supported for a {family} export (llama.cpp's converter writes none)")
    if theta != LLAMA_CPP_ROPE_BASE:
        writer.add_rope_freq_base(theta)

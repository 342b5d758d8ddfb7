"""config.json values checked for type and range before any architecture reads them.

Families read their hyper-parameters with plain int()/float()/bool() and use them
deep inside the forward pass (a window size in the attention mask, an epsilon in
a norm). A value of the wrong type there would surface as a traceback far from
its cause, so every key transformers gives a fixed meaning is checked here once,
for all families, and a wrong one is a one-line error naming config.json.
Keys a config does not have, or has as null, are left to the family's defaults.
"""

import math

from swtool.arch.base import positive_int
from swtool.errors import CheckpointError


def _non_negative_int(v):
    return type(v) is not bool and (isinstance(v, int) or (isinstance(v, float) and v.is_integer())) and v >= 0


def _positive_number(v):
    return type(v) is not bool and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _number(v):
    return type(v) is not bool and isinstance(v, (int, float)) and math.isfinite(v)


def _fraction(v):
    return _positive_number(v) and v <= 1


def _flag(v):
    return isinstance(v, bool)


def _text(v):
    return isinstance(v, str)


def _object(v):
    return isinstance(v, dict)


def _texts(v):
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# key -> (check, what it must be); null is always allowed (the family's default applies)
CHECKS = {
    "model_type": (_text, "a string"),
    "num_hidden_layers": (positive_int, "a positive integer"),
    "n_layer": (positive_int, "a positive integer"),
    "hidden_size": (positive_int, "a positive integer"),
    "n_embd": (positive_int, "a positive integer"),
    "intermediate_size": (positive_int, "a positive integer"),
    "n_inner": (positive_int, "a positive integer"),
    "num_attention_heads": (positive_int, "a positive integer"),
    "n_head": (positive_int, "a positive integer"),
    "num_key_value_heads": (positive_int, "a positive integer"),
    "head_dim": (positive_int, "a positive integer"),
    "vocab_size": (positive_int, "a positive integer"),
    "max_position_embeddings": (positive_int, "a positive integer"),
    "n_positions": (positive_int, "a positive integer"),
    "original_max_position_embeddings": (positive_int, "a positive integer"),
    "sliding_window": (positive_int, "a positive integer"),
    "max_window_layers": (_non_negative_int, "a non-negative integer"),
    "sliding_window_pattern": (positive_int, "a positive integer"),
    "num_local_experts": (positive_int, "a positive integer"),
    "num_experts_per_tok": (positive_int, "a positive integer"),
    "rope_theta": (_positive_number, "a positive number"),
    "rope_local_base_freq": (_positive_number, "a positive number"),
    "rotary_emb_base": (_positive_number, "a positive number"),
    "rms_norm_eps": (_positive_number, "a positive number"),
    "layer_norm_eps": (_positive_number, "a positive number"),
    "layer_norm_epsilon": (_positive_number, "a positive number"),
    "norm_epsilon": (_positive_number, "a positive number"),
    "partial_rotary_factor": (_fraction, "a number in (0, 1]"),
    "rotary_pct": (_fraction, "a number in (0, 1]"),
    "query_pre_attn_scalar": (_positive_number, "a positive number"),
    "attn_logit_softcapping": (_positive_number, "a positive number"),
    "final_logit_softcapping": (_positive_number, "a positive number"),
    "clip_qkv": (_positive_number, "a positive number"),
    "embedding_multiplier": (_number, "a finite number"),
    "residual_multiplier": (_number, "a finite number"),
    "attention_multiplier": (_number, "a finite number"),
    "logits_scaling": (_positive_number, "a positive number"),
    "tie_word_embeddings": (_flag, "true or false"),
    "attention_bias": (_flag, "true or false"),
    "mlp_bias": (_flag, "true or false"),
    "use_sliding_window": (_flag, "true or false"),
    "use_parallel_residual": (_flag, "true or false"),
    "use_qkv_bias": (_flag, "true or false"),
    "qk_layernorm": (_flag, "true or false"),
    "hidden_act": (_text, "a string"),
    "hidden_activation": (_text, "a string"),
    "activation_function": (_text, "a string"),
    "rope_scaling": (_object, "an object"),
    "rope_parameters": (_object, "an object"),
    "layer_types": (_texts, "a list of strings"),
    "architectures": (_texts, "a list of strings"),
}


# what each RoPE type needs in its scaling object (rope.py reads these): key -> (check, what it must be)
ROPE_NEEDS = {
    "linear": {"factor": (_positive_number, "a positive number")},
    "dynamic": {"factor": (_positive_number, "a positive number")},
    "llama3": {"factor": (_positive_number, "a positive number"),
               "low_freq_factor": (_positive_number, "a positive number"),
               "high_freq_factor": (_positive_number, "a positive number"),
               "original_max_position_embeddings": (positive_int, "a positive integer")},
}
ROPE_OPTIONAL = {
    "rope_theta": (_positive_number, "a positive number"),
    "factor": (_positive_number, "a positive number"),
    "attention_factor": (_positive_number, "a positive number"),
    "original_max_position_embeddings": (positive_int, "a positive integer"),
    "short_factor": (lambda v: isinstance(v, list) and all(_positive_number(x) for x in v), "a list of positive numbers"),
    "long_factor": (lambda v: isinstance(v, list) and all(_positive_number(x) for x in v), "a list of positive numbers"),
}


def check_config(config, source):
    """A CheckpointError(source, ...) for the first known key whose value has the wrong type or range."""
    if not isinstance(config, dict):
        raise CheckpointError(source, "not a JSON object")
    for key, (ok, what) in CHECKS.items():
        value = config.get(key)
        if value is not None and not ok(value):
            raise CheckpointError(source, f"{key} = {_short(value)} is not {what}")
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(config.get(key), dict):
            _check_rope(config[key], key, source)


def _check_rope(scaling, where, source):
    """A RoPE scaling object: its type's required numbers present and in range. Gemma 3 keys one
    object per layer type ({"sliding_attention": {...}, "full_attention": {...}}); each is checked."""
    if scaling and all(isinstance(v, dict) for v in scaling.values()):
        for name, inner in scaling.items():
            _check_rope(inner, f"{where}.{name}", source)
        return
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(kind, str):
        raise CheckpointError(source, f"{where}.rope_type = {_short(kind)} is not a string")
    for key, (ok, what) in ROPE_NEEDS.get(kind, {}).items():
        if key not in scaling or scaling[key] is None:
            raise CheckpointError(source, f"{where}: RoPE type {kind!r} needs {key!r}")
    for key, (ok, what) in {**ROPE_OPTIONAL, **ROPE_NEEDS.get(kind, {})}.items():
        value = scaling.get(key)
        if value is not None and not ok(value):
            raise CheckpointError(source, f"{where}.{key} = {_short(value)} is not {what}")


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

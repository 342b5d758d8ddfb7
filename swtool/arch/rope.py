"""Rotary embedding frequencies from a Hugging Face config, for each `rope_type`.

Configs name these two ways: `rope_theta` + `rope_scaling` (transformers 4.x and
most checkpoints on the Hub) or `rope_parameters` (transformers 5.x).
"""

import math

import numpy as np

from swtool.errors import SwtoolError


def rope_settings(config):
    """(theta, scaling dict or {}) from either config spelling."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"]), params
    scaling = config.get("rope_scaling") or {}
    return float(config.get("rope_theta", 10000.0)), scaling


def inv_freq(config, rotary_dim, n_tokens=0):
    """float32 inverse frequencies [rotary_dim / 2] with the config's scaling applied."""
    theta, scaling = rope_settings(config)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    if rope_type == "dynamic":
        theta = _dynamic_ntk_theta(config, scaling, theta, rotary_dim, n_tokens)
    base = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if rope_type in ("default", "dynamic"):
        return base
    if rope_type == "linear":
        return (base / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        return _llama3(base, scaling)
    if rope_type in ("longrope", "su"):  # "su" is longrope's old name (Phi-3 checkpoints)
        return _longrope(config, scaling, theta, exponents, n_tokens)
    if rope_type == "freq_factors":  # swtool's own: a GGUF's rope_freqs.weight (llama.py)
        return (base / np.asarray(scaling["factors"], dtype=np.float32)).astype(np.float32)
    raise SwtoolError(f"rope_type {rope_type!r} is not supported "
                      f"(supported: default, linear, dynamic, llama3, longrope)")


def length_limit(config):
    """The prompt length above which the config's frequencies change with the length (dynamic NTK,
    longrope), or None when they never do."""
    _, scaling = rope_settings(config)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "dynamic":
        return scaling.get("original_max_position_embeddings") or config.get("max_position_embeddings", 2048)
    if rope_type in ("longrope", "su"):
        return _original_context(config, scaling)
    return None


def rotary_dim(config, head_dim, default=1.0):
    """How many of a head's dims rotate: head_dim x partial_rotary_factor (GPT-NeoX calls it rotary_pct).

    `default` is the family's factor when the config names none (0.25 for GPT-NeoX and StableLM).
    """
    _, scaling = rope_settings(config)
    factor = scaling.get("partial_rotary_factor",
                         config.get("partial_rotary_factor", config.get("rotary_pct", default)))
    return int(head_dim * float(factor))


def attention_factor(config):
    """What cos and sin are multiplied by: 1, except longrope's sqrt(1 + ln(factor) / ln(trained context))."""
    _, scaling = rope_settings(config)
    if scaling.get("rope_type", scaling.get("type")) not in ("longrope", "su"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _longrope_factor(config, scaling)
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(_original_context(config, scaling)))


def _llama3(base, scaling):
    """Llama 3.1's frequency-dependent scaling: long wavelengths slowed by `factor`, short kept, smooth between."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    if not high > low:  # the smooth band between them would be empty: a division by zero
        raise SwtoolError(f"config.json: llama3 RoPE scaling needs high_freq_factor ({high:g}) above "
                          f"low_freq_factor ({low:g})")
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / base
    scaled = np.where(wavelen > old_context / low, base / factor, base)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _dynamic_ntk_theta(config, scaling, theta, rotary_dim, n_tokens):
    """Dynamic NTK: the base grows only once the sequence outgrows the trained context."""
    max_positions = scaling.get("original_max_position_embeddings") or config.get("max_position_embeddings", 2048)
    if n_tokens <= max_positions:
        return theta
    factor = float(scaling["factor"])
    if rotary_dim <= 2:  # the exponent below divides by rotary_dim - 2
        raise SwtoolError(f"config.json: dynamic RoPE scaling needs more than 2 rotary dimensions, not {rotary_dim}")
    return theta * ((factor * n_tokens / max_positions) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))


def _original_context(config, scaling):
    """The trained context; Phi-3's top-level original_max_position_embeddings wins, as in transformers."""
    value = (config.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
             or config.get("max_position_embeddings"))
    if value is None:
        raise SwtoolError("config.json: longrope needs original_max_position_embeddings")
    if float(value) < 2:  # its logarithm divides the attention factor
        raise SwtoolError(f"config.json: longrope's original_max_position_embeddings = {value!r} is not a "
                          f"context of at least 2 tokens")
    return float(value)


def _longrope_factor(config, scaling):
    """The context extension factor: `factor`, else max_position_embeddings / the trained context."""
    if scaling.get("factor") is not None:
        return float(scaling["factor"])
    return float(config.get("max_position_embeddings", 0)) / _original_context(config, scaling)


def _longrope(config, scaling, theta, exponents, n_tokens):
    """LongRoPE (Phi-3): per-frequency divisors, `long_factor` once the prompt outgrows the trained context."""
    use_long = n_tokens > _original_context(config, scaling)
    divisors = scaling.get("long_factor" if use_long else "short_factor")
    if not isinstance(divisors, list) or len(divisors) != len(exponents):
        raise SwtoolError(f"config.json: longrope needs {'long' if use_long else 'short'}_factor "
                          f"as a list of {len(exponents)} numbers")
    divisors = np.asarray(divisors, dtype=np.float32)
    return (np.float32(1.0) / (divisors * (np.float32(theta) ** exponents))).astype(np.float32)

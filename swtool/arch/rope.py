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
    raise SwtoolError(f"rope_type {rope_type!r} is not supported (supported: default, linear, dynamic, llama3)")


def _llama3(base, scaling):
    """Llama 3.1's frequency-dependent scaling: long wavelengths slowed by `factor`, short kept, smooth between."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
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
    return theta * ((factor * n_tokens / max_positions) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))

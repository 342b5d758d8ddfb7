"""The steps decoder blocks are made of: norms, attention, MLPs, RoPE tables, tensor tables.

A family's block (arch/<family>.py) is a recipe of these steps. The steps own the
plumbing every family shares: splitting projections into heads and merging them back
([W, T, heads * d] <-> [W, heads, T, d]), and observing the down projection
(DOWN_IN, DOWN_OUT). A recipe observes the residual stream itself (RESID_MID, RESID),
because only it knows where the residual stream is.

Activations are [W, T, channels]: W batch rows (worlds, see forward.py), T tokens.
"""

from dataclasses import dataclass

import numpy as np

from swtool import ops
from swtool.arch.base import DOWN_IN, DOWN_OUT
from swtool.arch.rope import attention_factor, inv_freq, rotary_dim
from swtool.errors import SwtoolError


# --- norms: norm(ctx, x, module) -> x normalised; norm.tensors(module, size) -> its weights -----

@dataclass(frozen=True)
class RmsNorm:
    """x / rms(x) * weight (Llama). `plus_one`: * (1 + weight), Gemma's weights stored as offsets from 1."""

    eps: float
    plus_one: bool = False

    def __call__(self, ctx, x, module):
        weight = ctx.weight(module + ".weight")
        return ops.rms_norm(x, 1.0 + weight if self.plus_one else weight, self.eps)

    def tensors(self, module, size):
        return {module + ".weight": (size,)}


@dataclass(frozen=True)
class LayerNorm:
    """(x - mean) / std * weight + bias; `bias` False for a LayerNorm with a weight only."""

    eps: float
    bias: bool = True

    def __call__(self, ctx, x, module):
        bias = ctx.weight(module + ".bias") if self.bias else None
        return ops.layer_norm(x, ctx.weight(module + ".weight"), bias, self.eps)

    def tensors(self, module, size):
        return {module + ".weight": (size,), **({module + ".bias": (size,)} if self.bias else {})}


@dataclass(frozen=True)
class FreeLayerNorm:
    """A LayerNorm with neither weight nor bias (OLMo): no tensors."""

    eps: float

    def __call__(self, ctx, x, module=None):
        return ops.layer_norm(x, eps=self.eps)

    def tensors(self, module, size):
        return {}


# --- attention ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Heads:
    """How a layer's attention is cut into heads: n query heads, n_kv key/value heads (GQA), d dims each."""

    n: int
    n_kv: int
    dim: int

    @property
    def q_size(self):
        return self.n * self.dim

    @property
    def kv_size(self):
        return self.n_kv * self.dim


def attention_heads(args):
    """Heads from a DecoderArgs: num_attention_heads, num_key_value_heads (all heads when absent) and
    head_dim (hidden / heads when absent)."""
    n_heads = args.num_attention_heads
    return Heads(n_heads, args.num_key_value_heads or n_heads, args.head_dim or args.hidden_size // n_heads)


def split_heads(x, n_heads):
    """[W, T, heads * d] -> [W, heads, T, d]."""
    n_rows, n_tokens, width = x.shape
    return x.reshape(n_rows, n_tokens, n_heads, width // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[W, heads, T, d] -> [W, T, heads * d]."""
    n_rows, n_heads, n_tokens, dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(n_rows, n_tokens, n_heads * dim)


def attend(ctx, heads, q, k, v, *, rope=None, window=None, scale=None, softcap=None, qk_norm=None):
    """Projected q, k, v [W, T, heads * d] -> split into heads -> q/k norm -> RoPE -> causal
    attention (a sliding `window`, soft-capped scores) -> heads merged: [W, T, heads * d].

    `rope`: (cos, sin) from rope_tables, or None (learned positions); `scale`: what q.k is
    multiplied by (1 / sqrt(d) when None); `qk_norm(q, k)`: a family's norm of the split heads.
    The output projection is the recipe's: `ctx.linear(attend(...), o_proj)`.
    """
    q, k, v = split_heads(q, heads.n), split_heads(k, heads.n_kv), split_heads(v, heads.n_kv)
    if qk_norm is not None:
        q, k = qk_norm(q, k)
    if rope is not None:
        cos, sin = rope
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
    mask = ops.causal_mask(q.shape[2], window)
    out = ops.attention(q, k, v, mask, scale=heads.dim ** -0.5 if scale is None else scale, softcap=softcap)
    return merge_heads(out)


def qkv_projections(ctx, h, module, bias=False):
    """q, k, v from three linears `{module}.{q,k,v}_proj`."""
    return tuple(ctx.linear(h, f"{module}.{name}_proj.weight", bias) for name in "qkv")


def rope_tables(ctx, config, head_dim, default_fraction=1.0, key="rope"):
    """cos/sin [T, rotary dims] for the prompt's positions, computed once per pass (per `key`).

    Only the first rotary_dim dims of a head rotate (partial_rotary_factor, the family's
    `default_fraction` when the config names none); longrope also scales cos and sin (its
    attention factor), as transformers does.
    """
    if key not in ctx.cache:
        frequencies = inv_freq(config, rotary_dim(config, head_dim, default=default_fraction), ctx.n_tokens)
        cos, sin = ops.rope_cos_sin(frequencies, np.arange(ctx.n_tokens))
        scale = np.float32(attention_factor(config))
        ctx.cache[key] = (cos * scale, sin * scale)
    return ctx.cache[key]


# --- MLPs ----------------------------------------------------------------------------------

def down_projection(ctx, layer, act, name, bias=False, transposed=False):
    """The MLP's second matrix, observed on both sides: act [W, T, ff] -> [W, T, hidden]."""
    ctx.observe(DOWN_IN, layer, act)
    down = ctx.linear(act, name, bias, transposed=transposed)
    ctx.observe(DOWN_OUT, layer, down)
    return down


def gated_mlp(ctx, layer, h, module, activation, bias=False):
    """down_proj(act(gate_proj(h)) * up_proj(h)), the matrices under `module` (e.g. "model.layers.3.mlp")."""
    gate = ctx.linear(h, module + ".gate_proj.weight", bias)
    up = ctx.linear(h, module + ".up_proj.weight", bias)
    act = activation(gate) * up
    del gate, up
    return down_projection(ctx, layer, act, module + ".down_proj.weight", bias)


def plain_mlp(ctx, layer, h, up, down, activation, bias=False, transposed=False):
    """down(act(up(h))): `up` and `down` are the two matrices' names."""
    act = activation(ctx.linear(h, up, bias, transposed=transposed))
    return down_projection(ctx, layer, act, down, bias, transposed)


def activation(name):
    """The function ops.ACTIVATIONS names, or a one-line config error."""
    try:
        return ops.ACTIVATIONS[name]
    except KeyError:
        raise SwtoolError(f"config.json: hidden_act {name!r} is not supported "
                          f"(supported: {', '.join(ops.ACTIVATIONS)})") from None


# --- tensor tables: built by adding entries ----------------------------------------------

def linear(name, n_out, n_in, bias=False):
    """The weight [out, in] (and bias [out]) of linear `name` (no ".weight" suffix)."""
    return {name + ".weight": (n_out, n_in), **({name + ".bias": (n_out,)} if bias else {})}


def attention_tensors(module, d, heads, qkv_bias=False, o_bias=False):
    """q/k/v/o_proj under `module` (e.g. "model.layers.3.self_attn")."""
    return {**linear(module + ".q_proj", heads.q_size, d, qkv_bias),
            **linear(module + ".k_proj", heads.kv_size, d, qkv_bias),
            **linear(module + ".v_proj", heads.kv_size, d, qkv_bias),
            **linear(module + ".o_proj", d, heads.q_size, o_bias)}


def gated_mlp_tensors(module, d, ff, bias=False):
    """gate/up/down_proj under `module` (e.g. "model.layers.3.mlp")."""
    return {**linear(module + ".gate_proj", ff, d, bias), **linear(module + ".up_proj", ff, d, bias),
            **linear(module + ".down_proj", d, ff, bias)}

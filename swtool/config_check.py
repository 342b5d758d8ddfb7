"""config.json values outside any family's Args, checked for type and range before they are read.

Each family reads its own keys through its Args dataclass (arch/base.py), which checks
every value it reads. What is left here are the keys read for every family by other
modules: RoPE (rope.py: the base, the rotary fraction, the scaling objects with what
each RoPE type needs), the trained context, and the expert count model.py bounds.
A wrong one is a one-line error naming config.json. Keys a config does not have, or
has as null, are left to the defaults.
"""

from swtool.arch.base import KINDS, Count, Fraction, Names, Positive, short
from swtool.errors import CheckpointError


class PositiveList(list):
    """A list of positive numbers (longrope's short_factor and long_factor)."""


VALUE_KINDS = {**KINDS, PositiveList: (lambda v: isinstance(v, list) and all(KINDS[Positive][0](x) for x in v),
                                       list, "a list of positive numbers")}

# key -> what it must be (a kind of arch/base.py); null is always allowed (the default applies)
CHECKS = {
    "model_type": str,
    "architectures": Names,
    "max_position_embeddings": Count,
    "original_max_position_embeddings": Count,
    "num_local_experts": Count,
    "rope_theta": Positive,
    "rope_local_base_freq": Positive,
    "rotary_emb_base": Positive,
    "partial_rotary_factor": Fraction,
    "rotary_pct": Fraction,
    "rope_scaling": dict,
    "rope_parameters": dict,
}


# what each RoPE type needs in its scaling object (rope.py reads these): key -> what it must be
ROPE_NEEDS = {
    "linear": {"factor": Positive},
    "dynamic": {"factor": Positive},
    "llama3": {"factor": Positive, "low_freq_factor": Positive, "high_freq_factor": Positive,
               "original_max_position_embeddings": Count},
}
ROPE_OPTIONAL = {
    "rope_theta": Positive,
    "factor": Positive,
    "attention_factor": Positive,
    "original_max_position_embeddings": Count,
    "short_factor": PositiveList,
    "long_factor": PositiveList,
}


def check_config(config, source):
    """A CheckpointError(source, ...) for the first known key whose value has the wrong type or range."""
    if not isinstance(config, dict):
        raise CheckpointError(source, "not a JSON object")
    for key, kind in CHECKS.items():
        _check(config.get(key), kind, key, source)
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
        raise CheckpointError(source, f"{where}.rope_type = {short(kind)} is not a string")
    for key in ROPE_NEEDS.get(kind, {}):
        if key not in scaling or scaling[key] is None:
            raise CheckpointError(source, f"{where}: RoPE type {kind!r} needs {key!r}")
    for key, value_kind in {**ROPE_OPTIONAL, **ROPE_NEEDS.get(kind, {})}.items():
        _check(scaling.get(key), value_kind, f"{where}.{key}", source)


def _check(value, kind, name, source):
    """Null is always allowed (the default applies); anything else must be of its kind."""
    ok, _, what = VALUE_KINDS[kind]
    if value is not None and not ok(value):
        raise CheckpointError(source, f"{name} = {short(value)} is not {what}")

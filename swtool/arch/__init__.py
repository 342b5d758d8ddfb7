"""Architectures: which tensors a model has and how one decoder block computes.

Each family is one module in this package defining a subclass of
`Architecture` with the `model_type` values of config.json it handles, its
block written as a recipe of the steps in blocks.py. Adding a family = adding
a module; the registry finds it (docs/adding-a-family.md).
"""

import importlib
import pkgutil

from swtool.arch.base import Architecture
from swtool.errors import SwtoolError

NOT_FAMILIES = {"base", "blocks", "rope", "moe"}  # helper modules of this package


def _registry():
    table = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in NOT_FAMILIES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for cls in vars(module).values():
            if isinstance(cls, type) and issubclass(cls, Architecture) and cls is not Architecture:
                for model_type in cls.model_types:
                    table[model_type] = cls
    return table


def supported_model_types():
    return sorted(_registry())


def gguf_export_model_types():
    """The model_type values `swtool export` writes as GGUF (families with gguf_exports)."""
    return sorted(model_type for model_type, cls in _registry().items() if cls.gguf_exports)


def family_reading_gguf(gguf_arch):
    """The Architecture class that reads GGUF files of llama.cpp architecture `gguf_arch`, or None."""
    return next((cls for cls in _registry().values() if gguf_arch in cls.gguf_reads), None)


def gguf_readable_architectures():
    return sorted({name for cls in _registry().values() for name in cls.gguf_reads})


def architecture_for(config, source="config.json"):
    """The Architecture instance for a config.json dict; a one-line error for unknown families."""
    model_type = config.get("model_type")
    cls = _registry().get(model_type) if isinstance(model_type, str) else None
    if cls is None:
        raise SwtoolError(f"{source}: unsupported model_type {model_type!r}; "
                          f"supported: {', '.join(supported_model_types())}")
    return cls(config)


__all__ = ["Architecture", "architecture_for", "family_reading_gguf", "gguf_export_model_types",
           "gguf_readable_architectures", "supported_model_types"]

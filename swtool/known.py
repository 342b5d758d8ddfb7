"""Super weights published for public models (swtool/data/known_super_weights.json), and which one a model is.

A model is matched by id first (a Hub id, a cache path models--org--name, or
config.json's `_name_or_path`), then by config fingerprint: the shape keys must
all agree (they fix where the down projections and their coordinates are), and
among the entries that pass, the one agreeing on most of the other keys
(vocabulary size, context length: what tells Llama-7B from Llama-2-7B) wins.
A tie between entries with different coordinates is reported, never guessed.

An entry's coordinates may name a mixture expert (`expert`: the expert whose down projection
holds the weight). An entry may instead say that a published census found no catastrophic
super weight in the model (`none_found`): it has no coordinates, and an audit held to it gives
no verdict (audit.py), since there is nothing published to compare with.
"""

import json
from dataclasses import dataclass, field
from importlib import resources

from swtool.errors import SwtoolError

SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads")
# llama.cpp converts Mistral as llama: a GGUF's config says "llama" for both
SAME_FAMILY = {"mistral": "llama"}


@dataclass
class KnownModel:
    name: str
    id: str
    aliases: list
    fingerprint: dict
    super_weights: list  # [{"layer", "row", "col", "expert"?, "sources", "disputed"?, "conflict"?}]
    notes: str = ""
    none_found: dict | None = None  # {"sources", "detail", ...}: a census found no catastrophic super weight

    @classmethod
    def of(cls, entry):
        """The KnownModel of one entry of the data file's `models`."""
        return cls(entry["name"], entry["id"], entry.get("aliases", []), entry["fingerprint"], entry["super_weights"],
                   entry.get("notes", ""), entry.get("none_found"))


@dataclass
class Match:
    model: KnownModel
    how: str  # "id" or "fingerprint"
    differences: dict = field(default_factory=dict)  # key -> (known, this model's) for non-shape keys


def load():
    """(data dict as stored, [KnownModel])."""
    data = json.loads(resources.files("swtool").joinpath("data/known_super_weights.json").read_text())
    return data, [KnownModel.of(m) for m in data["models"]]


def _normal(config_value, key, config):
    """A config value as the fingerprint compares it (defaults transformers would apply)."""
    if key == "num_key_value_heads" and config_value is None:
        return config.get("num_attention_heads")
    if key == "max_position_embeddings" and config_value is None:
        return config.get("max_sequence_length", 2048)  # huggyllama's configs: LlamaConfig's default
    if key == "model_type":
        return SAME_FAMILY.get(config_value, config_value)
    return config_value


def fingerprint_of(config):
    """The fingerprint keys of a config.json dict, normalised."""
    keys = set(SHAPE_KEYS) | {"vocab_size", "max_position_embeddings"}
    return {key: _normal(config.get(key), key, config) for key in sorted(keys)}


def by_id(model_id, models=None):
    """The known model whose id or alias is `model_id` (case-insensitive; a trailing @revision ignored), or None."""
    if not model_id:
        return None
    wanted = str(model_id).split("@")[0].strip("/").lower()
    for model in models if models is not None else load()[1]:
        names = [model.id] + list(model.aliases)
        if wanted in (name.lower() for name in names):
            return model
    return None


def by_fingerprint(config, models=None):
    """[Match] of the entries whose shape keys equal the config's, best first (fewest other differences)."""
    ours = fingerprint_of(config)
    matches = []
    for model in models if models is not None else load()[1]:
        theirs = fingerprint_of(model.fingerprint)
        if any(theirs[key] != ours[key] for key in SHAPE_KEYS):
            continue
        differences = {key: (theirs[key], ours[key]) for key in theirs if theirs[key] != ours[key]}
        matches.append(Match(model, "fingerprint", differences))
    return sorted(matches, key=lambda m: len(m.differences))


def identify(config, model_id=None):
    """The Match for a model, by id then fingerprint; None if nothing matches; an error if it is ambiguous."""
    _, models = load()
    model = by_id(model_id, models) or by_id(config.get("_name_or_path"), models)
    if model is not None:
        ours, theirs = fingerprint_of(config), fingerprint_of(model.fingerprint)
        differences = {key: (theirs[key], ours[key]) for key in theirs if theirs[key] != ours[key]}
        if any(key in differences for key in SHAPE_KEYS):
            shown = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differences.items() if k in SHAPE_KEYS)
            raise SwtoolError(f"the id says {model.name}, but the config's shape differs ({shown})")
        return Match(model, "id", differences)
    matches = by_fingerprint(config, models)
    if not matches:
        return None
    best = [m for m in matches if len(m.differences) == len(matches[0].differences)]
    if len({_coordinates(m.model) for m in best}) > 1:
        names = ", ".join(m.model.id for m in best)
        raise SwtoolError(f"the config fits several known models equally well ({names}); name one with --known-id")
    return best[0]


def _coordinates(model):
    return tuple((sw["layer"], sw["row"], sw["col"], sw.get("expert")) for sw in model.super_weights)


def none_found_words(model):
    """What a none_found entry says, in one line: "census: ..."; None for an entry with coordinates."""
    if model.none_found is None:
        return None
    return f"{'+'.join(model.none_found['sources'])}: {model.none_found['detail']}"


def format_known(data, models):
    """The human table of `swtool catalog known`: every published coordinate, its sources and notes."""
    from swtool.table import format_table

    rows = []
    for model in models:
        for sw in model.super_weights:
            flag = " (disputed)" if sw.get("disputed") else ""
            expert = "-" if sw.get("expert") is None else sw["expert"]
            rows.append([model.name, model.id, sw["layer"], sw["row"], sw["col"], expert,
                         "+".join(sw["sources"]) + flag])
        if model.none_found is not None:
            rows.append([model.name, model.id, "none", "-", "-", "-", "+".join(model.none_found["sources"]) + " (none found)"])
    lines = [format_table(["model", "id", "layer", "row", "col", "expert", "sources"], rows),
             "coordinates: model.layers[layer].mlp.down_proj.weight[row, col], 0-based; with an expert, "
             "that expert's down projection (mlp.experts[expert].down_proj); "
             "none: a census found no catastrophic super weight; sources:"]
    lines += [f"  {key}: {text}" for key, text in data["sources"].items()]
    for model in models:
        said = ([f"None found ({none_found_words(model)})."] if model.none_found else []) + \
            ([model.notes] if model.notes else [])
        if said:
            lines.append(f"{model.name}: {' '.join(said)}")
    return "\n".join(lines)

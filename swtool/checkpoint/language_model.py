"""The language model of a multimodal checkpoint (Gemma 3's Gemma3ForConditionalGeneration ...) seen as a text-only one.

transformers saves a `...ForConditionalGeneration` model with the text model's config under
config.json's `text_config` and its weights under a prefix, beside the vision tower and the
projector: `language_model.model.*` and `language_model.lm_head.*`, or, as other transformers
versions save it, `model.language_model.*` with `lm_head.*` unprefixed. llama.cpp's converter
converts the text part alone: it lifts text_config to the top of the config and drops
`language_model.` from the tensor names (convert_hf_to_gguf's TextModel). swtool does the same,
so that scan, export, audit and ablate see the text model under its usual names; the other
tensors are not listed.
"""

PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
            ("model.language_model.", "model."))
TEXT_HEAD = "lm_head."  # transformers 5's layout keeps the LM head outside the language model
OTHER_MODELS = ("text_config", "vision_config", "audio_config")


def text_model(config, names):
    """(config, {text name: stored name}) of the language model when `config` has a text_config and
    the names hold its prefix; (config, None) for any other checkpoint."""
    text = config.get("text_config")
    if not isinstance(text, dict) or not any(name.startswith(stored) for name in names for stored, _ in PREFIXES):
        return config, None
    renamed = {}
    for name in names:
        for stored, ours in PREFIXES:
            if name.startswith(stored):
                renamed[ours + name[len(stored):]] = name
                break
        else:
            if name.startswith(TEXT_HEAD):
                renamed[name] = name
    outer = {key: value for key, value in config.items() if key not in OTHER_MODELS}
    return {**outer, **text}, renamed

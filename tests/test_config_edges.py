"""Config values that pass every type check but make RoPE's arithmetic divide by zero: one line each,
never a ZeroDivisionError traceback."""

import json
import shutil

from fixtures.cli_run import one_line_error, swtool_in_process


def with_config(source, destination, edit):
    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    edit(config)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


def test_longrope_with_a_trained_context_of_one_token(tiny_factory, tmp_path):
    directory, _ = tiny_factory("phi3-longrope", "float32")
    model = with_config(directory, tmp_path / "phi3", lambda c: c.update(original_max_position_embeddings=1))
    line = one_line_error(swtool_in_process("scan", model, "--no-progress"))
    assert "longrope's original_max_position_embeddings = 1 is not a context of at least 2 tokens" in line


def test_llama3_rope_with_an_empty_smoothing_band(tiny_factory, tmp_path):
    directory, _ = tiny_factory("llama", "float32")
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0}

    def edit(config):
        config.pop("rope_parameters", None)
        config["rope_scaling"] = scaling
        config["rope_theta"] = 10000.0

    model = with_config(directory, tmp_path / "llama", edit)
    line = one_line_error(swtool_in_process("scan", model, "--no-progress"))
    assert "llama3 RoPE scaling needs high_freq_factor (4) above low_freq_factor (4)" in line

"""Counts and indexes read from text (options, metadata keys, tensor names, tokenizer_config.json) accept
what int() reads: str.isdigit() also holds for superscripts such as '²', which int() refuses, so a check
by isdigit() let them through to a ValueError and a traceback."""

import json

import pytest

from swtool.errors import SwtoolError

NOT_INT = "\u00b2"  # '²': str.isdigit() is True, int() raises ValueError


def test_typed_numbers_are_refused_in_one_line():
    from swtool.coordinate import Coordinate
    from swtool.experts import parse_expert
    from swtool.export_importance import parse_importance
    from swtool.sweep import parse_handlings

    assert NOT_INT.isdigit()
    for parse, text, message in [(Coordinate.parse, f"1:{NOT_INT}:3", "expected LAYER:ROW:COL"),
                                 (parse_expert, f"2:{NOT_INT}", "expected LAYER:EXPERT"),
                                 (parse_importance, f"random:{NOT_INT}", "--importance"),
                                 (parse_handlings, f"importance:self:{NOT_INT}", "at least 1")]:
        with pytest.raises(SwtoolError, match=message):
            parse(text)


def test_added_tokens_decoder_key_that_is_no_id_is_refused(tmp_path):
    from swtool.export_vocab import added_tokens_decoder

    entry = {"content": "<x>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"7": entry}}))
    assert added_tokens_decoder(tmp_path) == [(7, "<x>", True)]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {NOT_INT: entry}}))
    with pytest.raises(SwtoolError, match="is not an id with its content"):
        added_tokens_decoder(tmp_path)


def test_a_channel_order_key_without_a_layer_number_is_skipped():
    from swtool.gguf_keys import ffn_order_key, read_ffn_orders

    assert read_ffn_orders({ffn_order_key(3): [1, 0], f"swtool.ffn_order.{NOT_INT}": [0, 1]}) == {3: [1, 0]}


def test_a_tensor_name_with_a_superscript_has_no_llama_cpp_name(good):
    from swtool.model import load_model

    arch = load_model(good.model).arch
    assert arch.gguf_map_name("model.layers.1.mlp.down_proj.weight") == "blk.1.ffn_down.weight"
    with pytest.raises(SwtoolError, match="no llama.cpp name for tensor"):
        arch.gguf_map_name(f"model.layers.{NOT_INT}.mlp.down_proj.weight")

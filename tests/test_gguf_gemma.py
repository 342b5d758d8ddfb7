"""The SentencePiece families (Gemma, Phi-3) and Gemma 3's multimodal checkpoints, beyond the shared
converter harness (test_gguf_converter.py):
  - tokenizer.model as swtool reads it (swtool/sentencepiece_model.py) holds what sentencepiece reads;
  - the GGUF that llama.cpp's converter writes tokenizes, in `swtool scan` and `swtool eval --text`,
    as llama.cpp itself tokenizes it (llama-cpp-python's Llama.tokenize on the same file);
  - a tiny Gemma3ForConditionalGeneration (a vision tower beside the language model) is read, scanned,
    exported, ablated and audited as its text model, and its export equals the converter's file.
"""

import json
import types

import numpy as np
import pytest

from fixtures.cli_run import one_line_error, swtool_in_process
from fixtures.converted import CONVERTER_OVERRIDES, PROSE, write_sentencepiece_tokenizer
from fixtures.gguf_compare import key_differences, read_contents, tensor_differences
from swtool.errors import CheckpointError
from swtool.forward import forward
from swtool.model import load_model
from fixtures.tiny import FAMILIES, TINY, Plant, _randomize_norms, plant_post_norm, random_tokens

pytestmark = [pytest.mark.real, pytest.mark.llama_cpp]

PLANT = Plant(layer=1, row=3, col=5)
PROSE_WORDS = PROSE.read_text().split()  # the text the tiny vocabulary was trained on


# --- tokenizer.model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A SentencePiece model with every kind of piece: unknown, control, user-defined, byte, normal."""
    import sentencepiece

    prefix = tmp_path_factory.mktemp("spm") / "tokenizer"
    sentencepiece.SentencePieceTrainer.train(
        input=str(PROSE), model_prefix=str(prefix), vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, num_threads=1, minloglevel=2, user_defined_symbols=["<start_of_turn>"],
        control_symbols=["<ctrl>"])
    return prefix.with_suffix(".model")


def test_tokenizer_model_reads_as_sentencepiece_does(spm_model):
    import sentencepiece

    from swtool.sentencepiece_model import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, read_pieces

    processor = sentencepiece.SentencePieceProcessor()
    processor.LoadFromFile(str(spm_model))

    def kind(i):
        flags = ((UNKNOWN, processor.IsUnknown(i)), (CONTROL, processor.IsControl(i)), (UNUSED, processor.IsUnused(i)),
                 (BYTE, processor.IsByte(i)), (USER_DEFINED, processor.IdToPiece(i) == "<start_of_turn>"))
        return next((value for value, flag in flags if flag), NORMAL)

    expected = [(processor.IdToPiece(i), processor.GetScore(i), kind(i)) for i in range(processor.vocab_size())]
    assert read_pieces(spm_model) == expected
    assert {k for _, _, k in expected} == {NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE}  # every kind was compared


def test_a_broken_tokenizer_model_is_a_one_line_error(spm_model, tmp_path):
    from swtool.sentencepiece_model import read_pieces

    data = spm_model.read_bytes()
    cases = {"truncated": data[:len(data) // 2], "junk": b"\xff" * 64, "text": b'{"model": "BPE"}', "empty": b""}
    for name, content in cases.items():
        path = tmp_path / f"{name}.model"
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as error:
            read_pieces(path)
        assert "SentencePiece model" in str(error.value) and "\n" not in str(error.value), name


# --- the converter's GGUF tokenizes as llama.cpp --------------------------------------

def llama_cpp_tokens(path, text):
    import llama_cpp

    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    return vocab.tokenize(text.encode(), add_bos=True, special=True)


# Only characters the tiny vocabulary holds: it has no byte pieces, and llama.cpp aborts on a
# character it can neither find nor spell in bytes.
TEXTS = ["Apple Inc. is a worldwide tech company.", " ".join(PROSE_WORDS[:300]), "  two  spaces  ",
         "<s>inside</s> text", "x", "The harvest of the fields"]


@pytest.mark.parametrize("family", ["gemma", "phi3"])
def test_the_converters_gguf_tokenizes_as_llama_cpp(converted, family):
    """Gemma (no space prefix) and Phi-3 (a space prefix): the prompt of `scan` and the text of `eval`
    go through swtool.tokenizer.encode on the tokenizer files swtool rebuilds from the GGUF."""
    from swtool.tokenizer import encode

    _, gguf_path = converted(family)
    model = load_model(gguf_path)  # keeps its tokenizer directory alive
    for text in TEXTS:
        assert encode(model.directory, text) == llama_cpp_tokens(gguf_path, text), text


def test_eval_text_counts_the_tokens_llama_cpp_makes(converted, tmp_path):
    _, gguf_path = converted("gemma")
    text = " ".join(PROSE_WORDS[:400])
    (tmp_path / "text.txt").write_text(text)
    result = swtool_in_process("eval", gguf_path, "--text", tmp_path / "text.txt", "--json", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] == len(llama_cpp_tokens(gguf_path, text))


# --- one tokenizer file of the two ---------------------------------------------------------

def copy_without(model_dir, out_dir, *names):
    import shutil

    shutil.copytree(model_dir, out_dir, ignore=shutil.ignore_patterns("*.gguf"))
    for name in names:
        (out_dir / name).unlink()
    return out_dir


def test_a_checkpoint_with_only_tokenizer_model_exports_the_converters_vocabulary(converted, tmp_path):
    from fixtures import llama_converter

    model_dir, _ = converted("gemma")
    bare = copy_without(model_dir, tmp_path / "bare", "tokenizer.json", "tokenizer_config.json")
    llama_converter.convert(bare, tmp_path / "theirs.gguf", "f32")
    result = swtool_in_process("export", bare, "-o", tmp_path / "ours.gguf", "--type", "f32", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "no tokenizer.json to tokenize the scan's prompt" in result.stdout  # unprotected, and says so
    ours, theirs = read_contents(tmp_path / "ours.gguf"), read_contents(tmp_path / "theirs.gguf")
    assert key_differences(ours, theirs, ("gemma.", "tokenizer.")) == []
    assert "tokenizer.ggml.scores" in ours.keys


def test_a_checkpoint_with_only_tokenizer_json_exports_a_vocabulary_that_splits_as_it(converted, tmp_path):
    """llama.cpp's converter needs tokenizer.model for Gemma; swtool falls back to tokenizer.json."""
    import llama_cpp
    from tokenizers import Tokenizer

    model_dir, _ = converted("gemma")
    bare = copy_without(model_dir, tmp_path / "bare", "tokenizer.model")
    result = swtool_in_process("export", bare, "-o", tmp_path / "ours.gguf", "--type", "f32", "--no-progress")
    assert result.returncode == 0, result.stderr
    tokenizer = Tokenizer.from_file(str(bare / "tokenizer.json"))
    vocab = llama_cpp.Llama(str(tmp_path / "ours.gguf"), vocab_only=True, verbose=False)
    for text in TEXTS[:2] + TEXTS[5:]:
        assert vocab.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text).ids, text


# --- what llama.cpp would run differently is refused ----------------------------------------

@pytest.mark.parametrize("family, message", [
    ("gemma2", "query_pre_attn_scalar 24 cannot be exported: llama.cpp's gemma2 scales attention by 1/sqrt(16)"),
    ("gemma3", "sliding layers [0, 2] cannot be exported: llama.cpp's gemma3 slides layer i unless (i + 1) is a "
               "multiple of 6"),
])
def test_export_refuses_what_llama_cpp_derives_differently(tiny_factory, tmp_path, family, message):
    """The converter does not store query_pre_attn_scalar nor the sliding layers; llama.cpp derives them.
    fixtures/tiny.py's Gemma 2 scales by 24 (head_dim 16), its Gemma 3 slides layers 0 and 2 of 4."""
    model_dir, _ = tiny_factory(family, **({"query_pre_attn_scalar": 16} if family == "gemma3" else {}))
    error = one_line_error(swtool_in_process("export", model_dir, "-o", tmp_path / "out.gguf", "--type", "f32", "--no-progress"))
    assert message in error
    assert not (tmp_path / "out.gguf").exists()


# --- Gemma 3 multimodal: its language model ----------------------------------------------

def build_multimodal(out_dir):
    """A tiny Gemma3ForConditionalGeneration: a one-layer vision tower and projector beside the tiny
    Gemma 3 language model (as converted.py configures it, with PLANT planted), the SentencePiece
    vocabulary, and llama.cpp's converter's GGUF of its text part. -> (model directory, GGUF)."""
    import torch
    import transformers

    from fixtures import llama_converter

    _, _, extra, _ = FAMILIES["gemma3"]
    text = {**TINY, **extra, **CONVERTER_OVERRIDES["gemma3"]}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       boi_token_index=297, eoi_token_index=298, image_token_index=299)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    _randomize_norms(model, 0)
    with torch.no_grad():  # the planters reach the decoder through `.model`
        plant_post_norm(types.SimpleNamespace(model=model.model.language_model), PLANT)
    model_dir = out_dir / "hf"
    model.save_pretrained(model_dir)
    write_sentencepiece_tokenizer(model_dir)
    gguf_path = out_dir / "model-f32.gguf"
    llama_converter.convert(model_dir, gguf_path, "f32")
    return model_dir, gguf_path


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    return build_multimodal(tmp_path_factory.mktemp("gemma3-multimodal"))


def test_multimodal_checkpoint_computes_as_transformers(multimodal):
    import torch
    import transformers

    model_dir, _ = multimodal
    tokens = random_tokens(12, seed=3, vocab=TINY["vocab_size"])
    reference = transformers.Gemma3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([[int(t) for t in tokens]])).logits[0].numpy()
    model = load_model(model_dir)
    assert model.arch.model_type == "gemma3_text"
    assert not any("vision" in name or "projector" in name for name in model.checkpoint.names())
    got = forward(model, tokens)[0]
    assert np.abs(got - expected).max() <= 2e-5 * np.abs(expected).max()


def test_the_other_multimodal_layout_reads_the_same(multimodal, tmp_path):
    """transformers versions also save the text model as model.language_model.* with lm_head.* outside."""
    import shutil

    from safetensors.numpy import load_file, save_file

    model_dir, _ = multimodal
    other = tmp_path / "other-layout"
    shutil.copytree(model_dir, other)
    tensors = load_file(model_dir / "model.safetensors")
    renamed = {("model.language_model." + name.removeprefix("language_model.model.")
                if name.startswith("language_model.model.") else name): value for name, value in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, other / "model.safetensors", metadata={"format": "pt"})
    tokens = random_tokens(12, seed=3, vocab=TINY["vocab_size"])
    assert np.array_equal(forward(load_model(other), tokens), forward(load_model(model_dir), tokens))


def test_multimodal_checkpoint_scans_ablates_and_audits_as_its_text_model(multimodal, tmp_path):
    model_dir, _ = multimodal
    catalog = tmp_path / "catalog.json"
    result = swtool_in_process("scan", model_dir, "-o", catalog, "--no-progress")
    assert result.returncode == 0, result.stderr
    found = {(w["layer"], w["row"], w["col"], w["tensor"], w["gguf_tensor"])
             for w in json.loads(catalog.read_text())["super_weights"]}
    assert (1, 3, 5, "model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight") in found
    intact = swtool_in_process("audit", model_dir, "--catalog", catalog, "--json")
    assert json.loads(intact.stdout)["verdict"] == "intact", intact.stderr
    ablated = tmp_path / "ablated"
    result = swtool_in_process("ablate", model_dir, "--catalog", catalog, "-o", ablated)
    assert result.returncode == 0, result.stderr
    audit = json.loads(swtool_in_process("audit", ablated, "--catalog", catalog, "--json").stdout)
    planted = next(f for f in audit["findings"] if (f["layer"], f["row"], f["col"]) == (1, 3, 5))
    assert planted["status"] == "zeroed" and audit["verdict"] == "damaged"


def test_multimodal_export_is_the_converters_text_model(multimodal, tmp_path):
    from fixtures import llama_oracle

    model_dir, theirs_path = multimodal
    out = tmp_path / "model-f32.gguf"
    result = swtool_in_process("export", model_dir, "-o", out, "--type", "f32", "--no-progress")
    assert result.returncode == 0, result.stderr
    ours, theirs = read_contents(out), read_contents(theirs_path)
    assert ours.keys["general.architecture"] == theirs.keys["general.architecture"] == (("STRING",), "gemma3")
    assert key_differences(ours, theirs, ("gemma3.", "tokenizer.")) == []
    assert tensor_differences(ours, theirs) == []
    assert not any(name.startswith(("v.", "mm.")) for name in ours.tensors)  # no vision tensors
    # and the GGUF of the text part reads back as the checkpoint computes
    tokens = random_tokens(12, seed=3, vocab=TINY["vocab_size"])
    expected = forward(load_model(model_dir), tokens)[0]
    llm = llama_oracle.load(out, n_ctx=64)
    llm.eval([int(t) for t in tokens])
    assert np.abs(np.asarray(llm.scores[:len(tokens)]) - expected).max() <= 1e-3 * np.abs(expected).max()

"""A catalog's fields are checked against each other once, when it is read, for every command:
an entry whose layer, tensor names, tensor_index and expert disagree would let audit (which reads
layer/row/col) and ablate (which reads tensor_index) act on different elements."""

import json
import shutil

import pytest

from fixtures.cli_run import digests, one_line_error, swtool_in_process


def edited(good, tmp_path, edit):
    catalog = json.loads(good.catalog.read_text())
    edit(catalog["super_weights"][0], catalog)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(catalog))
    return path


CASES = {
    "layer beyond the model": (lambda sw, c: sw.update(layer=c["model"]["num_layers"]), "layer 4 of a model with 4 layers"),
    "layer against the tensor": (lambda sw, c: sw.update(layer=2), "is not in layer 2"),
    "tensor_index against row/col": (lambda sw, c: sw.update(tensor_index=[sw["row"] + 1, sw["col"]]),
                                     "is neither [row, col] nor [col, row]"),
    "a stacked index without an expert": (lambda sw, c: sw.update(tensor_index=[0, sw["row"], sw["col"]]),
                                          "is not [expert, row, col]"),
    "the same weight twice": (lambda sw, c: c["super_weights"].append(dict(sw)), "listed twice"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_entry_that_contradicts_itself_is_bad_input(good, tmp_path, case):
    edit, message = CASES[case]
    path = edited(good, tmp_path, edit)
    for argv in (["audit", good.model, "--catalog", path], ["ablate", good.model, "--catalog", path, "-o", tmp_path / "out"],
                 ["export", good.model, "--catalog", path, "-o", tmp_path / "out.gguf", "--type", "f32"]):
        line = one_line_error(swtool_in_process(*argv))
        assert "edited.json: invalid catalog: super_weights/" in line and message in line, (argv, line)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.gguf").exists()


JOURNAL = "swtool-ablation-journal.json"


def hostile(change):
    """Journal edits a hostile or broken journal could hold; each must be refused, nothing written."""
    return {
        "an offset a terabyte out": dict(change, offset=1 << 40, old_bytes="", new_bytes=""),
        "bytes of another length": dict(change, old_bytes=change["old_bytes"] + "00", new_bytes=change["new_bytes"] + "00"),
        "half an element": dict(change, offset=change["offset"] + 1),
        "another tensor's name": dict(change, tensor="model.norm.weight"),
        "a file outside the model": dict(change, file="../elsewhere.safetensors"),
        "not a shard": dict(change, file="config.json"),
    }


@pytest.mark.parametrize("case", list(hostile({"offset": 0, "old_bytes": "", "new_bytes": ""})))
def test_a_hostile_journal_writes_nothing(good, tmp_path, case):
    model = shutil.copytree(good.model, tmp_path / "model")
    assert swtool_in_process("ablate", model, "--catalog", good.catalog, "--in-place").returncode == 0
    journal = json.loads((model / JOURNAL).read_text())
    journal["changes"][0] = hostile(journal["changes"][0])[case]
    (model / JOURNAL).write_text(json.dumps(journal))
    before = digests(model)
    line = one_line_error(swtool_in_process("ablate", model, "--restore"))
    assert JOURNAL in line and ("not restoring" in line or "not a valid" in line), line
    assert digests(model) == before


@pytest.mark.parametrize("family, plant", [("mixtral", dict(layer=2, row=41, col=101, expert=2)),
                                           ("gpt2", dict(layer=2, row=41, col=101))])
def test_audit_reads_the_element_ablate_patches(tiny_factory, tmp_path, family, plant):
    """A stacked expert ([expert, row, col]) and a Conv1D weight stored [in, out] ([col, row]): audit
    reads each catalog entry where ablate writes it, so the ablated copy audits as zeroed."""
    from fixtures.tiny import Plant

    model, _ = tiny_factory(family, "bfloat16", plants=(Plant(**plant),))
    if family == "mixtral":  # re-saved by transformers in its stacked layout: [experts, out, in]
        import transformers

        stacked = transformers.AutoModelForCausalLM.from_pretrained(model, dtype="auto")
        stacked.save_pretrained(tmp_path / "stacked", save_original_format=False)
        shutil.copy(model / "tokenizer.json", tmp_path / "stacked" / "tokenizer.json")
        model = tmp_path / "stacked"
    catalog = tmp_path / "catalog.json"
    assert swtool_in_process("scan", model, "-o", catalog, "--no-progress").returncode == 0
    (entry,) = [sw for sw in json.loads(catalog.read_text())["super_weights"]
                if (sw["layer"], sw["row"], sw["col"]) == (plant["layer"], plant["row"], plant["col"])]
    assert entry["expert"] == plant.get("expert") and entry["tensor_index"] != [plant["row"], plant["col"]]
    intact = json.loads(swtool_in_process("audit", model, "--catalog", catalog, "--json").stdout)
    # the super weight's finding (a mixture's super expert row, a finding of its own, holds the same element)
    (found,) = [f for f in intact["findings"] if f["row"] == plant["row"] and f["col"] == plant["col"]
                and not f["super_expert"]]
    assert found["status"] == "intact" and found["value"] == entry["value"] and found["expert"] == entry["expert"]
    out = tmp_path / "ablated"
    assert swtool_in_process("ablate", model, "--catalog", catalog, "-o", out).returncode == 0
    ablated = json.loads(swtool_in_process("audit", out, "--catalog", catalog, "--json").stdout)
    (found,) = [f for f in ablated["findings"] if f["row"] == plant["row"] and f["col"] == plant["col"]
                and not f["super_expert"]]
    assert found["status"] == "zeroed" and found["value"] == 0.0

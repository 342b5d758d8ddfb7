"""GGUF files of an architecture swtool cannot run: inspect and audit still work from the header.

The file: the tiny Llama of the `good` fixture (planted super weight, its scan catalog)
written again with gguf-py under llama.cpp architecture "bloom", every `llama.*` key renamed
`bloom.*`: tensors and values unchanged, a family swtool has no forward pass for.
inspect describes it, audit --catalog / --reference reads one block per weight, and the
commands that need the forward pass (scan, a self-scanning audit) refuse it in one line.
"""

import json

import gguf
import numpy as np
import pytest

from fixtures.cli_run import one_line_error, swtool_in_process

ARCH = "bloom"


def rename_architecture(source, out, arch, edit=None):
    """`source` rewritten with general.architecture `arch` and its `{old}.*` keys as `{arch}.*`;
    `edit(name, values)` may change a tensor's float32 values."""
    reader = gguf.GGUFReader(str(source))
    old = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value, types = field.contents(), field.types
        key = arch + name[len(old):] if name.startswith(old + ".") else name
        sub_type = types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        values = np.array(tensor.data, dtype=np.float32)
        if edit is not None:
            edit(tensor.name, values)
        writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def planted(good):
    return json.loads(good.catalog.read_text())["super_weights"][0]


@pytest.fixture(scope="module")
def foreign(good, tmp_path_factory):
    return rename_architecture(good.gguf, tmp_path_factory.mktemp("foreign") / "bloom.gguf", ARCH)


@pytest.fixture(scope="module")
def foreign_zeroed(good, planted, tmp_path_factory):
    def zero(name, values):
        if name == f"blk.{planted['layer']}.ffn_down.weight":
            values[planted["row"], planted["col"]] = 0.0

    return rename_architecture(good.gguf, tmp_path_factory.mktemp("foreign") / "bloom-zeroed.gguf", ARCH, zero)


def test_inspect_describes_a_foreign_architecture_from_its_header(good, foreign):
    result = swtool_in_process("inspect", foreign, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    config = json.loads((good.model / "config.json").read_text())
    assert info["model_type"] == ARCH and info["gguf"]["llama_cpp_architecture"] == ARCH
    assert (info["layers"], info["hidden_size"], info["vocab_size"]) == (
        config["num_hidden_layers"], config["hidden_size"], config["vocab_size"])
    reader = gguf.GGUFReader(str(foreign))
    assert info["tensors"] == len(reader.tensors)
    assert info["parameters"] == sum(int(t.n_elements) for t in reader.tensors)


def test_audit_with_a_catalog_reads_the_weight_by_its_llama_cpp_name(good, foreign, foreign_zeroed, planted):
    intact = swtool_in_process("audit", foreign, "--catalog", good.catalog, "--json")
    assert intact.returncode == 0, intact.stdout + intact.stderr
    (finding,) = json.loads(intact.stdout)["findings"]
    assert finding["status"] == "intact" and finding["gguf_tensor"] == f"blk.{planted['layer']}.ffn_down.weight"
    assert finding["value"] == planted["value"]  # F32 copied bit for bit
    zeroed = swtool_in_process("audit", foreign_zeroed, "--catalog", good.catalog, "--json")
    assert zeroed.returncode == 1, zeroed.stdout + zeroed.stderr
    assert [f["status"] for f in json.loads(zeroed.stdout)["findings"]] == ["zeroed"]


def test_audit_against_a_reference_scans_the_reference_only(good, foreign_zeroed):
    result = swtool_in_process("audit", foreign_zeroed, "--reference", good.model, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    assert [f["status"] for f in json.loads(result.stdout)["findings"]] == ["zeroed"]


@pytest.mark.parametrize("argv", [["scan"], ["audit"], ["eval", "--text", "{text}"]])
def test_commands_that_need_the_forward_pass_refuse_it_in_one_line(good, foreign, argv):
    argv = [a.replace("{text}", str(good.text)) for a in argv]
    line = one_line_error(swtool_in_process(argv[0], foreign, *argv[1:]))
    assert "'bloom'" in line and "llama" in line

import builtins
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOLLM2_DIR = ROOT / "fixtures" / "build" / "smollm2"


def pytest_report_header(config):
    """Which bf16 kernels this run tests: bf16_pairs needs AVX-512 (tests/test_kernels.py)."""
    from swtool import kernels

    if kernels.pairs_available():
        return "bf16 kernels: bf16_pairs (AVX-512) and dense.py's loop"
    if os.environ.get("SWTOOL_ALLOW_NO_AVX512") == "1":
        return "bf16 kernels: dense.py's loop only; no AVX-512 for numba here, bf16_pairs untested (SWTOOL_ALLOW_NO_AVX512=1)"
    return "bf16 kernels: no AVX-512 for numba here: the bf16_pairs cases fail unless SWTOOL_ALLOW_NO_AVX512=1"


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct as a bf16 HF directory (built by `make fixtures` if missing)."""
    if not (SMOLLM2_DIR / "config.json").is_file():
        from fixtures import smollm2 as builder

        builder.build(SMOLLM2_DIR)
    return SMOLLM2_DIR


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """Build (once per argument set) a tiny transformers model; returns (directory, torch model)."""
    from fixtures.tiny import build_tiny

    built = {}

    def make(family="llama", dtype="float32", plants=(), max_shard_size=None, **overrides):
        key = (family, dtype, tuple(plants), max_shard_size, tuple(sorted(overrides.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"tiny-{family}-{dtype}")
            model = build_tiny(out, family, dtype, plants=plants, max_shard_size=max_shard_size, **overrides)
            built[key] = (out, model)
        return built[key]

    return make


@pytest.fixture(scope="session")
def good(tmp_path_factory):
    """A tiny Llama as safetensors, in shards, as GGUF, and its scan catalog (fixtures/bad_files.py)."""
    from fixtures import bad_files

    return bad_files.build_good(tmp_path_factory.mktemp("good"))


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


@pytest.fixture
def write_opens(monkeypatch):
    """Every path this process opens for writing, through open() or os.open()."""
    opened = []
    real_open, real_os_open = builtins.open, os.open

    def audited_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            opened.append(Path(os.fsdecode(file)).absolute())
        return real_open(file, mode, *args, **kwargs)

    def audited_os_open(path, flags, *args, **kwargs):
        if flags & WRITE_FLAGS:
            opened.append(Path(os.fsdecode(path)).absolute())
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", audited_open)
    monkeypatch.setattr(os, "open", audited_os_open)
    return opened

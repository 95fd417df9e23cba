# Two entry points: `make demo` and `make test`; both run the idempotent `make setup` first.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default. A GPU user picks a CUDA build, e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
# Test workers (pytest-xdist): one per core of the 2-core CI machine; 0 runs the suite in one process.
PYTEST_WORKERS ?= 2

BIN := $(VENV)/bin
STAMP := $(VENV)/.ranktune-installed

.PHONY: setup demo test lint quality test-engines test-deepspeed clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: setup
	$(BIN)/ranktune train examples/quickstart.yaml --overwrite
	$(BIN)/ranktune inspect runs/quickstart --plot runs/quickstart/ranks.png

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal --durations=15 $(PYTEST_ARGS)

# The quality study (hours on a CPU; resumable: finished runs are recorded in docs/data/quality/records.jsonl).
quality: setup
	$(BIN)/python -m benchmarks.quality --profile $(or $(PROFILE),cpu)

# Real inference engines (llama.cpp, vLLM), each in its own environment under ~/.cache/ranktune/engines (built once:
# about 15 minutes on 2 cores); writes docs/engines.md and fails unless every recommended form serves correctly.
test-engines: setup
	$(BIN)/python -m benchmarks.engines --check

# DeepSpeed ZeRO-2 / ZeRO-3 with 2 real processes (tests/distributed/test_deepspeed.py), in an environment of its own
# with the deepspeed package (built once, a few minutes); DeepSpeed compiles its CPU communication op on the first run
# (about 7 minutes on 2 cores). The runs are on CPU, over gloo.
DS_VENV ?= .venv-deepspeed
DS_STAMP := $(DS_VENV)/.ranktune-installed

$(DS_STAMP): pyproject.toml
	@test -x $(DS_VENV)/bin/python || $(PYTHON) -m venv $(DS_VENV)
	$(DS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DS_VENV)/bin/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	DS_BUILD_OPS=0 $(DS_VENV)/bin/python -m pip install --quiet -e ".[dev,deepspeed]"
	@touch $(DS_STAMP)

test-deepspeed: $(DS_STAMP)
	DS_ACCELERATOR=cpu $(DS_VENV)/bin/python -m pytest --durations=0 tests/distributed/test_deepspeed.py $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(DS_VENV) build dist src/*.egg-info .pytest_cache .ruff_cache

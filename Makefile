# mbm — the two quickstart commands:
#   make demo   sets up .venv and preprocesses the bundled sample dataset
#   make test   sets up .venv and runs the whole test suite (fast and slow)
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mbm-installed

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mbm demo --output out/demo

# pytest exits 5 when it collected nothing; that is not a failure of the code under test.
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Benchmarks: side by side with the alternatives, written into docs/benchmarks.md (about 10 min on the 2-core Xeon of docs/benchmarks.md, up to 40 on slower 2-core machines).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
	$(BIN)/python benchmarks/preprocess.py --memory --write
	$(BIN)/python benchmarks/stream.py --write
	$(BIN)/python benchmarks/incremental.py --samples 300 --write

lint: $(STAMP)
	$(BIN)/ruff check schemas pipelines mbm jobs tests benchmarks

clean:
	rm -rf out runs .pytest_cache

# Wheels that benchmarks/gpu.sh installs offline on a Python 3.12 GPU machine (into .whl/, about 20 MB).
.PHONY: gpu-wheels
gpu-wheels:
	bash benchmarks/gpu_wheels.sh

# bigrec: `make demo` runs the pipeline on the bundled default, `make test` runs the fast suite.
# Both set up .venv first when it is missing or older than pyproject.toml.
# `make test-min` runs the fast suite in .venv-min, with every dependency at its stated lower bound.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MIN_VENV := .venv-min
MIN_STAMP := $(MIN_VENV)/.installed
# Without a GPU take the CPU build of torch (never a multi-GB CUDA download).
# Elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu to fetch the CPU wheel.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)

.PHONY: setup test test-min test-slow test-browser bench demo lint clean fuzz

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),yes)
	$(BIN)/pip install -q "torch>=2.6"
else
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
endif
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest

# The lowest versions we claim: each `name>=X` of pyproject.toml's dependencies and dev extra is
# installed as name==X (tools/lowest_constraints.py); what they pull in floats. torch comes from PyPI
# at its bound (a CUDA build, ~3 GB, which runs on the CPU). Built anew when pyproject.toml changes.
$(MIN_STAMP): pyproject.toml tools/lowest_constraints.py
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(PYTHON) tools/lowest_constraints.py pyproject.toml > $(MIN_VENV)/constraints.txt
	$(MIN_VENV)/bin/pip install -q -c $(MIN_VENV)/constraints.txt -e ".[dev]"
	touch $(MIN_STAMP)

test-min: $(MIN_STAMP)
	cat $(MIN_VENV)/constraints.txt | tr '\n' ' '; echo
	$(MIN_VENV)/bin/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# Debian's headless Chromium and its driver (apt), Selenium (the browser extra); nothing fetched at test time.
test-browser: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)
	$(BIN)/pip install -q -e ".[dev,browser]"
	$(BIN)/python -m pytest -m browser

# Schemathesis over bigrec serve on the tests' tiny run: the long run (the fast suite runs a short one).
fuzz: $(STAMP)
	PYTHONPATH=benchmarks $(BIN)/python tests/fuzz_serve.py --max_examples 100

bench: $(STAMP)
	$(BIN)/python benchmarks/run_small.py

demo: $(STAMP)
	$(BIN)/bigrec demo

clean:
	rm -rf $(VENV) $(MIN_VENV) build dist src/*.egg-info .pytest_cache .ruff_cache

# Two commands on a fresh machine with Python 3.11:
#   make run    creates .venv, installs kexue, trains the main job (configs/lm_stdlib.py)
#   make test   creates .venv, installs kexue[all,test], runs the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG  ?= configs/lm_stdlib.py
WORKDIR ?= runs/lm_stdlib

ACCEL_OUT ?= runs/accelerator
ACCEL_ARGS ?=

.PHONY: run demo test lint bench bench-peers accel accel-wheels clean

$(VENV)/.installed: setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all,test,bench]'
	touch $@

# Trains (or resumes) the byte-level LM on the stdlib; prints eval bits/byte and a sample.
run: $(VENV)/.installed
	$(PY) -m experiments.train --config $(CONFIG) --workdir $(WORKDIR)

demo: $(VENV)/.installed
	$(PY) -m experiments.demo --config configs/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# The tables of benchmarks/RESULTS.md (each script prints its own; minutes on a 2-core CPU).
bench: $(VENV)/.installed
	$(PY) -m benchmarks.ops
	$(PY) -m benchmarks.optim
	$(PY) -m benchmarks.lm
	$(PY) -m benchmarks.attention --out benchmarks/results/attention.json

# kexue vs Hugging Face's PyTorch RoFormer (installs the `peers` extra: torch, transformers).
bench-peers: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[peers]'
	$(PY) -m benchmarks.peers

# The accelerator campaign (benchmarks/accelerator.py): the default parts (correctness,
# studies, speed) at full size on the device JAX finds, <part>.json / <part>.md into
# $(ACCEL_OUT); under 8 minutes on one H200. ACCEL_ARGS="--parts studies_ner" for the
# NER grids, ACCEL_ARGS=--smoke for toy sizes on CPU.
accel: $(VENV)/.installed
	$(PY) -m benchmarks.accelerator --out $(ACCEL_OUT) $(ACCEL_ARGS)

# The wheels a GPU machine without a package index lacks, into .whl/, and their check.
accel-wheels: $(VENV)/.installed
	PYTHON=$(PY) bash benchmarks/accelerator_wheels.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis

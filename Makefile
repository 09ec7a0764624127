# The README's commands: `make run` (install + the default DeepCluster run), `make test`,
# `make serve` / `make stop` (the Prefect server and the served deployment).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
FAISS ?= cpu
PORT ?= 4200
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The offline-safe environment (no telemetry, state in the project) is set by `import pipeline`
# (pipeline.OFFLINE_ENV); DVC's own analytics are off in .dvc/config.
# dvc.yaml's commands call `python -m ...`: the project's environment must come first on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install dataset run test clean-run serve stop serve-status

$(VENV)/.installed-$(FAISS): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(FAISS),test]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(VENV)/.installed-$(FAISS)

$(FASHION_MNIST):
	if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

dataset: $(FASHION_MNIST)

run: install dataset
	$(VENV)/bin/dvc repro

test: install dataset
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q

serve: install dataset
	$(PY) -m pipeline.serve start --port $(PORT)

stop:
	$(PY) -m pipeline.serve stop

serve-status:
	$(PY) -m pipeline.serve status

clean-run:
	rm -rf data/dataset data/epochs data/eval data/ablations models/checkpoints mlflow.db mlruns

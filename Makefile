# The README's two commands: `make run` (install + the default DeepCluster run) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
FAISS ?= cpu
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# Offline-safe defaults for the tools (see README "Environment").
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: install dataset run test clean-run

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

clean-run:
	rm -rf data/dataset data/epochs data/eval models/checkpoints mlflow.db mlruns

# The README's commands: `make run` (install + the default DeepCluster run), `make test`,
# `make serve` / `make stop` (the Prefect server and the served deployment).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
FAISS ?= cpu
PORT ?= 4200
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The offline-safe environment (no telemetry, state in the project) is set by each command line's main()
# (pipeline.offline_environment); DVC's own analytics are off in .dvc/config.
# dvc.yaml's commands call `python -m ...`: the project's environment must come first on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install dataset run test learn-check clean-run serve stop serve-status gpu-check gpu-check-bundle

$(VENV)/.installed-$(FAISS): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# both faiss builds install the module `faiss`: switching builds must remove the other one first
	if [ -e $(VENV)/.installed-cpu ] || [ -e $(VENV)/.installed-gpu ]; then \
	  $(PY) -m pip uninstall -q -y faiss-cpu faiss-gpu faiss-gpu-cu12 2>/dev/null || true; fi
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

# Before a release: does the recipe still beat its random networks on a small data set? (pipeline/tools/learn_check.py)
learn-check: install dataset
	$(PY) -m pipeline.tools.learn_check $(LEARN_CHECK_ARGS)

serve: install dataset
	$(PY) -m pipeline.serve start --port $(PORT)

stop:
	$(PY) -m pipeline.serve stop

serve-status:
	$(PY) -m pipeline.serve status

clean-run:
	rm -rf data/dataset data/epochs data/eval data/ablations models/checkpoints mlflow.db mlruns

# The GPU check (pipeline/tools/gpu_check.py, docs/gpus.md "The GPU check"). On a GPU machine with only torch and
# the working tree: the system python, plus pydantic/pyyaml/tqdm from the carried wheels if missing
# (installed into data/gpu-check/site, never into the system). Skips with exit 0 without a GPU.
GPU_PYTHON ?= python3
GPU_CHECK := data/gpu-check
gpu-check:
	if ! $(GPU_PYTHON) -c 'import pydantic, yaml, tqdm' 2>/dev/null; then \
	  test -d $(GPU_CHECK)/wheels || { echo "gpu-check: pydantic, pyyaml or tqdm missing and no $(GPU_CHECK)/wheels (make gpu-check-bundle)"; exit 1; }; \
	  $(GPU_PYTHON) -m pip install -q --no-index --find-links $(GPU_CHECK)/wheels --target $(GPU_CHECK)/site pydantic pyyaml tqdm; fi
	PYTHONPATH=$(abspath $(GPU_CHECK))/site$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) -m pipeline.tools.gpu_check $(GPU_CHECK_ARGS)

# What the GPU machine needs from here (gitignored, carried with the working tree): the Fashion-MNIST
# subset and the wheels of pydantic (+ pydantic-core, annotated-types, typing-extensions,
# typing-inspection), pyyaml and tqdm for CPython 3.10-3.13. About 18 MB in all.
gpu-check-bundle: install dataset
	$(PY) -m pipeline.tools.gpu_check --bundle
	for v in 3.10 3.11 3.12 3.13; do \
	  $(PY) -m pip download -q --only-binary=:all: --python-version $$v --implementation cp \
	    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	    -d $(GPU_CHECK)/wheels 'pydantic>=2' 'pyyaml>=6' 'tqdm>=4.66' || exit 1; done
	du -sh $(GPU_CHECK)/fashion-mnist $(GPU_CHECK)/wheels

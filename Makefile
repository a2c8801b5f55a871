# Two entry points for a fresh Linux machine: `make train` and `make test`.
# Everything is installed into .venv (created when missing); torch/torchvision are pinned by
# constraints.txt, the package itself is installed editable so that tests, benchmarks and the
# trainer all run the code in this checkout (including the compiled extension mskd_fast._C).

VENV        ?= .venv
PYTHON_BIN  ?= python3
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
PIP_FLAGS   ?= -q --disable-pip-version-check
CONSTRAINTS := -c constraints.txt
CUDA_HOME   ?= $(shell test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda)
export CUDA_HOME
export MAX_JOBS ?= 2
PYTEST_ARGS ?=

# The real-object dataset (fashion-multi) reads Fashion-MNIST from the Debian package dataset-fashion-mnist.
FASHION_DIR := /usr/share/datasets/fashion-mnist
# --amp (bf16) where a CUDA GPU is visible; on a CPU bf16 is emulated unless it has AVX512-BF16/AMX.
AMP_FLAG    ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo --amp)

.PHONY: help venv install install-dev fashion-data train study test bench lint clean

help:
	@echo "make train   - install (with DALI and Fashion-MNIST) and train MSKD on real-object composites (about 2 min)"
	@echo "make study   - the real-object accuracy study (docs/ACCURACY.md; about 3 h on 2 CPU cores, restartable)"
	@echo "make test    - install (with dev tools), run the test suite, then each benchmark once as a test"
	@echo "make bench   - run the benchmark suite (pytest bench/ --benchmark-only)"
	@echo "make lint    - ruff check"

# Each install step is skipped when its stamp in $(VENV) matches (scripts/install_stamp.py: a hash of
# csrc/, setup.py, pyproject.toml, constraints.txt, the torch version and the build switches) and the
# compiled extension loads; a fresh venv, a changed source or a deleted .so (make clean, CI) reinstalls.
STAMP       := $(PY) scripts/install_stamp.py --venv $(VENV)

venv:
	@test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	@if $(STAMP) check venv; then echo "venv: up to date (constraints.txt unchanged)"; else \
	  $(PIP) install $(PIP_FLAGS) --upgrade pip "setuptools>=77" wheel ninja && \
	  $(PIP) install $(PIP_FLAGS) $(CONSTRAINTS) torch torchvision && \
	  $(STAMP) write venv; fi

install: venv
	@if $(STAMP) check dali dali-dev; then echo "mskd-fast: up to date, extension not rebuilt (make clean forces it)"; \
	else $(PIP) install $(PIP_FLAGS) --no-build-isolation $(CONSTRAINTS) -e '.[dali]' && $(STAMP) write dali; fi

install-dev: venv
	@if $(STAMP) check dali-dev; then echo "mskd-fast[dev]: up to date, extension not rebuilt (make clean forces it)"; \
	else $(PIP) install $(PIP_FLAGS) --no-build-isolation $(CONSTRAINTS) -e '.[dali,dev]' && $(STAMP) write dali-dev; fi

fashion-data:
	@test -f $(FASHION_DIR)/train-images-idx3-ubyte.gz || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get install -y -q dataset-fashion-mnist || \
	  { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; }; }

train: install fashion-data
	$(PY) -m mskd_fast.train --dataset fashion-multi $(AMP_FLAG)

study: install fashion-data
	$(PY) bench/accuracy_study.py --profile fashion --device cpu --output study-fashion --lr-check 0.05 0.2

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)
	$(PY) -m pytest bench/ --benchmark-disable -q -p no:cacheprovider

bench: install-dev
	$(PY) -m pytest bench/ --benchmark-only

lint: install-dev
	$(PY) -m ruff check .

clean:
	rm -rf build *.egg-info mskd_fast/_C*.so .pytest_cache .benchmarks $(VENV)/.mskd-fast-*.stamp

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

.PHONY: help venv install install-dev train test bench lint clean

help:
	@echo "make train   - install (with DALI) and train MSKD on the built-in synthetic dataset"
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

train: install
	$(PY) -m mskd_fast.train --amp

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)
	$(PY) -m pytest bench/ --benchmark-disable -q -p no:cacheprovider

bench: install-dev
	$(PY) -m pytest bench/ --benchmark-only

lint: install-dev
	$(PY) -m ruff check .

clean:
	rm -rf build *.egg-info mskd_fast/_C*.so .pytest_cache .benchmarks $(VENV)/.mskd-fast-*.stamp

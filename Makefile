# Two commands do all set-up on a fresh machine:
#   make train   create .venv, install, generate the embedded dataset, train and evaluate
#   make test    create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CUDA build of torch; it also runs on CPU-only machines. Override for another build, e.g.
#   make train TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev,dali
ARGS ?=

.PHONY: install train test bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

train: install
	$(PY) -m fastmlgan.train $(ARGS)

test: install
	$(PY) -m pytest -q -m "not benchmark" $(ARGS)

bench: install
	$(PY) bench/kernels.py
	$(PY) bench/loader.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache

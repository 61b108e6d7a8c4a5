# Two commands do all set-up on a fresh machine (Linux or macOS):
#   make train   create .venv, install, generate the embedded dataset, train and evaluate
#   make test    create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision first, at the versions the tests run with. For another build (CPU-only,
# another CUDA version) set TORCH_SPEC as the README's "Install" section shows.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# DALI has Linux wheels only (its extra's environment markers skip it elsewhere as well).
UNAME_S ?= $(shell uname -s)
ifeq ($(UNAME_S),Linux)
EXTRAS ?= dev,plots,tb,shards,timm,dali
else
EXTRAS ?= dev,plots,tb,shards,timm
endif
ARGS ?=

.PHONY: install train test test-slow test-faults gpu-check-dry bench lint docker-lint clean FORCE

install: $(VENV)/.installed

# The install is redone when what it installs changes: setup.py, pyproject.toml, or TORCH_SPEC and
# EXTRAS, which .install-spec records. A stamp on the two files alone kept a venv installed with
# other extras (this file's default before plots,tb; or EXTRAS=dev) for good, and `make test` then
# skipped the extras' tests.
INSTALL_SPEC := $(TORCH_SPEC) [$(EXTRAS)]
$(VENV)/.install-spec: FORCE
	@mkdir -p $(VENV)
	@if [ "$$(cat $@ 2>/dev/null)" != '$(INSTALL_SPEC)' ]; then echo '$(INSTALL_SPEC)' > $@; fi

$(VENV)/.installed: setup.py pyproject.toml $(VENV)/.install-spec
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

train: install
	$(PY) -m fastmlgan train $(ARGS)

# The suite runs on every core with pytest-xdist (whole files per worker; at most 4 workers, each
# holds its own torch import); TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))" 2>/dev/null || echo 1)

# FASTMLGAN_TEST_EXTRAS: the extras installed above; a test needing one of them fails, not skips,
# when it cannot import it (tests/helpers/extras.py).
test: install
	FASTMLGAN_TEST_EXTRAS=$(EXTRAS) $(PY) -m pytest -q -m "not benchmark and not faults and not slow" -n $(TEST_WORKERS) --dist loadfile $(ARGS)

# The slow end-to-end runs (marker `slow`: multi-process DDP, compiled DDP, kills and resumes,
# the SLURM launch, the whole-command runs) and the benchmark cases' compiled-versus-eager checks
# (each timed case runs once, untimed); CI runs them after `make test`.
test-slow: install
	FASTMLGAN_TEST_EXTRAS=$(EXTRAS) $(PY) -m pytest -q -m "(slow or benchmark) and not faults" --benchmark-disable -n $(TEST_WORKERS) --dist loadfile $(ARGS)

# The long fault-injection runs (CI runs them after `make test`).
test-faults: install
	$(PY) -m pytest -q -m faults $(ARGS)

# The GPU check's CPU dry run: bench/gpu_check.sh's every step in order on tiny sizes (~3 min on 2
# cores), then the checker on its one-archive bundle (CI runs it after `make test`).
# One folder for both commands (GPU_CHECK_OUT, else a fresh temporary one), chosen in the recipe:
# a make variable holding $(shell mktemp -d) would make a new folder at each use.
GPU_CHECK_OUT ?=

gpu-check-dry: install
	out="$(GPU_CHECK_OUT)"; out="$${out:-$$(mktemp -d)}"; \
	GPU_CHECK_DEVICE=cpu OUT="$$out" PYTHON=$(PY) bash bench/gpu_check.sh; \
	$(PY) bench/gpu_bundle.py check "$$out" --require-passed

bench: install
	$(PY) bench/kernels.py
	$(PY) bench/loader.py

lint: install docker-lint
	$(VENV)/bin/ruff check .

# hadolint comes with the dev extra where a wheel carries its binary (not Linux aarch64).
docker-lint: install
	@if [ -x $(VENV)/bin/hadolint ]; then \
		$(VENV)/bin/hadolint Dockerfile.cuda && echo "hadolint: Dockerfile.cuda passes"; \
	else \
		echo "hadolint is not installed on this platform: Dockerfile.cuda not linted"; \
	fi

clean:
	rm -rf runs .pytest_cache

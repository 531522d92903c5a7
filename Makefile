# Set-up is idempotent: the venv is made once and the project reinstalled only when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.opdiff-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint mutation

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch may pull another multi-GB build
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/opdiff demo --output-dir runs/demo --overwrite  # an earlier demo is moved aside

# One test process per core; a file's tests stay in one process (they share module fixtures and servers).
test: setup
	$(VENV)/bin/python -m pytest -q -n auto --dist loadfile

lint: setup
	$(VENV)/bin/ruff check .

# Mutation testing of the method maths (opdiff/mpo.py, methods/op.py, lora_over.py, lora_over_select.py, reparam.py) against
# the fast opdiff-level tests; not part of `make test`. Settings in pyproject.toml [tool.mutmut]; takes a while.
mutation: setup
	OMP_NUM_THREADS=1 nice -n 19 $(VENV)/bin/mutmut run --max-children 2
	$(VENV)/bin/mutmut results

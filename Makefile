# Two commands for a newcomer (see README): `make demo` and `make test`.
# Both create ./.venv on first use (CPU JAX + CPU torch for the tests), then run.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup demo test

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 is the CPU build; installed first so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m mlembed_jax.train --config=configs/demo.py --workdir=runs/demo-$$(date +%Y%m%d-%H%M%S)

# pytest exits 5 when it collected no tests; that must fail, not pass.
test: setup
	$(BIN)/python -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran"; exit 1; fi; exit $$rc

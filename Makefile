# Two commands for a newcomer (see README): `make demo` and `make test`.
# Both create ./.venv on first use, then run: the demo installs only the runtime (CPU JAX
# and what training, encode and export need, ~1.3 GB); the tests add CPU torch,
# sentence-transformers, tokamax, pytest and ruff, and off the import path (below) libtpu
# and jax's CUDA plugin with cuDNN (compiling for TPUs and GPUs needs neither).
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup demo test test-unit test-all libtpu gpu-aot

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	# torch 2.13.0 is the CPU build; installed first so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# libtpu lets tools/aot_compile.py (and tests/test_aot.py) describe TPU pods and compile for
# them on a machine without TPUs. The version is the one the installed jax asks for in its
# [tpu] extra. It goes to $(VENV)/libtpu, off the import path, so CPU runs never load it
# (~210 MB download, ~690 MB installed). Without network the TPU tests are skipped, saying so.
LIBTPU = $(VENV)/libtpu/libtpu/libtpu.so

$(LIBTPU): $(BIN)/.installed
	spec=$$($(BIN)/python -c "from mlembed_jax.perf.aot_target import jax_libtpu_requirement as r; q = r(); print(f'{q.name}{q.specifier}' if q else 'libtpu')"); \
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/libtpu "$$spec" \
	  || echo "warning: could not install $$spec; tests/test_aot.py will skip its TPU tests"

libtpu: $(LIBTPU)

# gpu-aot: jax's CUDA plugin (the release of the installed jaxlib), cuDNN and ptxas let
# tools/aot_compile.py (and tests/test_aot_gpu.py) compile for H100/H200/B200 with XLA:GPU on
# a machine without a GPU (~1.6 GB installed). They go to $(VENV)/gpu-aot, off the import
# path: an importable CUDA plugin makes every JAX process on a GPU-less machine print driver
# warnings. aot_compile adds the folder for GPU targets only.
GPUAOT = $(VENV)/gpu-aot/.installed

$(GPUAOT): $(BIN)/.installed
	ver=$$($(BIN)/python -c "import jaxlib; print(jaxlib.__version__)"); \
	$(BIN)/pip install -q --upgrade --target $(VENV)/gpu-aot "jax-cuda12-plugin==$$ver" \
	  "nvidia-cudnn-cu12>=9.8" "nvidia-cuda-nvcc-cu12>=12.6.85" \
	  && touch $@ \
	  || echo "warning: could not install jax's CUDA plugin; tests/test_aot_gpu.py will skip"

gpu-aot: $(GPUAOT)

setup: $(BIN)/.installed-test $(LIBTPU) $(GPUAOT)

demo: $(BIN)/.installed
	$(BIN)/python -m mlembed_jax.train --config=configs/demo.py --workdir=runs/demo-$$(date +%Y%m%d-%H%M%S)

# Lint first (ruff, pyproject.toml's rules; the same check .pre-commit-config.yaml runs).
# Two workers, one test file each at a time (module fixtures are built once). `make test`
# leaves out the tests marked slow (pyproject.toml, README "Tests"); `make test-all` runs all.
# pytest exits 5 when it collected no tests; that must fail, not pass.
PYTEST = $(BIN)/python -m pytest -q -n 2 --dist loadfile
test: setup
	$(BIN)/ruff check .
	$(PYTEST) -m "not slow" tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran"; exit 1; fi; exit $$rc

# The fast tier: what is neither integration (trains, starts subprocesses, compiles big
# programs) nor slow; for the edit-test loop. `make test` stays the gate.
test-unit: setup
	$(BIN)/ruff check .
	$(PYTEST) -m "not integration and not slow" tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran"; exit 1; fi; exit $$rc

test-all: setup
	$(BIN)/ruff check .
	$(PYTEST) tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran"; exit 1; fi; exit $$rc

# solq_d2 — see README.md. On a fresh clone `make demo` and `make test` are each one command:
# both run `make setup` first (idempotent; fast when nothing changed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
OUTPUT ?= output/demo
# Extra arguments for the demo, e.g. `make demo DEMO_ARGS="--minutes 5"`
DEMO_ARGS ?=
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k msda -x"`
PYTEST_ARGS ?=

.PHONY: setup demo test cuda-build-check collect-env benchmark clean

setup:
	$(PYTHON) tools/setup_env.py --python $(PYTHON)

demo: setup
	$(PY) tools/demo.py --output $(OUTPUT) $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS) tests

# Compile and link the CUDA half of csrc/ (no GPU needed); used by CI where nvcc exists.
cuda-build-check: setup
	$(PY) tools/check_cuda_build.py

collect-env: setup
	$(PY) -m solq_d2.utils.collect_env

benchmark: setup
	$(PY) tools/benchmark_ops.py

clean:
	rm -rf build solq_d2/*.so solq_d2.egg-info

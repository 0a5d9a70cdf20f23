# Two commands for a fresh machine (Python 3.11 + make): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format docs bench bench-quantize bench-api bench-gpu clean

$(STAMP): pyproject.toml docs/plugins/example/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,server,verify]'
	$(PY) -m pip install -q -e docs/plugins/example
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: $(STAMP)
	$(PY) scripts/gen_cli_docs.py

bench: $(STAMP)
	$(PY) benchmarks/bench_merge.py

bench-quantize: $(STAMP)
	$(PY) benchmarks/bench_quantize.py

bench-api: $(STAMP)
	$(PY) benchmarks/bench_api.py

# On a CUDA GPU, with the venv's python if there is one, else $(PYTHON) (BENCH_GPU_ARGS: --quick, --dry-run, --out F).
bench-gpu:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/gpu_kernels.py $(BENCH_GPU_ARGS)

clean:
	rm -rf .demo build dist

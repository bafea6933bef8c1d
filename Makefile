# Two commands for a fresh machine with Python 3.11 and make: `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV ?= $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
UV_VERSION := 0.13.9
export UV_COMPILE_BYTECODE := 1
export UV_PYTHON_DOWNLOADS := never
# A portable llama.cpp build: no -march=native, so the wheel in uv's cache runs anywhere.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
export DAGMA_HOME ?= $(CURDIR)/.dagma
RUN = $(UV) run --frozen --no-sync
# Runs per alternative in `make bench`: 2 keeps it under 15 minutes on 2 cores.
BENCH_REPEAT ?= 2
# `--write-docs` records only a committed HEAD; `make bench BENCH_FLAGS=--allow-dirty` records
# anyway, with the uncommitted files named in each section.
BENCH_FLAGS ?=

.PHONY: help install tools demo test lint format bench bench-backfill bench-gate dagster mlflow lab app clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

.tools/bin/uv:
	python3.11 -m venv .tools || python3 -m venv .tools
	.tools/bin/pip install --quiet "uv==$(UV_VERSION)"

install: | $(UV)  ## Create or update .venv from uv.lock (bytecode compiled)
	@test -d .venv || echo "Installing the locked environment (the first build of llama-cpp-python takes ~6 min)."
	$(UV) sync --frozen

demo: install  ## Materialize the whole demo graph into $DAGMA_HOME
	$(RUN) dagma demo

tools:  ## System packages the suite runs for real (nix-bin, Chromium, PostgreSQL), via apt
	bash scripts/install-system-tools.sh

test: tools lint  ## Lint, type-check, then the whole test suite (unit, integration, nbval)
	$(RUN) pytest

lint: install  ## ruff lint + format check, mypy
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy

format: install  ## Format and sort imports
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

bench: install  ## Benchmarks side by side (~15 min); writes docs/benchmarks.md
	$(RUN) python benchmarks/bench_notebook.py --write-docs --repeat $(BENCH_REPEAT) $(BENCH_FLAGS)
	$(RUN) python benchmarks/bench_graph.py --write-docs --repeat $(BENCH_REPEAT) $(BENCH_FLAGS)
	$(RUN) python benchmarks/bench_vectors.py --write-docs --repeat $(BENCH_REPEAT) $(BENCH_FLAGS)
	$(RUN) python benchmarks/bench_api.py --write-docs --repeat $(BENCH_REPEAT) $(BENCH_FLAGS)
	$(RUN) python benchmarks/bench_telemetry.py --write-docs $(BENCH_FLAGS)

bench-backfill: install  ## 60-partition backfill through services mode at run limits 1 and 2 (~30 min)
	$(RUN) python benchmarks/bench_backfill.py --limits 1,2 --write-docs $(BENCH_FLAGS)

bench-gate: install  ## Quick benchmarks; fails on a ratio >30% worse than benchmarks/baseline.json
	$(RUN) python benchmarks/gate.py

dagster: install  ## Dagster UI on http://127.0.0.1:3000
	mkdir -p $(DAGMA_HOME)/dagster
	DAGSTER_HOME=$(DAGMA_HOME)/dagster $(UV) run --frozen dagster dev -h 127.0.0.1 -p 3000

mlflow: install  ## MLflow UI on http://127.0.0.1:5000
	$(RUN) mlflow ui --host 127.0.0.1 --port 5000 \
	  --backend-store-uri sqlite:///$(DAGMA_HOME)/mlflow/mlflow.db

lab: install  ## dagster dev, MLflow UI, JupyterLab and the app together (adds the `lab` group)
	$(UV) run --frozen --group lab dagma lab

app: install  ## Streamlit app on http://127.0.0.1:8501
	$(RUN) streamlit run src/dagma/app/streamlit_app.py \
	  --server.address 127.0.0.1 --server.port 8501 --server.headless true

clean:  ## Remove the embedded state in $DAGMA_HOME
	rm -rf "$(DAGMA_HOME)"

# Two commands on a fresh machine: `make table` (the whole pipeline, ending in results/) and `make test`.
# On SLURM: `make table EXECUTOR=slurm [CLUSTER=slurm/clusters/site.yaml]` submits, run again for progress / tables.
# `make table DRY_RUN=1`: the job graph (state, resources, GPU-hours) and the pre-flight's findings; runs nothing.
PY := .venv/bin/python
PROFILE ?= builtin
EXECUTOR ?= local
CLUSTER ?=
DRY_RUN ?=
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-fast lint format table bench data clean-runs

setup:
	@bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm"

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: setup
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

data: setup
	$(PY) -c "from core.data import BUILTIN_SETS, ensure_builtin; [ensure_builtin(f'data/{n}/VOC2007') for n in BUILTIN_SETS]"

table: export CE_TABLE_START := $(shell date +%s)
table: setup
	$(PY) -m orchestrate.pipeline --profile $(PROFILE) --executor $(EXECUTOR) $(if $(CLUSTER),--cluster $(CLUSTER)) $(if $(DRY_RUN),--dry-run)

bench: setup
	$(PY) -m bench.run

clean-runs:
	rm -rf runs/$(PROFILE)

# normkit — everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= test,torch,data,plots,dask
# timm: the outside oracle of tests/test_competitors.py, installed without its dependencies (its
# torchvision requirement resolves to a CUDA build that fails beside the CPU torch; the tests load
# only timm's layer files, which need torch alone).
TIMM   := timm==1.0.31

.PHONY: install test clean quick studies bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	$(PY) -m pip install --quiet --no-deps "$(TIMM)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

# --- studies: results are files, so make redoes only what changed -------------------------------
# results/S/runs.csv depends on studies/S.py and the helpers studies/_*.py, and S's tables on its
# runs.csv; `make quick` uses the quick grids (results/S/quick/...). `normkit run` resumes: it
# skips the configs already in runs.csv, so a killed `make quick` continues where it stopped when
# run again. Options:
# JOBS=N (local worker processes), SCHEDULER=tcp://host:8786 or SCHEDULER=local (Dask).
NORMKIT  := $(PY) -m normkit
STUDIES  := $(patsubst studies/%.py,%,$(filter-out studies/_%,$(wildcard studies/*.py)))
RUN_ARGS := $(if $(JOBS),--jobs $(JOBS)) $(if $(SCHEDULER),--scheduler $(SCHEDULER))
NOTHING  := echo "no studies in studies/: nothing to run (studies/README.md says how to add one)"

quick: $(STAMP) $(STUDIES:%=results/%/quick/table.md)
	@$(if $(STUDIES),echo "tables written: $(filter %.md,$^)",$(NOTHING))

# ... and rewrite README.md's studies block from the full-grid results.
studies: $(STAMP) $(STUDIES:%=results/%/table.md)
	@$(if $(STUDIES),echo "tables written: $(filter %.md,$^)",$(NOTHING))
	$(NORMKIT) readme

# The study script changed: run its new configs and retry its failed ones. Exit code 1 (some runs
# failed) is left for the table step to report, after it has written the table.
# A study's own script and the shared helpers (studies/_*.py) it may import.
HELPERS  := $(wildcard studies/_*.py)
results/%/quick/runs.csv: studies/%.py $(HELPERS) | $(STAMP)
	$(NORMKIT) run $* --quick --rerun-failed --no-summary $(RUN_ARGS) || [ $$? -eq 1 ]
results/%/runs.csv: studies/%.py $(HELPERS) | $(STAMP)
	$(NORMKIT) run $* --rerun-failed --no-summary $(RUN_ARGS) || [ $$? -eq 1 ]

# `normkit run`, not `normkit table`: it first finishes a sweep that was interrupted.
results/%/quick/table.md: results/%/quick/runs.csv
	$(NORMKIT) run $* --quick $(RUN_ARGS)
results/%/table.md: results/%/runs.csv
	$(NORMKIT) run $* $(RUN_ARGS)

# Never delete a runs.csv: not as an intermediate file, not when make is interrupted.
.PRECIOUS: results/%/runs.csv results/%/quick/runs.csv

bench: $(STAMP)
	@if [ -f benchmarks/kernels.py ]; then $(NORMKIT) bench; \
	else echo "no benchmark yet (benchmarks/kernels.py)"; fi
	@if [ -f benchmarks/rnn.py ]; then $(NORMKIT) bench --script benchmarks/rnn.py; fi

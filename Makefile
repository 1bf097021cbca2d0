# Two commands do all the set-up: `make book` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch lies on this machine's disk; pinning it first keeps pip from pulling a
# multi-GB CUDA build when another package asks for torch.
TORCH := torch==2.13.0

.PHONY: install test book check-clean pytest smoke bench clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

## nbdev_export and nbdev_clean must leave git exactly as it was (notebooks are the source).
check-clean: install
	@before=$$(git status --porcelain; git diff); \
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean; \
	after=$$(git status --porcelain; git diff); \
	if [ "$$before" != "$$after" ]; then \
	  echo "nbdev_export/nbdev_clean changed files: run them and commit the result"; git status --short; exit 1; \
	fi; echo "notebooks and modules are in sync and clean"

pytest: install
	MPLBACKEND=Agg $(BIN)/python -m pytest tests -q

## every chapter, in order, with the tiny smoke profile, through the same papermill runner
smoke: install
	$(BIN)/cytoclr run --profile smoke --out runs/smoke --force

test: check-clean pytest smoke

book: install
	$(BIN)/cytoclr run --profile quick --out runs/quick
	$(BIN)/cytoclr book --run runs/quick --out _build
	@echo "open $$(pwd)/_build/html/index.html"

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf _build runs/smoke

# Two commands do all the set-up: `make book` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch lies on this machine's disk; pinning it first keeps pip from pulling a
# multi-GB CUDA build when another package asks for torch.
TORCH := torch==2.13.0

.PHONY: install test book check-clean pytest smoke smoke-book browser browser-check bench clean

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

## the browser check needs a built book: it runs after smoke-book (browser-check), not here
pytest: install
	MPLBACKEND=Agg $(BIN)/python -m pytest tests -q --ignore=tests/test_book_browser.py

## every chapter, in order, with the tiny smoke profile, through the same papermill runner
smoke: install
	$(BIN)/cytoclr run --profile smoke --out runs/smoke --force

## the book of the smoke run, checked in a real browser (offline, every chapter page)
smoke-book: install
	$(BIN)/cytoclr book --run runs/smoke --out _build/smoke

## Debian's chromium for the browser check (Playwright's own browser download cannot work offline)
browser:
	@if [ -x /usr/bin/chromium ]; then echo "chromium: $$(/usr/bin/chromium --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "the browser check needs Debian's chromium at /usr/bin/chromium:" \
	  "run 'sudo apt-get install -y chromium' (or make browser as root)"; exit 1; fi

browser-check: install browser
	@test -f _build/smoke/html/index.html || { echo "no smoke book in _build/smoke/html: run make smoke smoke-book"; exit 1; }
	CYTOCLR_BOOK_HTML=_build/smoke/html CYTOCLR_SCREENSHOT_DIR=runs/smoke MPLBACKEND=Agg \
	  $(BIN)/python -m pytest tests/test_book_browser.py -q

test: check-clean pytest smoke smoke-book browser-check

book: install
	$(BIN)/cytoclr run --profile quick --out runs/quick
	$(BIN)/cytoclr book --run runs/quick --out _build
	@echo "open $$(pwd)/_build/html/index.html"

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf _build runs/smoke

# Harbour: `make up` runs everything locally, `make test` runs every test. Both create the
# virtualenv on first use. Needs Python >= 3.11, a JDK >= 17 and Maven; nothing else.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up test lint fmt stack-start stack-stop bench-ledger clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

up: $(STAMP)
	$(BIN)/harbour up

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

stack-start: $(STAMP)
	$(BIN)/harbour stack start

stack-stop: $(STAMP)
	$(BIN)/harbour stack stop

bench-ledger: $(STAMP)
	$(BIN)/harbour bench ledger

clean:
	rm -rf .harbour/test .pytest_cache .mypy_cache .ruff_cache

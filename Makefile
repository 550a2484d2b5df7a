# Two commands: `make demo` and `make test`. Both set up everything they need.
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PY := .venv/bin/python

.PHONY: setup demo test lint clean

setup:
	@if ! [ -x "$(UV)" ]; then \
	  echo "uv not found: installing it"; \
	  python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh; \
	fi
	@$(UV) sync --frozen --extra dev

demo: setup
	$(PY) -m caitlab.models

lint: setup
	.venv/bin/ruff check .

test: setup lint
	$(PY) -m pytest

clean:
	rm -rf .venv .pytest_cache .ruff_cache

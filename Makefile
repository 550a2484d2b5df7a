# Two commands: `make demo` and `make test`. Both set up everything they need.
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PY := .venv/bin/python

.PHONY: setup demo test lint clean

setup:
	@if ! [ -x "$(UV)" ]; then \
	  echo "uv not found: installing it"; \
	  python3 -m pip install --user --quiet uv || \
	    python3 -m pip install --user --quiet --break-system-packages uv; \
	fi
	@# bytecode compiled once at install: imports take half the time where
	@# PYTHONDONTWRITEBYTECODE is set
	@$(UV) sync --frozen --extra dev --compile-bytecode

# The embedded default: ViT vs CaiT, with and without LayerScale, on digits, on CPU.
demo: setup
	.venv/bin/caitlab-train experiment=demo
	.venv/bin/caitlab-report outputs/demo

lint: setup
	.venv/bin/ruff check .

test: setup lint
	$(PY) -m pytest

clean:
	rm -rf .venv .pytest_cache .ruff_cache

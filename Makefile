# Two commands: `make demo` and `make test`. Both set up everything they need.
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PY := .venv/bin/python

.PHONY: setup demo test lint docs slurm browser clean

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

# ruff, the import layers of pyproject.toml's [tool.importlinter] contracts, and the types
# (mypy over src/, as [tool.mypy] says)
lint: setup
	.venv/bin/ruff check .
	.venv/bin/lint-imports --no-cache
	.venv/bin/mypy

# The documentation site (docs/ and mkdocs.yml) into site/: open site/index.html. --strict:
# a broken link, a missing page or a generated reference that fails to build stops it.
docs: setup
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet
	@echo "docs: site/index.html"

# The local SLURM cluster (slurm-wlm + munge + accounting) for the tests marked `slurm`.
# It needs root; without it those tests are skipped and say why.
slurm:
	@if [ "$$(id -u)" = 0 ]; then scripts/slurm/start.sh; \
	else echo "not root: local SLURM cluster not started, slurm tests will be skipped"; fi

# Debian's Chromium, in which the tests open report.html. It needs root; without it that
# test is skipped and says why.
browser:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for the report page's browser test"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null || \
	    { apt-get update -q >/dev/null && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; \
	else echo "no chromium and not root: the report page's browser test will be skipped"; fi

# Two workers (tests/conftest.py groups the tests that take both cores on one of them)
test: setup lint docs slurm browser
	$(PY) -m pytest -n 2 --dist loadgroup

clean:
	rm -rf .venv .pytest_cache .ruff_cache .mypy_cache site

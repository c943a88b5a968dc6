#!/usr/bin/env bash
# Install, lint (ruff), type-check theory/ (mypy), run the test suite (pytest; slow tests excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy theory
.venv/bin/python -m pytest -q "$@"

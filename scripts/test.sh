#!/usr/bin/env bash
# The README's test command: install the project with its dev extras, lint, run every test
# (slow end-to-end ones included). Pass pytest arguments through, e.g. `-m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[dev]'
python3 -m ruff check .
python3 -m pytest -q "$@"

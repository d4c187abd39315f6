#!/usr/bin/env bash
# The course command: execute every notebook on the embedded default model and build the book to _build/html.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
jupyter-book build . --builder html -W --keep-going "$@"  # warnings are errors: the build is clean
echo "Open $ROOT/_build/html/index.html"

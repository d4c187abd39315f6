#!/usr/bin/env bash
# The test command: unit + integration tests, then every notebook under nbval (outputs not compared).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
python -m pytest -q -p no:cacheprovider tests "$@"
python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-cell-timeout=900 notebooks

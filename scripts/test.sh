#!/usr/bin/env bash
# The test command: unit + integration tests, then every notebook under nbval (outputs not compared).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
python -m pytest -q -p no:cacheprovider tests "$@"
# The notebooks run as on a student's fresh clone: no data directory and no downloads (KEDIT_OFFLINE=1), so a
# chapter whose default path needs CounterFact or the network fails here.
no_data="$(mktemp -d)"
trap 'rm -rf "$no_data"' EXIT
KEDIT_DATA_DIR="$no_data" KEDIT_OFFLINE=1 HF_HUB_OFFLINE=1 \
  python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-cell-timeout=900 notebooks

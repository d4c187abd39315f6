#!/usr/bin/env bash
# The course command: execute every notebook on the embedded default model and build the book to _build/html.
# Needs no data directory and no network beyond the first install: the default path runs on shipped data.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
mkdir -p _build
start=$SECONDS
# warnings are errors: the build is clean. The log keeps Jupyter Book's per-notebook execution times.
status=0
jupyter-book build . --builder html -W --keep-going "$@" 2>&1 | tee _build/course-build.log || status=$?
echo "Notebook execution times (also on the book's 'Execution statistics' page):"
sed -n 's/^\(.*notebooks\/[^ :]*\).*Executed notebook in \([0-9.]*\) seconds.*/\1 \2/p' _build/course-build.log \
  | awk '{n = split($1, p, "/"); printf "  %-40s %7.1f s\n", p[n], $2; total += $2}
         END {printf "  %-40s %7.1f s\n", "all notebooks", total}'
echo "Build took $((SECONDS - start)) s."
[ "$status" -eq 0 ] || exit "$status"
echo "Open $ROOT/_build/html/index.html"

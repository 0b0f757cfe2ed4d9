#!/usr/bin/env bash
# Serving extras for merlin_molar.serving: scripts/install_serving.sh [VENV_DIR]   (after scripts/install.sh)
# 1. requirements/serving.txt into the project's virtualenv (--no-deps: nvidia-pytriton pins numpy<2 and
#    tritonclient protobuf<7; only the bundled tritonserver binary and the clients are used).
# 2. VENV_DIR/triton-stub: a small environment for the Triton Python-backend stub processes, with numpy 1.26
#    (requirements/serving-stub.txt) in front of the virtualenv's site-packages. See merlin_molar/serving/server.py.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=$(cd "${1:-$here/.venv}" && pwd)
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --no-deps -r "$here/requirements/serving.txt"

base=$("$venv/bin/python" -c 'import sys; print(sys._base_executable)')
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
stub="$venv/triton-stub"
if [ ! -x "$stub/bin/python3" ]; then
  "$base" -m venv --without-pip "$stub"
fi
pip --python "$stub/bin/python" install -q --no-deps -r "$here/requirements/serving-stub.txt"
stub_site=$("$stub/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# addsitedir (not a plain path line) so the virtualenv's own .pth files (the editable merlin_molar) apply too
echo "import site; site.addsitedir('$site')" > "$stub_site/zz_molar_project_venv.pth"
"$stub/bin/python" -c "import numpy, merlin_molar, merlin.systems.dag
assert numpy.__version__.startswith('1.'), numpy.__version__
print('triton stub environment ready:', '$stub')"

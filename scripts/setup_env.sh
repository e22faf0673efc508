#!/usr/bin/env bash
# Create or reuse .venv with the pinned stack (constraints.txt). Idempotent: a stamp keyed on
# pyproject.toml + constraints.txt skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
WHEELS=${MMCV_WHEELS:-../shared/wheels}
stamp="$VENV/.setup-stamp"
want=$(cat pyproject.toml constraints.txt scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup: $VENV is up to date"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip 'setuptools>=77,<82' wheel ninja
pip install -q -c constraints.txt torch torchvision
if ! "$VENV/bin/python" -c "import mmcv, mmcv.ops" 2>/dev/null; then
    if [ -d "$WHEELS" ] && ls "$WHEELS"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
        echo "setup: mmcv from $WHEELS"
        pip install -q -c constraints.txt --no-index --no-deps --find-links "$WHEELS" mmcv==2.1.0
    else
        echo "setup: building mmcv 2.1.0 from source against the pinned torch (~25 min on 2 cores)"
        MMCV_WITH_OPS=1 pip install -q -c constraints.txt --no-build-isolation mmcv==2.1.0
    fi
fi
pip install -q -c constraints.txt -e '.[transfer,dev]'
"$VENV/bin/python" - <<'PY'
import torch, torchvision, faiss, mmcv, mmdet, mmseg, mmengine, tensorboard  # noqa: F401
print(f"setup: torch {torch.__version__}, torchvision {torchvision.__version__}, mmcv {mmcv.__version__}, "
      f"mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, faiss {faiss.__version__}, "
      f"tensorboard {tensorboard.__version__}")
PY
echo "$want" > "$stamp"

#!/usr/bin/env bash
# A MONAI Label 0.8.5 environment beside this project (docs/operating.md, "MONAI Label").
#   ci/monailabel_env/install.sh VENV [TORCH_PINS]
# VENV: the virtual environment to make (must not exist). TORCH_PINS: a torch + torchvision pair that
# import together on this machine (default "torch==2.14.1 torchvision==0.29.1": on x86_64 pip takes the
# pair from this workplace's disk; it is a CUDA build and runs on the CPU). The README's torch 2.13.0
# CPU build has no torchvision on the package index that imports beside it, and MONAI Label imports
# torchvision, so this environment is separate from the README's.
set -euo pipefail
VENV=${1:?usage: ci/monailabel_env/install.sh VENV [TORCH_PINS]}
TORCH_PINS=${2:-"torch==2.14.1 torchvision==0.29.1"}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
if [ -e "$VENV" ]; then echo "install.sh: $VENV exists; give a new folder" >&2; exit 1; fi
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
# shellcheck disable=SC2086
"$PIP" install -q $TORCH_PINS
"$PIP" install -q -e "$ROOT[test]"
# MONAI Label's own requirement list cannot be resolved beside numpy 2 / pydicom 3 (numpymaxflow, pydicom-seg):
# the package and pydicom-seg without their pins, then what the server needs
"$PIP" install -q --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
"$PIP" install -q -r "$HERE/requirements.txt"
# pydicom-seg imports pydicom._storage_sopclass_uids, which pydicom 3 removed: an import alias (see the module)
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp "$HERE/npc_gtv_monailabel_compat.py" "$SITE/"
echo "import npc_gtv_monailabel_compat; npc_gtv_monailabel_compat.install()" > "$SITE/npc_gtv_monailabel_compat.pth"
"$VENV/bin/python" -c "import torchvision, monailabel.endpoints.infer, npc_gtv; print('MONAI Label', monailabel.__version__, 'with torch', __import__('torch').__version__, 'torchvision', torchvision.__version__)"

#!/usr/bin/env bash
# LLM engine throughput on one GPU node with no network, where PyTorch, transformers and accelerate are
# installed but bitsandbytes is not: put the bitsandbytes wheel beside this script (never commit it).
#   bash scripts/gpu_check.sh [--shape 13b]      (prints score_prompts_per_s= and generate_s_per_prompt=)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PY=${PYTHON:-python3}
if ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
  wheels=("$here"/bitsandbytes-*.whl)
  [ -e "${wheels[0]}" ] || { echo "gpu_check: bitsandbytes missing and no bitsandbytes-*.whl beside $0" >&2; exit 2; }
  "$PY" -m pip install --no-index --no-deps --target "${TMPDIR:-/tmp}/memefx-bnb" "${wheels[0]}"
  export PYTHONPATH="${TMPDIR:-/tmp}/memefx-bnb${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" "$here/gpu_check.py" "$@"

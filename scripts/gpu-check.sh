#!/usr/bin/env bash
# The device check of issue 25: flora on a CUDA GPU against the CPU, offline, in one call of at
# most 8 minutes.
#
#   python scripts/gpu_carry.py build        # here, once: .gpu-carry/ (wheels + data, git-ignored)
#   scripts/gpu-check.sh                     # there: with .gpu-carry/ carried beside the tree
#   scripts/gpu-check.sh --cpu-only          # anywhere: the self-test of the same path
#
# It never installs torch or anything the machine has: it installs each carried wheel on its own
# from no index into .gpu-check/site (one that fails is named, the rest still install), sets the
# hub and datasets offline, points FLORA_DATA_DIR at the carried data, and runs
# scripts/gpu_check.py, whose every part writes its result (or its error) to $OUT/gpu-check/
# (here: ./gpu-check/) as soon as it ends. Time left is checked: the run stops at 7.5 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=${CARRY:-$PWD/.gpu-carry}
SITE=$PWD/.gpu-check/site
RESULTS="${OUT:-.}/gpu-check"
started=$(date +%s)

cpu_only=0
for arg in "$@"; do [ "$arg" = "--cpu-only" ] && cpu_only=1; done
if [ $cpu_only = 0 ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: $PY's torch sees no CUDA GPU ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1)); nothing to check (--cpu-only self-tests the script)"
    exit 2
fi
"$PY" -c 'import torch; print("gpu-check: torch", torch.__version__, "on", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "the CPU (self-test)")'

if [ -d "$CARRY/wheels" ]; then
    "$PY" scripts/gpu_carry.py install --carry "$CARRY" --target "$SITE"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu-check: no carry folder at $CARRY (python scripts/gpu_carry.py build); using what $PY has"
fi
if [ -d "$CARRY/data" ]; then export FLORA_DATA_DIR="$CARRY/data"; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PYTHONUNBUFFERED=1 FLORA_CACHE="${FLORA_CACHE:-$PWD/.gpu-check/cache}"
export MPLBACKEND=Agg
mkdir -p "$RESULTS"
timeout $((450 - ($(date +%s) - started))) "$PY" scripts/gpu_check.py --out "$RESULTS" "$@"
status=$?
[ $status = 124 ] && echo "gpu-check: stopped at the time limit; the parts that ended are in $RESULTS"
exit $status

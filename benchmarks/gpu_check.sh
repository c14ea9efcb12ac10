#!/usr/bin/env bash
# The GPU check: a single CUDA GPU runs it end to end from a fresh checkout in at most 8 minutes.
#   benchmarks/gpu_check.sh [--out FILE]        writes benchmarks/results/gpu_check.json by default
# It creates .venv-gpu on top of the machine's torch (kept, not replaced), installs sdebatch, prepares the tiny data
# folder if missing, then runs `python -m benchmarks.gpu_check` (CUDA tests, overhead benchmarks, MFU of the 320m
# trainer with bf16 + compile, a 1-device FSDP smoke run). Environment: GPU_CHECK_PYTHON=<python> skips the venv
# (use an installed sdebatch); GPU_CHECK_CPU=1 runs the same steps at smoke sizes on the CPU; GPU_CHECK_DATA=<dir>.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${GPU_CHECK_DATA:-data/tiny}
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  PY=$GPU_CHECK_PYTHON
else
  python3 -m venv --system-site-packages .venv-gpu
  PY=.venv-gpu/bin/python
  "$PY" -c "import torch" || { echo "gpu_check: no torch on this machine's python" >&2; exit 2; }
  "$PY" -m pip install -q -e ".[all,dev]"
fi
if [ ! -f "$DATA/index.json" ]; then
  "$PY" -m sdebatch.cli data prepare --preset tiny --out "$DATA"
fi
CPU_FLAG=()
if [ "${GPU_CHECK_CPU:-0}" = "1" ]; then CPU_FLAG=(--cpu); fi
exec "$PY" -m benchmarks.gpu_check --data "$DATA" "${CPU_FLAG[@]}" "$@"

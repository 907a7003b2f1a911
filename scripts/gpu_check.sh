#!/usr/bin/env bash
# GPU check, never part of CI or the tests: on a CUDA machine, the cached paths equal the
# full-forward references (suffix-runner logits, greedy generations, a whole planted job's
# scores) in float32 and bfloat16 on a GPT-2-shaped model (tests/evals/ravel/test_accelerator.py),
# then scripts/bench_ravel.py on the GPU. Everything it prints goes to the output folder too,
# with the card's name, for docs/speed.md.
# Usage: bash scripts/gpu_check.sh [output folder (default gpu_check_out)]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check.sh: no CUDA device (torch.cuda.is_available() is false); run it on a machine with an NVIDIA GPU" >&2
  exit 2
fi
out=${1:-gpu_check_out}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)' | tee "$out/device.txt"
SAERAVEL_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/evals/ravel/test_accelerator.py 2>&1 | tee "$out/equality.txt"
"$PY" scripts/bench_ravel.py --device cuda --rounds 5 --steps 5 2>"$out/bench_steps.log" | tee "$out/bench_steps.md"
"$PY" scripts/bench_ravel.py --device cuda --rounds 5 --steps 5 --method das --layers 5 2>"$out/bench_das.log" | tee "$out/bench_das.md"
"$PY" scripts/bench_ravel.py --device cuda --no-steps --job --layers 5 --job-rounds 2 2>"$out/bench_job.log" | tee "$out/bench_job.md"
echo "gpu_check.sh: all checks passed; tables in $out/"

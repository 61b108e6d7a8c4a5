#!/usr/bin/env bash
# The one script run on a lent GPU machine (H100/H200): `bash bench/gpu_check.sh`.
#
# Writes everything under $OUT (default bench/results/gpu-check) and keeps going when a step
# fails, so one broken step does not hide the others' results. Each step has its own time
# limit; together they stay under 8 minutes. Steps are numbered and clearly separated: append a
# new step at the end with its own `step` call and budget, and keep the total under 8 minutes.
#
#   1. environment      (~10 s)  nvidia-smi, python/torch/torchvision versions
#   2. gpu tests        (<=150 s) pytest -m gpu over tests/ (DALI tests skip: DALI is not installed there),
#                                 and the kernel tests, whose Triton cases compile for the GPU there
#   3. loader bench     (<=140 s) bench/loader.py --device cuda: torchvision-gpu and torch rows
#   4. kernel bench     (<=150 s) bench/kernels.py --device cuda --quick: Gumbel sigmoid alone and inside
#                                 a compiled head+BCE+D-input step (eager, compiled inlined, custom op,
#                                 Triton) and the D step (eager double backward, first order eager and
#                                 compiled, with and without Triton); then the dispatch table these
#                                 numbers give, as $OUT/dispatch.json, printing what it would change
#                                 against the committed fastmlgan/kernels/dispatch.json
#
# Exit status: the number of failed steps (0 = all passed).

set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FAILED=0
START=$(date +%s)

# step NAME SECONDS COMMAND...: run COMMAND with a time limit, log to $OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== step $name (limit ${limit}s) ==="
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== step $name: exit $rc after $(( $(date +%s) - t0 ))s ==="
  [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
}

# 1. environment
step env 30 bash -c "nvidia-smi; $PY -c 'import sys, torch, torchvision; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"-\"); print(\"torchvision\", torchvision.__version__)'; $PY -c 'import nvidia.dali as d; print(\"dali\", d.__version__)' || echo 'dali: not installed'"

# 2. GPU-marked tests (data, and whatever other modules mark gpu)
step gpu-tests 150 "$PY" -m pytest -q -m "gpu or not slow" -p no:cacheprovider --junitxml "$OUT/gpu-tests.xml" \
  tests/test_gumbel_sigmoid.py tests/test_gradient_penalty.py tests/test_backends.py tests/test_torchvision_gpu.py tests/test_dali.py

# 3. loader benchmark on the GPU: torchvision-gpu (nvJPEG) against the torch CPU loader, same files
step loader-bench 140 "$PY" bench/loader.py --device cuda --backend torchvision-gpu,torch --threads 8 \
  --batch-size 64 --repeats 5 --data.root /tmp/fastmlgan-bench-embedded --out "$OUT/loader-gpu.json"

# 4. kernel benchmark: medians after warm-up, every D variant checked against the eager textbook loss
#    and gradients. --quick (256x80, B=64, as in issue 9) keeps its ~10 compilations in budget. To adopt
#    the table: copy kernels-gpu.json into bench/results/ and run bench/kernels.py --write-dispatch on it.
step kernel-bench 150 bash -c "'$PY' bench/kernels.py --device cuda --quick --out '$OUT/kernels-gpu.json' \
  && '$PY' bench/kernels.py --write-dispatch '$OUT/kernels-gpu.json' --dispatch-out '$OUT/dispatch.json'"

echo "gpu_check: $FAILED step(s) failed, $(( $(date +%s) - START ))s in all; results in $OUT"
exit "$FAILED"

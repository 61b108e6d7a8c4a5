#!/usr/bin/env bash
# The one script run on a lent GPU machine (H100/H200): `bash bench/gpu_check.sh`.
#
# Writes everything under $OUT (default bench/results/gpu-check) and keeps going when a step
# fails, so one broken step does not hide the others' results. Each step has its own time limit;
# together they stay under 8 minutes (480 s). Steps run in order of value: if the machine is slower
# than planned, what is cut is the end. Each step's log says how long it took: re-budget from it.
#
#   0. dali             (<=40 s)  when .dali/p*/part exist (carried by the device tool, see
#                                 bench/dali_transport.py): join, check, unpack into .dali/site,
#                                 put it on PYTHONPATH. Without them: a loud line, DALI rows skip.
#   1. environment      (<=20 s)  nvidia-smi, versions (torch, torchvision, triton, DALI)
#   2. gpu tests        (<=110 s) the Trainer with bf16 + channels_last + Triton + compile (and CUDA
#                                 graphs, and the feature cache), kernels on the GPU, GPU loaders,
#                                 cache, DALI (when installed), checkpoint finiteness on the GPU
#   3. train bench b256 (<=110 s) bench/train.py, ResNet-101 at 224, bf16, channels_last, batch 256,
#                                 synthetic on-device batches: eager and compiled, phase 1 and
#                                 phase 2 (with and without the frozen-feature cache)
#   4. loader bench     (<=60 s)  bench/loader.py --device cuda: torch, torchvision-gpu, cache
#                                 (host and GPU), DALI full and roi decoding when installed
#   5. train bench b32  (<=50 s)  the same at batch 32 with CUDA graphs (reduce-overhead), profiled
#                                 (host vs device time per step, kernel launches, top operators)
#   6. kernel bench     (<=90 s)  bench/kernels.py --device cuda --quick: Gumbel sigmoid alone and inside
#                                 a compiled head+BCE+D-input step (eager, compiled inlined, custom op,
#                                 Triton) and the D step (eager double backward, first order eager and
#                                 compiled, with and without Triton); then the dispatch table these
#                                 numbers give, as $OUT/dispatch.json, printing what it would change
#                                 against the committed fastmlgan/kernels/dispatch.json
#
# Exit status: the number of failed steps (0 = all passed). Afterwards: copy the JSON files into
# bench/results/ with the device in their names and update the README's performance table.

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

# 0. DALI from the carried parts (the GPU machine has no package index)
if [ -f .dali/p0/manifest.json ]; then
  step dali 40 "$PY" bench/dali_transport.py install --src .dali
  if [ -d .dali/site/nvidia/dali ]; then
    export PYTHONPATH="$PWD/.dali/site:$PYTHONPATH"
  fi
fi
if ! "$PY" -c "import nvidia.dali" >"$OUT/dali-import.log" 2>&1; then
  echo "!!! DALI IS NOT INSTALLED on this machine: every DALI test and benchmark row below is skipped."
  echo "!!! Carry it with bench/dali_transport.py (pack here, four transfers, then this script)."
fi

# 1. environment
step env 20 bash -c "nvidia-smi; '$PY' -c 'import sys, torch, torchvision; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"-\"); print(\"torchvision\", torchvision.__version__)'; '$PY' -c 'import triton; print(\"triton\", triton.__version__)'; '$PY' -c 'import nvidia.dali as d; print(\"dali\", d.__version__)' || echo 'dali: not installed'"

# 2. GPU tests (the CPU suite is CI's job; here: what needs the GPU, and the kernels compiled for it)
step gpu-tests 110 "$PY" -m pytest -q -m "gpu or not slow" -p no:cacheprovider --junitxml "$OUT/gpu-tests.xml" \
  tests/test_trainer_gpu.py tests/test_gumbel_sigmoid.py tests/test_gradient_penalty.py tests/test_kernel_dispatch.py \
  tests/test_backends.py tests/test_torchvision_gpu.py tests/test_cache.py tests/test_dali.py tests/test_checkpoint.py

# 3. Trainer throughput at batch 256 (the issue's reference batch): eager vs compiled, both phases
step train-b256 110 "$PY" bench/train.py --device cuda --backbone resnet101 --image-size 224 --batch 256 \
  --mode eager compile --phase bce gan --feature-cache off on --steps 8 --warmup 3 --repeats 3 \
  --make-weights /tmp/fastmlgan-resnet101-random.pth --out "$OUT/train-b256.json"

# 4. Loaders on the GPU, on real COCO JPEGs (coco128 listed 8 times) when the shared data is beside
#    the checkout, else the embedded set
step loader-bench 60 "$PY" bench/loader.py --device cuda --dataset auto \
  --backend torch,torchvision-gpu,cache,cache-gpu,dali,dali-roi --threads 8 --batch-size 128 --repeats 3 \
  --data.root /tmp/fastmlgan-bench-embedded --cache-dir /tmp/fastmlgan-bench-cache --out "$OUT/loader-gpu.json"

# 5. Small batches: CUDA graphs at batch 32, profiled (why compiled can lose to eager at small batches)
step train-b32 50 "$PY" bench/train.py --device cuda --backbone resnet101 --image-size 224 --batch 32 \
  --mode cudagraphs --phase bce gan --feature-cache on --steps 20 --warmup 5 --repeats 3 --profile 3 \
  --make-weights /tmp/fastmlgan-resnet101-random.pth --out "$OUT/train-b32.json"

# 6. kernel benchmark: medians after warm-up, every D variant checked against the eager textbook loss
#    and gradients. --quick (256x80, B=64, as in issue 9) keeps its ~10 compilations in budget. To adopt
#    the table: copy kernels-gpu.json into bench/results/ and run bench/kernels.py --write-dispatch on it.
step kernel-bench 90 bash -c "'$PY' bench/kernels.py --device cuda --quick --out '$OUT/kernels-gpu.json' \
  && '$PY' bench/kernels.py --write-dispatch '$OUT/kernels-gpu.json' --dispatch-out '$OUT/dispatch.json'"

echo "gpu_check: $FAILED step(s) failed, $(( $(date +%s) - START ))s in all; results in $OUT"
exit "$FAILED"

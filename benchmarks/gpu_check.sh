#!/usr/bin/env bash
# The GPU check: run on an H100/H200 machine (no network, its own python3 with torch/triton/pytest).
#   bash benchmarks/gpu_check.sh          # results under benchmarks/results/gpu-<card>/
#   SUBGRAD_DATA=path/to/cifar10-jpeg.tar.gz GPU_CHECK_BUDGET=480 bash benchmarks/gpu_check.sh
# Stages, most valuable first, each under its own timeout and all under one deadline (GPU_CHECK_BUDGET
# seconds, default 480), so a slow stage costs the later ones, never the device lease:
#   1. install subgrad without downloading anything
#   2. the CUDA-graph training step against eager steps, bit for bit (tests/test_capture.py, every optimizer);
#      optimizer steps eager and as CUDA graphs (optim.py), subgrad train vs torch loops (train.py --loops)
#   3. kernel benchmarks against their baselines, and the target check
#   4. the compiled-code cost model for sm_90 with every variant replayed on the GPU: predicted beside
#      measured fraction of copy bandwidth (calibrates the model)
#   5. the test suite on CUDA (real Triton compilation, kernels vs twins on the device), in parallel
#   6. the self-check, 7. the launch-shape sweep (launch_sweep.py), 8. lenet training at the defaults
#      (when the data is there), 9. ONNX export of that run, validation and `subgrad bench`,
#      10. data-parallel steps/s over all GPUs (skipped with a message on one GPU).
# With $OUT set (the device tool), everything is also packed into $OUT/gpu-check.tar.gz after every
# stage, so a run stopped at its limit still returns what it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-480}))
CARD="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-')"
RESULTS="${GPU_CHECK_RESULTS:-benchmarks/results/gpu-${CARD:-unknown}}"
mkdir -p "$RESULTS"
DATA="${SUBGRAD_DATA:-../shared/data/cifar10-jpeg.tar.gz}"
[ -f "$DATA" ] && DATA="$(realpath "$DATA")"  # tests and training run from other folders
export SUBGRAD_DATA="$DATA" PYTHONUNBUFFERED=1
status=0

pack() {  # everything so far into $OUT (the device tool returns at most 8 files)
  [ -n "${OUT:-}" ] && tar -czf "$OUT/gpu-check.tar.gz" --exclude='*.pt' -C "$(dirname "$RESULTS")" \
    "$(basename "$RESULTS")" 2>/dev/null
  return 0
}
# stage NAME WANT_SECONDS CMD...: run CMD under min(WANT, time left); log to $RESULTS/NAME.txt
stage() {
  local name="$1" want="$2"; shift 2
  local left=$((DEADLINE - SECONDS))
  [ "$want" -lt "$left" ] || want="$left"
  if [ "$want" -lt 15 ]; then
    echo "== $name: skipped, ${left}s left of the budget" | tee "$RESULTS/$name.txt"; pack; return 0
  fi
  echo "== $name (timeout ${want}s)"
  local t0=$SECONDS
  timeout "$want" "$@" > "$RESULTS/$name.txt" 2>&1
  local rc=$?
  tail -25 "$RESULTS/$name.txt"
  echo "-- $name: exit $rc after $((SECONDS - t0))s" | tee -a "$RESULTS/$name.txt"
  [ "$rc" -eq 0 ] || status=1
  pack
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } | tee "$RESULTS/gpu.txt"  # (no git HEAD: the device copy's .git can be stale)

# setuptools is there, build backends from the network are not: no build isolation, no dependencies.
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . > "$RESULTS/install.txt" 2>&1; then
  echo "editable install failed (see install.txt); falling back to a PYTHONPATH staging tree" | tee -a "$RESULTS/install.txt"
  stage_dir="$(mktemp -d)/site"; mkdir -p "$stage_dir/subgrad"
  for f in subgrad/*; do ln -s "$PWD/$f" "$stage_dir/subgrad/"; done
  ln -s "$PWD/kernels" "$stage_dir/subgrad/kernels"; ln -s "$PWD/export" "$stage_dir/subgrad/export"
  export PYTHONPATH="$stage_dir"
fi

# First what the CUDA-graph work promises: optimizer steps eager and graphed against torch.optim fused,
# then subgrad train against plain and compiled torch loops (LeNet and ResNet-20 sgd defaults).
stage cuda-graph-tests 120 "$PY" -m pytest -v -p no:cacheprovider tests/test_capture.py -k cuda_graph_steps
stage optim-cuda 120 "$PY" benchmarks/optim.py --device cuda --out "$RESULTS"
if [ -f "$DATA" ]; then
  stage train-loops-cuda 240 "$PY" benchmarks/train.py --data "$DATA" --device cuda --loops --skip-throughput \
    --skip-defaults --out "$RESULTS"
fi

stage kernels-cuda 120 "$PY" benchmarks/kernels.py --device cuda --out "$RESULTS"
"$PY" benchmarks/check_targets.py "$RESULTS"/kernels-cuda-*.json > "$RESULTS/targets-cuda.txt" 2>&1
cat "$RESULTS/targets-cuda.txt"

stage compiled-cost-cuda 240 env -u TRITON_INTERPRET "$PY" benchmarks/compiled_cost.py --arch sm_90 \
  --json "$RESULTS/compiled-cost-measured.json" --measure --measured "$RESULTS"/kernels-cuda-*.json

# In parallel where pytest-xdist is installed (the GPU image has it); tests are independent of each other
# (torchrun --standalone picks free ports, every test has its own tmp_path).  -v prints each result as it
# lands, so a stage stopped at its limit still names its failures; 2 CPU threads per worker, because 8
# workers x all cores oversubscribed the host in the first H200 run.
PARALLEL=(); "$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n 8)
stage pytest-cuda 200 env OMP_NUM_THREADS=2 "$PY" -m pytest -v -p no:cacheprovider "${PARALLEL[@]}" \
  --junitxml="$RESULTS/pytest-cuda.xml"
grep -E "FAILED|ERROR" "$RESULTS/pytest-cuda.txt" | head -40

stage selfcheck-cuda 45 "$PY" -m subgrad selfcheck --device cuda --n 10000019

stage launch-sweep-cuda 100 "$PY" benchmarks/launch_sweep.py --json "$RESULTS/launch-sweep-cuda.json"

if [ -f "$DATA" ]; then
  for opt in sgd zo-sgd; do
    stage "train-lenet-$opt-cuda" 90 "$PY" -m subgrad train --model lenet --optimizer "$opt" --device cuda \
      --data "$DATA" --out "$RESULTS/runs/lenet-$opt" --quiet
  done
else
  echo "training skipped: no CIFAR-10 archive at $DATA (set SUBGRAD_DATA)" | tee "$RESULTS/train-cuda.txt"
fi

"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" \
  > "$RESULTS/onnxruntime.txt" 2>&1  # onnxruntime-gpu may be absent: then this file says so
RUN="$RESULTS/runs/lenet-sgd"
if [ -f "$RUN/model.pt" ]; then
  stage export-cuda 40 "$PY" -m subgrad export "$RUN" --out "$RUN/model.onnx"
  stage validate-cuda 60 "$PY" -m subgrad validate "$RUN/model.onnx" --run "$RUN" --data "$DATA"
  stage bench-onnx-cuda 60 "$PY" -m subgrad bench "$RUN/model.onnx" --run "$RUN" --json "$RESULTS/bench-onnx-cuda.json"
else
  echo "export skipped: no trained lenet run (needs the training stage above)" | tee "$RESULTS/export-cuda.txt"
fi

NGPU="$("$PY" -c "import torch; print(torch.cuda.device_count())")"
if [ "$NGPU" -gt 1 ]; then
  stage distributed-cuda 120 "$PY" benchmarks/distributed.py --device cuda --nproc "$NGPU" --out "$RESULTS"
else
  echo "multi-GPU skipped: $NGPU GPU visible; the data-parallel section needs at least 2" \
    | tee "$RESULTS/distributed-cuda.txt"
fi

echo "gpu_check finished with status $status after ${SECONDS}s" | tee -a "$RESULTS/gpu.txt"
pack
exit $status

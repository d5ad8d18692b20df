#!/usr/bin/env bash
# The GPU check: run on an H100/H200 machine (no network, its own python3 with torch/triton/pytest).
#   bash benchmarks/gpu_check.sh          # results under $OUT when set, else benchmarks/results/
# 1. install subgrad without downloading anything, 2. the test suite on CUDA (real Triton compilation,
# kernels vs twins on the device), 3. the self-check, 4. the kernel benchmarks and the target check,
# 5. the compiled-code cost model beside the measured kernel speeds, the optimizer-step benchmark,
# 6. lenet training at the defaults (when the data is there),
# 7. ONNX export of that run, validation and `subgrad bench` with every onnxruntime provider present,
# 8. data-parallel steps/s and bytes per step over all GPUs (skipped with a message on one GPU).
# Budget: under 8 minutes; each stage has its own timeout so a hang cannot eat the device time.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RESULTS/gpu.txt"

# setuptools is there, hatchling and the network are not: no build isolation, no dependencies.
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . > "$RESULTS/install.log" 2>&1; then
  echo "editable install failed (see install.log); falling back to a PYTHONPATH staging tree" | tee -a "$RESULTS/install.log"
  stage="$(mktemp -d)/site"; mkdir -p "$stage/subgrad"
  for f in subgrad/*.py; do ln -s "$PWD/$f" "$stage/subgrad/"; done
  ln -s "$PWD/kernels" "$stage/subgrad/kernels"; ln -s "$PWD/export" "$stage/subgrad/export"
  export PYTHONPATH="$stage"
fi

echo "== tests on CUDA"
timeout 330 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$RESULTS/pytest-cuda.xml" 2>&1 | tail -40 | tee "$RESULTS/pytest-cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== self-check"
timeout 60 "$PY" -m subgrad selfcheck --device cuda --n 10000019 2>&1 | tee "$RESULTS/selfcheck-cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== kernel benchmarks"
timeout 150 "$PY" benchmarks/kernels.py --device cuda --out "$RESULTS" 2>&1 | tee "$RESULTS/kernels-cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
"$PY" benchmarks/check_targets.py "$RESULTS"/kernels-cuda-*.json 2>&1 | tee "$RESULTS/targets-cuda.txt"

echo "== compiled-code cost model: predicted vs measured fraction of copy bandwidth (calibrates the model)"
timeout 240 env -u TRITON_INTERPRET "$PY" benchmarks/compiled_cost.py --arch sm_80 sm_90 sm_100 \
  --json "$RESULTS/compiled-cost.json" --measured "$RESULTS"/kernels-cuda-*.json 2>&1 | tail -12 \
  | tee "$RESULTS/compiled-cost-cuda.txt"

echo "== optimizer steps (LeNet, ResNet-20; ZOSGD sequential vs batched, SGD/AdamW vs torch.optim, peak memory)"
timeout 120 "$PY" benchmarks/optim.py --device cuda --out "$RESULTS" 2>&1 | tee "$RESULTS/optim-cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== training figures (lenet defaults on CUDA)"
DATA="${SUBGRAD_DATA:-../shared/data/cifar10-jpeg.tar.gz}"
if [ -f "$DATA" ]; then
  for opt in sgd zo-sgd; do
    timeout 150 "$PY" -m subgrad train --model lenet --optimizer "$opt" --device cuda --data "$DATA" \
      --out "$RESULTS/runs/lenet-$opt" --quiet 2>&1 | tail -3 | tee "$RESULTS/train-lenet-$opt-cuda.txt"
  done
else
  echo "skipped: no CIFAR-10 archive at $DATA (set SUBGRAD_DATA)" | tee "$RESULTS/train-cuda.txt"
fi

echo "== export: ONNX of the CUDA-trained lenet, validation and onnxruntime providers (CPU, CUDA, TensorRT)"
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1 \
  | tee "$RESULTS/onnxruntime.txt"  # onnxruntime-gpu may be absent: then this file says so
RUN="$RESULTS/runs/lenet-sgd"
if [ -f "$RUN/model.pt" ]; then
  timeout 60 "$PY" -m subgrad export "$RUN" --out "$RUN/model.onnx" 2>&1 | tee "$RESULTS/export-cuda.txt"
  timeout 120 "$PY" -m subgrad validate "$RUN/model.onnx" --run "$RUN" --data "$DATA" 2>&1 | tee -a "$RESULTS/export-cuda.txt"
  timeout 180 "$PY" -m subgrad bench "$RUN/model.onnx" --run "$RUN" --json "$RESULTS/bench-onnx-cuda.json" 2>&1 \
    | tee -a "$RESULTS/export-cuda.txt"
else
  echo "skipped: no trained lenet run (needs the training stage above)" | tee "$RESULTS/export-cuda.txt"
fi

echo "== multi-GPU data parallel (NCCL): runs only when more than one GPU is visible"
NGPU="$("$PY" -c "import torch; print(torch.cuda.device_count())")"
if [ "$NGPU" -gt 1 ]; then
  timeout 240 "$PY" benchmarks/distributed.py --device cuda --nproc "$NGPU" --out "$RESULTS" 2>&1 \
    | tee "$RESULTS/distributed-cuda.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "skipped: $NGPU GPU visible; the multi-GPU section needs at least 2" | tee "$RESULTS/distributed-cuda.txt"
fi

echo "gpu_check finished with status $status"
exit $status

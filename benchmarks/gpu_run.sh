#!/usr/bin/env bash
# The device call of a GPU session (the device tool's run, 10 minutes at most): CUDA tests, ResNet-50 224
# dense vs Chase-width throughput, the width-alignment diagnostic, then the CIFAR-10 accuracy + throughput
# run with the time that is left. Every part writes its result files under $OUT as it goes, so a call cut
# short still returns them.
#
# Here, first:   ../shared/tools/pack-for-device.sh      (CIFAR-10 and the wheels into .gpu-carry/)
# Then:          run(carry=[".gpu-carry"], timeout_s=590, command="bash benchmarks/gpu_run.sh")
# Afterwards:    copy the returned gpu_*.json/md into benchmarks/results/.
#
# Environment:   TOTAL_S (570) the time this script may take in all; the CIFAR part gets what is left.
#                PARTS ("deploy cifar"; also "tests", "resnet50", "alignment", "multiple", "latency") which
#                parts run, in order. "deploy" is issue 26's device check: ResNet-50 widths (score,
#                uniform, latency-weighted, this GPU's roofline, a table profiled here) deployed under
#                eager and Inductor (max-autotune, CUDA graphs up to batch 32), bf16, batch 1/32/256.
#                DEPLOY_ARGS ("--budget-s 240") extra options of gpu_deploy.py (e.g. "--inductor-mode
#                default" when max-autotune's tuning does not fit, "--no-table").
#                CIFAR_ARGS extra options of gpu_cifar.py; by default the trained networks of issue 26:
#                dense / RigL / Chase at a latency budget of 0.5 by the device's roofline, timed under
#                eager and Inductor.
set -uo pipefail
TOTAL_S=${TOTAL_S:-570}
PARTS=${PARTS:-deploy cifar}
DEPLOY_ARGS=${DEPLOY_ARGS:---budget-s 240}
CIFAR_ARGS=${CIFAR_ARGS:---fit-epochs --methods dense,rigl,chase_lat0.5 --bench-backends eager,inductor --bench-batch-sizes 1,32,256}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT" /tmp/data
export PYTHONUNBUFFERED=1
tar xzf .gpu-carry/cifar10.tgz -C /tmp/data || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-carry/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi -L
python3 -c "import torch, torch_pruning, chase; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
has() { [[ " $PARTS " == *" $1 "* ]]; }

if has deploy; then
  echo "== ResNet-50 224: Chase widths deployed (eager / inductor), bf16 (issue 26)"
  python3 -c "import torch; print('TF32 matmul', torch.backends.cuda.matmul.allow_tf32, 'cudnn', torch.backends.cudnn.allow_tf32)"
  # shellcheck disable=SC2086
  timeout 300 python3 benchmarks/gpu_deploy.py --device cuda --out "$OUT" $DEPLOY_ARGS
fi
if has tests; then
  echo "== CUDA tests"
  timeout 120 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if has resnet50; then
  echo "== ResNet-50 224: dense vs Chase widths"
  timeout 150 python3 benchmarks/speedup.py --device cuda --models resnet50 --sparsities 0.3,0.4 \
      --batch-sizes 1,64,256 --dtypes fp32,bf16 --channels-last --repeats 30 --warmup 10 \
      --out "$OUT" --stem gpu_resnet50
fi
if has alignment; then
  echo "== ResNet-50 224: width alignment"
  timeout 150 python3 benchmarks/alignment.py --device cuda --dtypes fp32,bf16 --batch-sizes 64,256 \
      --repeats 25 --warmup 8 --out "$OUT" --stem gpu_alignment
fi
if has multiple; then
  echo "== ResNet-50 224: the same MACs budget with channel_multiple 1/8/16 (issue 14)"
  timeout 240 python3 benchmarks/channel_multiple.py --device cuda --dtypes bf16 --batch-sizes 64,256 \
      --models resnet50 --channels-last yes --repeats 20 --warmup 5 --out "$OUT" --stem gpu_channel_multiple
fi
if has latency; then
  echo "== ResNet-50 224: a bf16 latency table, then MACs 0.5 uniform vs latency_weighted (issue 14)"
  timeout 150 python3 -m chase.cli profile --model resnet50 --device cuda --dtype bf16 --batch 64 \
      --channels-last --prune-skip --repeats 5 --out "$OUT/gpu_resnet50_latency_table_bf16.json"
  timeout 200 python3 benchmarks/channel_multiple.py --device cuda --dtypes bf16 --batch-sizes 64,256 \
      --models resnet50 --channels-last yes --multiples 8 --ranks uniform,latency_weighted --macs-ratio 0.5 \
      --latency-table "$OUT/gpu_resnet50_latency_table_bf16.json" --repeats 20 --warmup 5 --out "$OUT" \
      --stem gpu_channel_latency_weighted
fi
if has cifar; then
  echo "== CIFAR-10: dense / RigL / Chase"
  left=$((TOTAL_S - SECONDS - 10))
  echo "budget for the CIFAR part: ${left} s"
  # shellcheck disable=SC2086
  python3 benchmarks/gpu_cifar.py --data-dir /tmp/data/cifar10 --out "$OUT" --budget-s "$left" $CIFAR_ARGS
fi
echo "== done in ${SECONDS} s"

#!/usr/bin/env bash
# Every GPU check of the project in one command, for anyone with a CUDA GPU:
#
#     bash bench/gpu_check.sh                      # the machine's python3
#     PYTHON=.venv/bin/python bash bench/gpu_check.sh
#
# It installs nothing and needs no network. The repo's src/ goes on PYTHONPATH instead of `pip install`, so a
# python with torch, torchvision, Pillow, numpy, tqdm, PyYAML, matplotlib and pytest is enough (dvc and dvclive
# are not needed). Logs go to $OUT when it is set, else to a temporary folder, one file per step:
#   env.txt     the GPU, driver, torch and Python versions
#   tests.txt   the CUDA tests (bf16 + channels_last inside a real step, eager and compiled training, the dense
#               guard on GPU memory) and the CPU tests of the same paths
#   bench.txt   bench/train.py at 150 px, batch 512: our loop eager and compiled, the seed-equivalent loop,
#               and the GPU's matmul peaks (compare with BENCHMARKS.md)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$(mktemp -d)}
python=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "bench/gpu_check.sh: $python sees no CUDA GPU here; run it on a machine with one." >&2
  exit 2
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$python" -c 'import sys, torch, torchvision; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| torchvision", torchvision.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name())'
} 2>&1 | tee "$out/env.txt" || status=1

timeout 200 "$python" -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_train.py \
  -k "cuda or gpu or bf16 or compiled" 2>&1 | tee "$out/tests.txt" || status=1

timeout 420 "$python" bench/train.py --device cuda --img-size 150 --batch-size 512 --images 14000 --epochs 5 \
  --compile --also-eager --seed-workers 8 --threads 8 2>&1 | tee "$out/bench.txt" || status=1

echo "logs in $out; exit status $status"
exit $status

#!/usr/bin/env bash
# The GPU measurements of one lent GPU, in one go (each step under its own time limit, so one slow step cannot
# eat the others): ResNet-50 training throughput per norm (bf16, channels_last, 8 emulated GPUs x 32 and x 2),
# the same with torch.compile, a CIFAR ResNet-20 epoch, each layer's forward+backward, and the GPU tests.
#   scripts/gpu_measure.sh OUTDIR        # everything lands in OUTDIR (log.txt, bench .md/.json)
# Run from the repository root with its dependencies importable (PYTHONPATH=. works without installing).
set -u
out=${1:?usage: scripts/gpu_measure.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
step() {  # step SECONDS NAME COMMAND...: run under a time limit, log its exit status, go on whatever it was
    local limit=$1 name=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@"
    echo "=== $name: exit $? $(date +%T)"
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
    step 150 "bench_train resnet50 bf16 channels_last" \
        python3 scripts/bench_train.py --device cuda --norms bn,gn,sn --per-gpu-batch 32,2 --out "$out/resnet50"
    step 45 "bench_train cifar_resnet20 (an epoch = 50,000 / img/s)" \
        python3 scripts/bench_train.py --device cuda --model cifar_resnet20 --image-size 32 --num-classes 10 \
        --norms bn,gn,sn --per-gpu-batch 32 --out "$out/cifar_resnet20"
    step 170 "bench_train resnet50 + torch.compile" \
        python3 scripts/bench_train.py --device cuda --compile --norms bn,gn --per-gpu-batch 32 --repeats 5 \
        --out "$out/resnet50_compile"
    step 45 "bench_norms" python3 scripts/bench_norms.py --device cuda
    step 90 "pytest -m gpu" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_path.py tests/test_data.py
} 2>&1 | tee "$out/log.txt"

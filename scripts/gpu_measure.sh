#!/usr/bin/env bash
# The GPU measurements of one lent GPU, in one go, most important first (each step under its own time limit, so
# one slow step cannot eat the others; a step that runs out leaves the earlier ones' files):
#   1. the GPU tests: every layer in one compiled graph on CUDA, exact against float64, no host sync
#   2. ResNet-50 224x224, bf16, channels_last, compiled, 8 emulated GPUs x 32: bn, gn, sn and the baselines
#      (plain_bn@256 = torchvision's resnet50 with nn.BatchNorm2d, the hand-written loop, normbench's trainer)
#   3. the same at 8x2 with CUDA graphs (a 16-image step is bound by kernel launches)
#   4. a CIFAR ResNet-20 epoch (50,000 images / img/s) at 8x32, compiled
#   5. eager ResNet-50 at 8x32 and 8x2 (the before, on the same card)
# Figures merge into OUTDIR/gpu.json (results/benchmarks/gpu.json's layout) and bench .md/.json files.
#   scripts/gpu_measure.sh OUTDIR
# Run from the repository root with its dependencies importable (PYTHONPATH=. works without installing; the
# device image lacks hydra-core/omegaconf/wandb: install their wheels first, see the device README).
set -u
out=${1:?usage: scripts/gpu_measure.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
bench="python3 scripts/bench_train.py --device cuda --json $out/gpu.json --repeats 5"
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
    step 150 "pytest -m gpu" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_compiled.py tests/test_fast_path.py
    step 240 "resnet50 compiled 8x32 + baselines" \
        $bench --mode compiled --norms bn,gn,sn --per-gpu-batch 32 --out "$out/resnet50_compiled"
    step 150 "resnet50 cuda_graphs 8x2" \
        $bench --mode cuda_graphs --norms bn,gn,sn --per-gpu-batch 2 --no-baselines --out "$out/resnet50_cuda_graphs"
    step 120 "cifar_resnet20 compiled 8x32 (an epoch = 50,000 / img/s)" \
        $bench --mode compiled --model cifar_resnet20 --image-size 32 --num-classes 10 --norms bn,gn,sn \
        --per-gpu-batch 32 --no-baselines --out "$out/cifar_resnet20_compiled"
    step 90 "resnet50 eager 8x32, 8x2" \
        python3 scripts/bench_train.py --device cuda --norms bn,gn,sn --per-gpu-batch 32,2 --no-baselines \
        --repeats 3 --out "$out/resnet50_eager"
} 2>&1 | tee "$out/log.txt"

#!/usr/bin/env bash
# The checks that need a CUDA device, as one script: the CUDA tests (probe and auto_uba against
# dense CPU float64 references), the probe benchmark on CUDA (ours vs PyHessian, HVP vs gradient,
# peak memory vs a training step) and the demo on CUDA.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Needs the package importable (installed, or PYTHONPATH=.), pyhessian, scikit-learn, matplotlib.
# Every step runs even if an earlier one fails; the exit status is the number of failed steps.
set -uo pipefail
out=${1:-gpu-check-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0
step() {  # step NAME COMMAND...: run, tee the log, count a failure
    local name=$1
    shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}
step gpu python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
step test_cuda python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider
step probe_benchmark python3 benchmarks/probe_benchmark.py --repeats 3 --device cuda \
    --variants graph-kept gradient-start \
    --out "$out/probe_benchmark_cuda.json"
step demo python3 -m uba_auto demo --quick --device cuda --no-progress --out "$out/demo"
exit "$failed"

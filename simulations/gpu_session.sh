#!/usr/bin/env bash
# One call on a lent GPU machine (the workplace's `device` tool): the CUDA tests and one
# `fedgen simulate` run, inside a fixed wall-time budget, with the run directory (trimmed
# to what `fedgen evaluate` reads) and the logs written under $OUT.
#
# The machine is bare and offline, so its packages and data travel with the call in the
# ignored folder .gpu/ (name it in the call's `carry`):
#   .gpu/site.tar.xz   the packages its image lacks (Flower, Ray, Opacus, dp-accounting, ...),
#                      unpacked from their cp312 manylinux wheels, Ray without its Java jars
#                      and RLlib (the whole call may carry 64 MiB)
#   .gpu/mnist/        MNIST's four .gz files (../shared does not travel)
#   .gpu/cache/        a copy of ~/.cache/fedgen/evaluators, so the figures use the same
#                      evaluator CNN as the CPU rows
#
#   bash simulations/gpu_session.sh CONFIG BUDGET_SECONDS [--set KEY=VALUE ...]
set -u
started=$(date +%s)
config=$1
budget=$2
shift 2
out=${OUT:-/tmp/out}
mkdir -p "$out" /tmp/site
tar xJf .gpu/site.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
export FEDGEN_DATA_DIR=$PWD/.gpu/mnist FEDGEN_CACHE_DIR=$PWD/.gpu/cache
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
    || { tail -20 "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, flwr, ray, opacus; print('torch', torch.__version__, \
'flwr', flwr.__version__, 'ray', ray.__version__, 'opacus', opacus.__version__)"

# The CUDA tests run beside the federation: they are small, and the call's time is short.
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_mmd.py -k "cuda or gpu" \
    >"$out/tests.log" 2>&1 &
tests=$!

left=$((budget - ($(date +%s) - started) - 30))
echo "simulate: $left s left for the run"
timeout "$left" python3 -m fedgen.cli simulate "$config" --out /tmp/run "$@" 2>&1 \
    | tee "$out/simulate.log" | grep -E "round|epsilon|accuracy|consistency|Frechet|Error|error" \
    | tail -40
echo "simulate exit: ${PIPESTATUS[0]}"
wait "$tests"
tail -5 "$out/tests.log"
# A file comes back only under 16 MiB: keep what `fedgen evaluate` and the reports read
# (the last checkpoint, no device ledgers), so the figures can be completed on the CPU.
rm -rf /tmp/run/client-ledgers
ls /tmp/run/checkpoints/round_*.safetensors 2>/dev/null | head -n -1 | xargs -r rm -f
tar czf "$out/run.tgz" -C /tmp run 2>/dev/null
ls -la "$out/run.tgz"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
echo "call: $(($(date +%s) - started)) s"

#!/usr/bin/env bash
# The conv-forms study on a CUDA machine: torch's and the sub-pixel forms of every stride-2 conv of
# the paper preset (bench_conv_subpixel.py) with cudnn.benchmark off, then on (separate processes:
# PyTorch's cuDNN plan cache ignores the flag), torch's transposed conv by layout, then the paper
# training step with each form set for the fused blocks (VOSGAN_CUDA_CONV; the step runs with
# cudnn.benchmark on). The extension builds in the background meanwhile (pip install -e), so the
# forms run from a source copy with kernels/ placed as vosgan/kernels, as gpu_session.sh's tests
# do: the checkout has no vosgan/kernels, only the finished editable install maps it (run from
# the checkout before that, bench_conv_subpixel.py failed with ModuleNotFoundError). The
# training-step steps wait for the build. In the twelfth session the forms table at B=32 and 64
# took most of 9 minutes on an H100 (where the time went was not measured), so the default is
# now B=32 (FORMS_BATCHES).
# Usage: gpu_conv_forms.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-/tmp/vosgan-gpu}"
mkdir -p "$OUTDIR"
exec > >(tee -a "$OUTDIR/log.txt") 2>&1
export PYTHONUNBUFFERED=1
[ -x /usr/local/cuda/bin/nvcc ] && export CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}"
T0=$(date +%s)
step() { echo; echo "=== [$(($(date +%s) - T0)) s] $*"; }
step machine; nvidia-smi -L
if compgen -G ".whl/*.whl" >/dev/null; then  # PyAV for vosgan.data, absent from the image
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/site"
fi
ARCH="$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
(TORCH_CUDA_ARCH_LIST="$ARCH" CMAKE_BUILD_PARALLEL_LEVEL=8 timeout 300 python3 -m pip install -q \
  --no-build-isolation --no-deps -e . >"$OUTDIR/build.txt" 2>&1
  echo "build exit $?" >>"$OUTDIR/build.txt") &
SRC=/tmp/vosgan-forms-src
rm -rf "$SRC" && mkdir "$SRC" && cp -r vosgan benchmarks "$SRC/" &&
  cp -r kernels "$SRC/vosgan/kernels"
FORMS_PATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"  # the copy's vosgan, kernels included
for flag in 0 1; do
  step "conv forms, B=${FORMS_BATCHES:-32}, cudnn.benchmark=$flag"
  # shellcheck disable=SC2086  # a list of batch sizes
  (cd "$SRC/benchmarks" && PYTHONPATH="$FORMS_PATH" VOSGAN_BENCH_CUDNN_BENCHMARK=$flag \
    timeout 200 python3 bench_conv_subpixel.py ${FORMS_BATCHES:-32})
  echo "forms exit $?"
done
step "torch's transposed conv by layout, cudnn.benchmark on"
(cd "$SRC/benchmarks" && PYTHONPATH="$FORMS_PATH" timeout 60 python3 bench_conv_subpixel.py \
  --layouts)
wait; tail -2 "$OUTDIR/build.txt"
for spec in ${SPECS:-none transposed=subpixel transposed=tune}; do
  step "paper step side by side, VOSGAN_CUDA_CONV=$spec"
  VOSGAN_CUDA_CONV="${spec#none}" timeout 120 python3 benchmarks/bench_train_step.py --preset paper \
    --device cuda --rounds 10 --providers "${PROVIDERS:-reference,fused-cl-graph}" 2>&1 | tail -7
done
step done

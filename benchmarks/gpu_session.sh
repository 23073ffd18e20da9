#!/usr/bin/env bash
# Everything that needs a GPU, as one script for a short lease of a CUDA machine: build the
# extension for the card, the CUDA tests, the GPU benchmarks, a short training run on the GPU.
# By default: the op and extension tests; then the open questions (the flow-warp loss at B=32 with
# the video gradient's scatter modes, the compositing backward's frame split at B=8-32, the paper
# step side by side, the paper step's layer map, the conv blocks at B=32, the paper step with
# the narrow convs' other forms where the map says they save time); the fused-op benchmark
# checks; 200 training steps eager and from CUDA graphs; the train-step table and profile. The
# twenty-second session's three calls covered most of the default run of that time in about 11
# minutes of an H200 (starts included).
# VOSGAN_GPU_TESTS="tests/..." narrows the tests, VOSGAN_GPU_CHECKS=0 skips the checks,
# VOSGAN_GPU_FULL=1 adds the re-measurements (the conv blocks under both cudnn.benchmark
# settings, fp32 flow warp, the compiled step). The conv-forms study is
# benchmarks/gpu_conv_forms.sh. Steps run in order of value, each under its own time cap, so a
# step that hangs or fails costs its cap and the rest still run. Results land in OUTDIR: log.txt
# (everything, the layer map included), build.txt, tests_ops.txt (each test's outcome: the op
# tests, then those that need the extension), train_metrics.json (VOSGAN_GPU_FULL=1) and
# pytest-benchmark JSON files (tables: benchmarks/report.py): 8 files with VOSGAN_GPU_FULL=1,
# the most the device tool returns. PyAV is not on the device image: put its wheel in .whl/
# (see below) or the video tests fail. The shared real clips (3.8 MB) can travel too: copy
# ../shared/data/clips to .shared-data/ (ignored through .git/info/exclude, never committed) and
# carry it; tests and benchmarks then read them through VOSGAN_SHARED_DATA.
#
# Usage, from the repository root on the CUDA machine:  benchmarks/gpu_session.sh [OUTDIR]
# Env: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: the card's own, e.g. 9.0).
# Python wheels the machine lacks (PyAV, say) can wait in .whl/: they are installed to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-/tmp/vosgan-gpu}}"
mkdir -p "$OUTDIR"
exec > >(tee -a "$OUTDIR/log.txt") 2>&1
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
T0=$(date +%s)
step() { echo; echo "=== [$(($(date +%s) - T0)) s] $*"; }

step "machine"
nvidia-smi -L
# DALI's GPU video reader decodes with NVDEC through the driver's libnvcuvid
echo "libnvcuvid: $(ldconfig -p | grep -c libnvcuvid) entries in ldconfig; $(timeout 60 find / \
  -xdev -name 'libnvcuvid.so*' 2>/dev/null | head -3 | tr '\n' ' ')"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .shared-data ] && export VOSGAN_SHARED_DATA="$PWD/.shared-data"
echo "shared data: ${VOSGAN_SHARED_DATA:-none (the real-clip tests and loader rows skip)}"
ARCH="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}"
[ -x /usr/local/cuda/bin/nvcc ] && export CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}"

step "build vosgan._C for sm_$ARCH (background); meanwhile the Triton/cupy tests from a source copy"
(TORCH_CUDA_ARCH_LIST="$ARCH" CMAKE_BUILD_PARALLEL_LEVEL=8 timeout 300 \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$OUTDIR/build.txt" 2>&1
  echo "build exit $?" >>"$OUTDIR/build.txt") &
BUILD=$!
rm -rf /tmp/vosgan-src && mkdir /tmp/vosgan-src && cp -r vosgan tests benchmarks pyproject.toml /tmp/vosgan-src/ &&
  cp -r kernels /tmp/vosgan-src/vosgan/kernels
# VOSGAN_GPU_TESTS: the tests to run here instead of the op suites (e.g. only those changed since
# the last GPU run); "none" skips them.
OP_TESTS="${VOSGAN_GPU_TESTS:-tests/test_composite.py tests/test_flow_warp.py \
  tests/test_conv3d_block.py tests/test_conv3d_subpixel.py tests/test_davis_metrics.py \
  tests/test_train_graph.py tests/test_train.py::test_channels_last_trains_the_same_function \
  tests/test_losses.py::test_generator_consistency_under_cuda_autocast}"
if [ "$OP_TESTS" != none ]; then
  # Every test's outcome as it finishes (-v), whole in tests_ops.txt: an error inside pytest
  # itself can end the session before its summary (the twenty-second session lost the names of
  # 15 failures that way), so the failures are read from the per-test lines.
  # shellcheck disable=SC2086  # a list of test paths
  (cd /tmp/vosgan-src && timeout 200 "$PY" -m pytest -v -p no:cacheprovider -n 8 --timeout 150 \
    -rfEs $OP_TESTS >"$OUTDIR/tests_ops.txt" 2>&1)
  echo "tests (ops) exit $?"
  grep -aE "FAILED|ERROR|crashitem|[0-9]+ (passed|failed)" "$OUTDIR/tests_ops.txt" |
    cut -c1-200 | sort -u | head -60
fi
wait $BUILD
tail -15 "$OUTDIR/build.txt"
# Toolchain facts for csrc/README.md: which compiler built the module, and whether it defines
# its own copies of libstdc++'s stream code (it should import them: "U").
c++ --version | head -1
SO="$("$PY" -c "import torch, vosgan._C as c; print(c.__file__)")" &&
  nm -D -C "$SO" | grep -E "_M_insert<long>|num_put" | head -5

step "backend report; the tests that need the extension (each outcome appended to tests_ops.txt)"
"$PY" -m vosgan.backend
if [ -z "${VOSGAN_GPU_TESTS:-}" ]; then
  # 4 workers: 84 s on an H200 (test_gru and test_compile); a crash is named by xdist's crashitem.
  # Appended to tests_ops.txt rather than a file of its own: the device tool returns 8 files.
  PYTHONFAULTHANDLER=1 timeout 150 "$PY" -m pytest -v -p no:cacheprovider -n 4 --timeout 120 \
    -rfEs tests/test_gru.py tests/test_backend.py tests/test_compile.py >/tmp/tests_ext.txt 2>&1
  echo "tests (extension) exit $?"
  { echo; echo "=== tests that need the extension"; cat /tmp/tests_ext.txt; } \
    >>"$OUTDIR/tests_ops.txt"
  grep -aE "FAILED|ERROR|crashitem|[0-9]+ (passed|failed)" /tmp/tests_ext.txt |
    cut -c1-200 | sort -u | head -40
fi

# bench_train_step.py's cases selected by -k $1, their pytest-benchmark JSON to $OUTDIR/$2.
train_step_bench() {
  timeout 220 "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_train_step.py \
    --benchmark-only -k "$1" --benchmark-json "$OUTDIR/$2" --benchmark-columns=min,median,max,rounds
  echo "train step ($1) exit $?"
}

# The open questions first: what the defaults not yet timed on a GPU would give.
step "flow-warp loss, B=32 bf16: reference / compile / fused, and the video gradient's scatter modes"
timeout 100 "$PY" benchmarks/bench_flow_warp.py b32-t32 --bf16-only
echo "flow warp exit $?"

step "composite fwd+bwd at B=8, 16, 32: fused vs fused-tsplit (the backward's frames split) vs compile"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -p no:xdist benchmarks/bench_composite.py \
  --benchmark-only -k "gpu and fwd+bwd and not 64x3 and not reference" \
  --benchmark-json "$OUTDIR/composite_tsplit.json" --benchmark-columns=median,rounds
echo "composite t-split exit $?"

step "paper step side by side (providers taking turns)"
timeout 120 "$PY" benchmarks/bench_train_step.py --preset paper --device cuda --rounds 10 \
  --providers "${VOSGAN_GPU_PROVIDERS:-reference,fused-cl-graph,fused}"
echo "train step side by side exit $?"

step "where the paper step's layer time goes: each layer alone x its calls; narrow convs padded to 8"
# (into log.txt, not a file of its own: the device tool returns at most 8 files)
rm -f /tmp/layer_map.md
timeout 240 "$PY" benchmarks/bench_layer_map.py --preset paper --device cuda --narrow \
  >/tmp/layer_map.md
echo "layer map exit $?"
cat /tmp/layer_map.md

# G's three blocks have never been timed at their real shapes (the list was wrong until the
# twenty-third session); one cudnn.benchmark setting per process (PyTorch's plan cache).
for flag in 1 0; do
  step "conv blocks at the model's shapes, B=32: eager vs fused (bf16 CL3d), cudnn.benchmark=$flag"
  VOSGAN_BENCH_CUDNN_BENCHMARK=$flag VOSGAN_BENCH_PROVIDERS=eager,fused timeout 100 "$PY" \
    benchmarks/bench_conv3d_block.py 32
  echo "conv blocks B=32 (cudnn.benchmark=$flag) exit $?"
done

# The narrow convs' other forms: the paper step with each (one process each; the reference in
# the same run is the yardstick), where the layer map above says the form saves >= 0.3 ms.
for form in pad8 subpixel; do
  saved=$(sed -n "s/^$form saves \(-*[0-9.]*\) ms per step.*/\1/p" /tmp/layer_map.md 2>/dev/null)
  if ! awk -v s="${saved:-0}" 'BEGIN { exit !(s >= 0.3) }'; then
    echo "paper step with narrow=$form: skipped, the layer map gives it ${saved:-no} ms"
    continue
  fi
  step "paper step with the narrow convs as $form (VOSGAN_CUDA_CONV=narrow=$form): map ${saved} ms"
  VOSGAN_CUDA_CONV=narrow=$form timeout 100 "$PY" benchmarks/bench_train_step.py --preset paper \
    --device cuda --rounds 6 --providers reference,fused-cl-graph
  echo "train step narrow=$form exit $?"
done

if [ "${VOSGAN_GPU_CHECKS:-1}" = 1 ]; then
  step "the fused-op benchmarks' correctness checks on CUDA (composite, flow_warp; each case once)"
  timeout 120 "$PY" -m pytest -q -p no:cacheprovider -p no:xdist -rfE --benchmark-disable \
    benchmarks/bench_composite.py benchmarks/bench_flow_warp.py -k "gpu and fused"
  echo "benchmark checks exit $?"
fi

step "python -m vosgan.train --fused on the GPU (cpu-small, 200 steps): eager, then train.cuda_graph"
for graph in false true; do
  timeout 120 "$PY" -m vosgan.train --fused --train.device=cuda --train.steps=200 \
    --train.cuda_graph=$graph --out "/tmp/vosgan-gpu-graph-$graph" 2>&1 | tr '\r' '\n' |
    grep -v "^\s*$" | tail -4
  echo "train (cuda_graph=$graph) exit ${PIPESTATUS[0]}"
  tail -2 "/tmp/vosgan-gpu-graph-$graph/log.jsonl"
done

step "full training step, paper and cpu-small, bf16: reference, --fused, channels_last_3d, CUDA graphs"
train_step_bench "cuda and not compile" train_step.json

# Issue #6 on a many-core machine: the loader (reads on torch.get_num_threads() threads) against
# what the paper step consumes (the side-by-side step above: B=32 clips per step)
step "loaders vs the training step on $(nproc) cores: shared clips on the fly, caches (bench_data)"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -p no:xdist benchmarks/bench_data.py \
  --benchmark-only -k "loader" --benchmark-json "$OUTDIR/data.json" --benchmark-columns=median,rounds
echo "loaders exit $?"

step "where each paper step spends its GPU time (torch.profiler)"
timeout 150 "$PY" benchmarks/bench_train_step.py --preset paper --device cuda --rounds 3 \
  --providers reference,fused-cl-graph --profile "${VOSGAN_GPU_PROFILE:-3}"
echo "train step profile exit $?"

if [ "${VOSGAN_GPU_FULL:-0}" != 1 ]; then
  step "done (VOSGAN_GPU_FULL=1 also reruns: the 300-step run, conv blocks, flow warp in fp32, compile step)"
  exit 0
fi

step "python -m vosgan.train --fused on the GPU (cpu-small, 300 steps)"
timeout 90 "$PY" -m vosgan.train --fused --train.device=cuda --train.steps=300 \
  --out /tmp/vosgan-gpu-run 2>&1 | tr '\r' '\n' | grep -v "^\s*$" | tail -5
echo "train exit ${PIPESTATUS[0]}"
cp /tmp/vosgan-gpu-run/metrics.json "$OUTDIR/train_metrics.json" 2>/dev/null

# one cudnn.benchmark setting per process: PyTorch's cuDNN plan cache ignores the flag. With it
# off, the fused transposed blocks run their convs in sub-pixel form (conv3d_forms.cuda_form).
for flag in 0 1; do
  step "conv blocks: eager vs fused (paper shapes, B=16 and 64, bf16 CL3d), cudnn.benchmark=$flag"
  VOSGAN_BENCH_CUDNN_BENCHMARK=$flag VOSGAN_BENCH_PROVIDERS=eager,fused timeout 150 "$PY" \
    benchmarks/bench_conv3d_block.py 16 64
  echo "conv blocks (cudnn.benchmark=$flag) exit $?"
done

step "flow-warp loss, B=32 fp32"
timeout 90 "$PY" benchmarks/bench_flow_warp.py b32-t32 --fp32-only
echo "flow warp (fp32) exit $?"

step "full training step under torch.compile (paper preset; inductor compiles for about a minute)"
train_step_bench "paper-cuda and compile" train_step_compile.json

step "done"

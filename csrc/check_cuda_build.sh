#!/usr/bin/env bash
# Compile-check the CUDA sources (csrc/*.cu) on a machine without a GPU.
#
# torch 2.13 in the project venv is CPU-only and ships no CUDA headers, so this script uses a
# throwaway venv with torch==2.14.1 (a CUDA 13.0 build, ~5 GB, ~1 min to install; reused on later
# runs) and the system nvcc. For every architecture it compiles each .cu file to an object with
# `ptxas -v` and fails on a compile error or on any register spill.
#
# Usage: csrc/check_cuda_build.sh [--cmake] [archs...]      (default archs: 80 90)
#   --cmake  also configure and build the whole extension with CMakeLists.txt against the CUDA
#            torch (CPU + CUDA sources, link included), as `pip install` would on a CUDA machine.
# Env:   VOSGAN_CUDA_VENV (default /tmp/vosgan-cuda-venv), NVCC (default: nvcc on PATH)
# Not part of the default test run (the torch install is 5 GB); run it by hand or in a CI job.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VOSGAN_CUDA_VENV:-/tmp/vosgan-cuda-venv}"
NVCC="${NVCC:-nvcc}"
CMAKE_BUILD=0
if [ "${1:-}" = "--cmake" ]; then
  CMAKE_BUILD=1
  shift
fi
ARCHS=("$@")
[ ${#ARCHS[@]} -eq 0 ] && ARCHS=(80 90)

if ! "$VENV/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  echo "== creating $VENV with torch==2.14.1 (CUDA build)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.14.1
fi
PY="$VENV/bin/python"
TORCH_DIR="$("$PY" -W ignore -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
# cuda headers that torch's includes need and the system toolkit lacks (cusparse.h, cublas...).
NV="$("$PY" -W ignore -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
PY_INC="$("$PY" -W ignore -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
echo "== torch $("$PY" -W ignore -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'), \
$("$NVCC" --version | tail -2 | head -1)"

OUT="$(mktemp -d /tmp/vosgan-cuda-check.XXXXXX)"
status=0
for src in "$ROOT"/csrc/*.cu; do
  for arch in "${ARCHS[@]}"; do
    log="$OUT/$(basename "$src" .cu)_sm$arch.log"
    echo "== $(basename "$src") sm_$arch"
    if ! "$NVCC" -std=c++20 -O3 --expt-relaxed-constexpr -Xptxas -v \
        -gencode "arch=compute_$arch,code=sm_$arch" \
        -DVOSGAN_WITH_CUDA=1 -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1 \
        -I"$ROOT/csrc" -I"$TORCH_DIR/include" -I"$TORCH_DIR/include/torch/csrc/api/include" \
        -I"$NV/include" -I"$PY_INC" \
        -c "$src" -o "$OUT/$(basename "$src" .cu)_sm$arch.o" >"$log" 2>&1; then
      cat "$log"
      echo "FAILED: $(basename "$src") sm_$arch"
      status=1
      continue
    fi
    # One line per kernel instantiation: name, registers, spill stores/loads (must be zero).
    awk -F"'" '/Compiling entry function/ {name = $2}
               /bytes spill stores/ {sub(/^ +/, ""); spill = $0}
               /Used [0-9]+ registers/ {match($0, /Used [0-9]+ registers/);
                                        print name "\t" substr($0, RSTART, RLENGTH) ", " spill}' \
        "$log" | c++filt | sed -E 's/^void vosgan::\(anonymous namespace\)::([^(]*)\([^\t]*/   \1/'
    if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" >/dev/null; then
      echo "FAILED: register spills in $(basename "$src") sm_$arch"
      status=1
    fi
  done
done
if [ $status -eq 0 ] && [ $CMAKE_BUILD -eq 1 ]; then
  # torch's CMake config needs the CUDA paths spelled out when it finds no GPU, and the system
  # toolkit lacks the cuSPARSE/cuBLAS headers torch includes: take them from torch's nvidia
  # wheels (platform.md).
  export CPATH="$NV/include${CPATH:+:$CPATH}"
  arch_list="$(printf '%s;' "${ARCHS[@]}" | sed -E 's/([0-9])([0-9]a?);/\1.\2;/g; s/;$//')"
  echo "== CMake build of vosgan._C, TORCH_CUDA_ARCH_LIST=$arch_list"
  # torch 2.14's CMake config asks for C++20 on every target, CUDA sources included; CMake knows
  # nvcc's C++20 flag only from 3.26 on (Debian 12's 3.25 stops at generate time), so use the
  # pip `cmake` in the throwaway venv, as the README's install does in the project venv.
  if [ ! -x "$VENV/bin/cmake" ]; then
    "$VENV/bin/pip" install -q cmake
  fi
  cmake() { "$VENV/bin/cmake" "$@"; }
  gen="Unix Makefiles"
  command -v ninja >/dev/null && gen=Ninja
  if cmake -S "$ROOT" -B "$OUT/cmake" -G "$gen" -DCMAKE_BUILD_TYPE=Release \
      -DPython_EXECUTABLE="$PY" -DTORCH_CUDA_ARCH_LIST="$arch_list" \
      -DCUDAToolkit_ROOT=/usr/local/cuda -DCUDA_TOOLKIT_ROOT_DIR=/usr/local/cuda \
      -DCUDA_nvrtc_LIBRARY="$NV/lib/libnvrtc.so.13" >"$OUT/cmake.log" 2>&1 &&
      cmake --build "$OUT/cmake" -j 2 >>"$OUT/cmake.log" 2>&1; then
    grep "vosgan:" "$OUT/cmake.log"
    # Load it (undefined symbols show here) and run the CPU kernels once; no GPU needed.
    (cd "$OUT/cmake" && "$PY" -W ignore -c "
import os, torch, _C
x, h0 = torch.randn(2, 3, 4, requires_grad=True), torch.zeros(2, 5)
w = [torch.randn(15, 4), torch.randn(15, 5), torch.zeros(15), torch.zeros(15)]
out, ws = torch.ops.vosgan.gru_forward(x, h0, *w)
out.sum().backward()  # the C++ autograd kernel
print('   loads: cuda_compiled =', _C.cuda_compiled, '; CPU forward', tuple(out.shape),
      '+ backward', tuple(x.grad.shape))
print('   CPU GEMMs:', _C.gru_cpu_gemm())
if _C.gru_cpu_gemm().startswith('oneDNN'):  # this torch's mkldnn op, as the CPU GRU calls it
    os.environ['VOSGAN_GRU_GEMM'] = 'onednn'
    torch.testing.assert_close(torch.ops.vosgan.gru_forward(x, h0, *w)[0], out)
    print('   the oneDNN engine gives the BLAS engine forward')
") || status=1
  else
    tail -30 "$OUT/cmake.log"
    echo "FAILED: CMake build"
    status=1
  fi
fi
if [ $status -eq 0 ]; then
  echo "OK: every CUDA source compiles for sm_${ARCHS[*]} without spills"
  rm -rf "$OUT"
else
  echo "logs and objects kept in $OUT"
fi
exit $status

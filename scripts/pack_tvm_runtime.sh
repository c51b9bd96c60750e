#!/usr/bin/env bash
# On the CPU machine: what the GPU machine needs to run the TVM backend's CUDA
# kernels with TVM's runtime alone (it has no TVM, and the full wheel is too big
# to carry), under .carry/tvm (git-ignored; the device tool carries it):
#   site/tvm     TVM's Python package without libtvm_compiler, 3rdparty, src,
#                include and relax; imported there with TVM_USE_RUNTIME_LIB=1
#   wheels/      apache-tvm-ffi for the GPU machine's Python (cp312)
#   exports/     libraries written by kernel.export (cubin compiled here by nvcc):
#                tests/ for tests/gpu/test_tvm_cuda.py, bench/ for the benchmark
#
#   bash scripts/pack_tvm_runtime.sh [sm_90] [cp312]
set -euo pipefail
arch="${1:-sm_90}"
pyver="${2:-312}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.carry/tvm"
rm -rf "$dest" && mkdir -p "$dest/site" "$dest/wheels" "$dest/exports"
tvm_dir="$(python -c 'import os, tvm; print(os.path.dirname(tvm.__file__))')"
ffi_version="$(python -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')"
cp -r "$tvm_dir" "$dest/site/tvm"
(cd "$dest/site/tvm" && rm -rf lib/libtvm_compiler.so 3rdparty src include relax lib64 \
    && find . -name __pycache__ -prune -exec rm -rf {} +)
python -m pip download -q "apache-tvm-ffi==$ffi_version" --no-deps --only-binary :all: \
    --python-version "$pyver" --platform manylinux_2_28_x86_64 -d "$dest/wheels"
python "$root/tests/gpu/test_tvm_cuda.py" export "$dest/exports/tests" "$arch" >/dev/null
python "$root/benchmarks/bench_triton.py" --export-tvm "$dest/exports/bench" --tvm-arch "$arch"
du -sh "$dest"/*

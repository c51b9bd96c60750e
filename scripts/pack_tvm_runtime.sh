#!/usr/bin/env bash
# On the CPU machine: what the GPU machine needs to run the TVM backend's CUDA
# kernels with TVM's runtime alone (it has no TVM, and the full wheel is too big
# to carry), under .carry/tvm (git-ignored; the device tool carries it):
#   site/tvm     TVM's Python package without libtvm_compiler, 3rdparty, src,
#                include and relax; imported there with TVM_USE_RUNTIME_LIB=1
#   wheels/      apache-tvm-ffi for the GPU machine's Python (cp312); with --full it
#                is unpacked into compiler/site.tar.xz instead
#   exports/     libraries written by kernel.export (cubin compiled here by nvcc):
#                tests/ for tests/gpu/test_tvm_cuda.py, bench/ for the benchmark
#
#   bash scripts/pack_tvm_runtime.sh [sm_90] [cp312] [--full]
#
# --full: TVM's compiler too, as compiler/libtvm_compiler.so.xz (259 MB -> 55 MiB,
# ~4 min on this machine; the full wheel, 100 MB, is past the device tool's 64 MiB
# carry limit), the package as compiler/site.tar.xz, and no exports: gpu_run.sh
# unpacks them, and the GPU machine
# (which has nvcc) then builds TVM kernels in-process, so that `gmagen tune
# --backend tvm` and the TVM GPU tests run there as on any machine with TVM.
set -euo pipefail
full=0
args=()
for a in "$@"; do [[ "$a" == --full ]] && full=1 || args+=("$a"); done
arch="${args[0]:-sm_90}"
pyver="${args[1]:-312}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.carry/tvm"
rm -rf "$dest" && mkdir -p "$dest/site" "$dest/wheels" "$dest/exports"
tvm_dir="$(python -c 'import os, tvm; print(os.path.dirname(tvm.__file__))')"
ffi_version="$(python -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')"
cp -r "$tvm_dir" "$dest/site/tvm"
# the runtime alone imports without relax and include; the full package (--full) imports relax
drop="lib/libtvm_compiler.so 3rdparty src lib64"
(( full )) || drop="$drop include relax"
(cd "$dest/site/tvm" && rm -rf $drop && find . -name __pycache__ -prune -exec rm -rf {} +)
python -m pip download -q "apache-tvm-ffi==$ffi_version" --no-deps --only-binary :all: \
    --python-version "$pyver" --platform manylinux_2_28_x86_64 -d "$dest/wheels"
if (( full )); then
  rmdir "$dest/exports"
  mkdir -p "$dest/compiler"
  # the x86 branch filter and a dictionary past the default 64 MiB: 55 MiB, not 57
  xz --x86 --lzma2=preset=9e,dict=256MiB -T1 -c "$tvm_dir/lib/libtvm_compiler.so" \
      >"$dest/compiler/libtvm_compiler.so.xz"
  # the Python package as one archive too (14 MB of files; ~3 MB), less TVM's web runtime;
  # tvm_ffi goes in it unpacked, less the C sources it bundles (libbacktrace): xz packs
  # it to less than the wheel's zip, and the carry limit is tight (3.3 MB -> ~1.5 MB)
  rm -rf "$dest/site/tvm/web"
  python -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
      "$dest"/wheels/*.whl "$dest/site"
  rm -rf "$dest/site/tvm_ffi/3rdparty" "$dest/wheels"
  tar -C "$dest/site" -cf - . | xz -9e -T1 >"$dest/compiler/site.tar.xz"
  rm -rf "$dest/site"
else
  python "$root/tests/gpu/test_tvm_cuda.py" export "$dest/exports/tests" "$arch" >/dev/null
  python "$root/benchmarks/bench_triton.py" --export-tvm "$dest/exports/bench" --tvm-arch "$arch"
fi
du -sh "$dest"/*
total=$(du -sb "$dest" | cut -f1)
echo "total $((total / 1048576)) MiB (the device tool carries at most 64 MiB in all)"
(( total <= 64 * 1048576 )) || { echo "too big to carry"; exit 1; }

"""The NVRTC compile layer of the CuPy backend, on the CPU: cubins for sm_80 and
sm_90, ptxas' resource report, compile errors that quote the source, and the
memory / disk cache (corrupt entries, concurrent writers)."""

from __future__ import annotations

import json
import multiprocessing
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("cupy", reason="cupy is not installed: the cupy backend's NVRTC layer cannot be tested")

from gmagen.backends.cupy import nvrtc  # noqa: E402  (after the skip)
from gmagen.errors import CompileError, OptionError  # noqa: E402

ARCHS = ["sm_80", "sm_90"]

# bf16 axpy through cuda_bf16.h, and one warp's bf16 tensor-core product through
# inline PTX (m16n8k16 exists from sm_80 on).
KERNELS = r"""
#include <cuda_bf16.h>

extern "C" __global__ void gma_axpy_fwd(const __nv_bfloat16* __restrict__ x,
                                        __nv_bfloat16* __restrict__ y, float a, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __float2bfloat16(a * __bfloat162float(x[i]) + __bfloat162float(y[i]));
}

extern "C" __global__ void gma_mma_fwd(const float* __restrict__ x, float* __restrict__ d) {
  __shared__ float tile[32 * 4];
  const int t = threadIdx.x;
  __nv_bfloat162 a01 = __floats2bfloat162_rn(x[8 * t + 0], x[8 * t + 1]);
  __nv_bfloat162 a23 = __floats2bfloat162_rn(x[8 * t + 2], x[8 * t + 3]);
  __nv_bfloat162 a45 = __floats2bfloat162_rn(x[8 * t + 4], x[8 * t + 5]);
  __nv_bfloat162 a67 = __floats2bfloat162_rn(x[8 * t + 6], x[8 * t + 7]);
  unsigned a0 = *reinterpret_cast<unsigned*>(&a01), a1 = *reinterpret_cast<unsigned*>(&a23);
  unsigned a2 = *reinterpret_cast<unsigned*>(&a45), a3 = *reinterpret_cast<unsigned*>(&a67);
  float c0 = 0.f, c1 = 0.f, c2 = 0.f, c3 = 0.f;
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(a0), "r"(a1));
  tile[4 * t + 0] = c0; tile[4 * t + 1] = c1; tile[4 * t + 2] = c2; tile[4 * t + 3] = c3;
  __syncthreads();
  d[t] = tile[(4 * t + 5) % 128];  // [32 threads x 4] accumulator fragment, read across lanes
}
"""

# 64 live values under -maxrregcount=32 spill; a runtime-indexed array lives on the stack.
SPILL = r"""
extern "C" __global__ void gma_spill_fwd(const float* __restrict__ x, float* __restrict__ y, int pick) {
  float acc[64];
#pragma unroll
  for (int j = 0; j < 64; ++j) acc[j] = x[j * blockDim.x + threadIdx.x];
  for (int it = 0; it < 8; ++it) {
#pragma unroll
    for (int j = 0; j < 64; ++j) acc[j] = acc[j] * acc[(j + 1) % 64] + x[it];
  }
  float local[64];
#pragma unroll
  for (int j = 0; j < 64; ++j) local[j] = acc[j];
  y[threadIdx.x] = local[pick & 63];
}
"""

BROKEN = """extern "C" __global__ void gma_broken_fwd(float* y) {
  const int i = threadIdx.x;
  y[i] = undeclared_scale * 2.0f;
}
"""

SMALL = 'extern "C" __global__ void gma_small_fwd(float* y) { y[threadIdx.x] = 1.0f; }\n'


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh disk cache (knobs reads GMAGEN_CACHE_DIR on each access) and memory cache."""
    monkeypatch.setenv("GMAGEN_CACHE_DIR", str(tmp_path))
    nvrtc.clear_memory_cache()
    yield tmp_path / "cupy"
    nvrtc.clear_memory_cache()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the units NVRTC really compiled (cache hits do not call it)."""
    seen: list[str] = []
    real = nvrtc._run_nvrtc

    def counting(source, name, options):
        seen.append(name)
        return real(source, name, options)

    monkeypatch.setattr(nvrtc, "_run_nvrtc", counting)
    return seen


def test_include_dirs_hold_cuda_headers():
    dirs = [Path(d) for d in nvrtc.include_dirs()]
    assert any((d / "cuda_bf16.h").is_file() and (d / "cuda_fp16.h").is_file() for d in dirs), dirs


@pytest.mark.parametrize("arch", ARCHS)
def test_compile_bf16_and_mma(arch: str):
    compiled = nvrtc.compile_cuda(KERNELS, "gma_kernels.cu", arch)
    assert compiled.arch == arch and f"-arch={arch}" in compiled.options
    assert compiled.cubin.startswith(b"\x7fELF") and len(compiled.cubin) > 1000
    assert compiled.ptx is not None and "mma.sync.aligned.m16n8k16" in compiled.ptx
    assert set(compiled.resources) == {"gma_axpy_fwd", "gma_mma_fwd"}, compiled.log
    for res in compiled.resources.values():
        assert res.registers > 0 and res.spill_stores == 0 and res.spill_loads == 0, compiled.log
    assert compiled.resources["gma_mma_fwd"].shared == 32 * 4 * 4
    assert compiled.resources["gma_axpy_fwd"].shared == 0


def test_arch_spellings():
    assert nvrtc.normalize_arch("90") == nvrtc.normalize_arch(90) == "sm_90"
    assert nvrtc.normalize_arch("sm_90a") == "sm_90a"
    with pytest.raises(OptionError, match="compute_90"):
        nvrtc.normalize_arch("compute_90")
    with pytest.raises(OptionError, match="supported: .*sm_80"):
        nvrtc.normalize_arch("sm_35")
    with pytest.raises(OptionError, match="pass arch="):
        nvrtc.compile_cuda(SMALL, "gma_small.cu", options=("-arch=sm_80",))
    with pytest.raises(OptionError, match="tuple of strings"):
        nvrtc.compile_cuda(SMALL, "gma_small.cu", options="-lineinfo")  # type: ignore[arg-type]


def test_spills_are_reported():
    compiled = nvrtc.compile_cuda(SPILL, "gma_spill.cu", "sm_90", options=("-maxrregcount=32",))
    res = compiled.resources["gma_spill_fwd"]
    assert res.registers <= 32
    assert res.stack_frame > 0 and res.spill_stores > 0 and res.spill_loads > 0, compiled.log


def test_parse_resources_older_format_and_device_functions():
    text = """ptxas info    : Function properties for _Z6helperv
ptxas         .     16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, 1024 bytes smem, 360 bytes cmem[0]
"""
    assert nvrtc.parse_resources(text) == {"k": nvrtc.Resources(40, 8, 4, 4, 1024)}


def test_compile_error_quotes_source(cache_dir: Path):
    with pytest.raises(CompileError) as info:
        nvrtc.compile_cuda(BROKEN, "gma_broken.cu", "sm_90")
    message = str(info.value)
    assert "gma_broken.cu(3): error" in message  # NVRTC's log
    assert ">    3 |   y[i] = undeclared_scale * 2.0f;" in message  # the line, with its number
    assert "undeclared_scale" in message and "sm_90" in message
    saved = sorted(p.name for p in (cache_dir / "failed").iterdir())
    assert [Path(n).suffix for n in saved] == [".cu", ".log"] and saved[0] in message
    assert not list(cache_dir.glob("*.cubin"))  # failures are not cached


def test_second_compile_from_memory(calls: list[str]):
    first = nvrtc.compile_cuda(SMALL, "gma_small.cu", "sm_90")
    assert nvrtc.compile_cuda(SMALL, "gma_small.cu", "90") is first
    assert calls == ["gma_small.cu"]
    nvrtc.compile_cuda(SMALL, "gma_small.cu", "sm_80")  # arch and options are part of the key
    nvrtc.compile_cuda(SMALL, "gma_small.cu", "sm_90", options=("-lineinfo",))
    assert len(calls) == 3


def test_fresh_process_served_from_disk(calls: list[str]):
    first = nvrtc.compile_cuda(SMALL, "gma_small.cu", "sm_90")
    nvrtc.clear_memory_cache()  # what a new process sees
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = nvrtc.compile_cuda(SMALL, "gma_small.cu", "sm_90")
    assert calls == ["gma_small.cu"]
    assert again is not first and again == first


def _truncate_cubin(entry: Path) -> None:
    cubin = entry.with_suffix(".cubin")
    cubin.write_bytes(cubin.read_bytes()[:100])


def _garbage_json(entry: Path) -> None:
    entry.write_text('{"schema_version": 1, "key": ')


def _json_missing_field(entry: Path) -> None:
    meta = json.loads(entry.read_text())
    del meta["cubin_sha256"]
    entry.write_text(json.dumps(meta))


def _cubin_missing(entry: Path) -> None:
    entry.with_suffix(".cubin").unlink()


@pytest.mark.parametrize("corrupt", [_truncate_cubin, _garbage_json, _json_missing_field, _cubin_missing],
                         ids=["truncated-cubin", "garbage-json", "json-missing-field", "cubin-missing"])
def test_corrupt_entry_warns_and_recompiles(corrupt, cache_dir: Path, calls: list[str]):
    first = nvrtc.compile_cuda(SMALL, "gma_small.cu", "sm_90")
    (entry,) = cache_dir.glob("*.json")
    corrupt(entry)
    nvrtc.clear_memory_cache()
    with pytest.warns(UserWarning, match=r"ignoring NVRTC cache entry .*\.json: .*recompiling"):
        again = nvrtc.compile_cuda(SMALL, "gma_small.cu", "sm_90")
    # (the log differs: ptxas prints its compile time)
    assert len(calls) == 2 and (again.cubin, again.resources) == (first.cubin, first.resources)
    nvrtc.clear_memory_cache()  # the entry was rewritten whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nvrtc.compile_cuda(SMALL, "gma_small.cu", "sm_90") == again
    assert len(calls) == 2


def test_concurrent_processes_share_one_entry(cache_dir: Path, calls: list[str]):
    # spawn: children inherit GMAGEN_CACHE_DIR from os.environ, nothing else.
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=nvrtc.compile_cuda, args=(KERNELS, "gma_kernels.cu", "sm_90"))
             for _ in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    assert len(list(cache_dir.glob("*.json"))) == 1 and len(list(cache_dir.glob("*.cubin"))) == 1
    assert not list(cache_dir.glob("*.tmp"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled = nvrtc.compile_cuda(KERNELS, "gma_kernels.cu", "sm_90")
    assert calls == [] and compiled.cubin.startswith(b"\x7fELF")
    assert set(compiled.resources) == {"gma_axpy_fwd", "gma_mma_fwd"}

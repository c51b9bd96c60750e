"""Build a scheduled graph with ``tvm.compile`` (cached in memory per
specialization) and call it.

llvm: the built module's function runs in this process on NumPy arrays.
cuda: ``tvm.compile`` builds the host code and CUDA source without a GPU;
the kernels are compiled to cubin (``cubin.py``) when the function is first
run, by writing the library the way ``kernel.export`` does and loading it with
``tvm.runtime.load_module`` (one code path for in-process runs and exports),
so building and exporting need no GPU and running needs TVM's CUDA runtime.

cuda builds also check each kernel's dynamic shared memory (what TVM's
lowering merged its shared buffers into) against what one block may have on
the target's arch, and refuse a build that could never launch: the error names
the kernel, the bytes, the limit, the shape and the config, before anything
runs, instead of a CUDA launch failure after the plan's first kernels ran.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from gmagen.errors import CompileError, UnsupportedFeature

from . import cubin, pipeline
from .runtime import Step

log = logging.getLogger("gmagen")


@dataclass
class Built:
    lib: Any                 # what tvm.compile returned (host module + imports)
    name: str                # the function's global symbol
    step: Step               # its parameters
    source: str
    seconds: float           # build time
    target: dict
    _fn: Optional[Any] = field(default=None, repr=False)
    _dir: Optional[Any] = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return str(self.target["kind"])

    @property
    def arch(self) -> str:
        return str(self.target.get("arch", ""))

    @property
    def fn(self) -> Any:
        """The callable function (cuda: loaded from a library with cubin on first use)."""
        if self._fn is None:
            if self.kind == "llvm":
                self._fn = self.lib[self.name]
            else:
                self._dir = tempfile.TemporaryDirectory(prefix="gmagen-tvm-")
                path = os.path.join(self._dir.name, "lib.so")
                self.export(path)
                import tvm

                self._fn = tvm.runtime.load_module(path)[self.name]
        return self._fn

    def export(self, path: str) -> str:
        """Write the shared library (cuda kernels as cubin for the target's arch)."""
        module = getattr(self.lib, "mod", self.lib)
        return cubin.export_library(module, path, self.arch if self.kind == "cuda" else "")


_BUILT: dict[tuple, Built] = {}
_LOCK = threading.Lock()


def build(key: tuple, make: Callable[[], tuple[Any, str, Step, Callable]], target: dict,
          what: str = "this specialization") -> Built:
    """The built function of ``key``; ``make()`` returns (IRModule, name, step,
    source_of(IRModule) -> str) and runs only on a cache miss.  ``what`` names the
    specialization in errors."""
    with _LOCK:
        hit = _BUILT.get(key)
        if hit is not None:
            return hit
        import tvm

        mod, name, step, source_of = make()
        start = time.perf_counter()
        arch = str(target.get("arch", "")) if target["kind"] == "cuda" else ""
        shared = _shared_memory_instrument() if target["kind"] == "cuda" else None
        try:
            with _nvcc_callback(arch), tvm.transform.PassContext(
                    instruments=[shared] if shared is not None else []):
                lib = tvm.compile(mod, target=tvm.target.Target(target),
                                  **({"tir_pipeline": pipeline.register()}
                                     if target["kind"] == "cuda" else {}))
        except Exception as exc:  # TVM raises its own error types from C++
            raise CompileError(f"tvm backend: tvm.compile failed for {name} (target "
                               f"{target}): {exc}\n--- TensorIR ---\n{mod.script()}") from exc
        if shared is not None:
            check_shared_memory(shared.bytes, arch, what)
        built = Built(lib, name, step, source_of(mod, lib), time.perf_counter() - start,
                      dict(target))
        _BUILT[key] = built
        return built


# the most dynamic shared memory one block may opt in to, per compute capability
# (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability")
SHARED_MEMORY_PER_BLOCK = {"sm_70": 98304, "sm_72": 98304, "sm_75": 65536, "sm_80": 166912,
                           "sm_86": 101376, "sm_87": 166912, "sm_89": 101376, "sm_90": 232448,
                           "sm_100": 232448, "sm_103": 232448, "sm_120": 101376}
_DYN_SHMEM = re.compile(r'buf_dyn_shmem = T\.alloc_buffer\(\(([^,]*),\), "uint8", scope="shared\.dyn"\)')


def _shared_memory_instrument() -> Any:
    import tvm

    @tvm.ir.instrument.pass_instrument
    class SharedMemory:
        """After SplitHostDevice: {device kernel: its merged dynamic shared memory in
        bytes (an int, or the expression when it is not a constant)}."""

        def __init__(self) -> None:
            self.bytes: dict[str, Any] = {}

        def run_after_pass(self, mod: Any, info: Any) -> None:
            if info.name != "tirx.SplitHostDevice":
                return
            for gv, func in mod.functions.items():
                if not isinstance(func, tvm.tirx.PrimFunc) or "kernel" not in gv.name_hint:
                    continue
                # TVM 0.27 has no Python visitor of tirx statements: the one merged
                # allocation (MergeSharedMemoryAllocations) read from the printed TIR
                text = func.script()
                found = _DYN_SHMEM.search(text)
                if found:
                    size = found.group(1).strip()
                    self.bytes[gv.name_hint] = int(size) if size.isdigit() else size
                elif 'scope="shared.dyn"' in text:  # a TVM that prints it otherwise
                    log.warning("tvm backend: could not read the dynamic shared memory of "
                                "%s from TVM's lowering; it is not checked", gv.name_hint)

    return SharedMemory()


def check_shared_memory(sizes: dict[str, Any], arch: str, what: str) -> None:
    """UnsupportedFeature when a kernel's dynamic shared memory is not a constant or
    exceeds what a block may have on ``arch`` (an arch not in the table: only the
    constant is checked).  ``what``: the specialization, for the message."""
    limit = SHARED_MEMORY_PER_BLOCK.get(arch)
    for kernel, size in sizes.items():
        if isinstance(size, int) and (limit is None or size <= limit):
            continue
        need = f"{size:,} bytes" if isinstance(size, int) else f"{size} bytes (not a constant)"
        allowed = f"{arch} allows {limit:,}" if limit is not None else f"on {arch or 'cuda'}"
        raise UnsupportedFeature(
            f"tvm backend on cuda: kernel {kernel} of {what} needs {need} of shared memory "
            f"per block, {allowed}.  Its tiles hold [tile, D], [tile, K] and K x (Dv + 1) "
            f"buffers: a smaller block_n / chunk helps where the tile dominates; a large "
            f"K x Dv is beyond these schedules (use backend='triton' or 'cupy')")


class _nvcc_callback:
    """Where TVM's CUDA runtime is loaded, ``tvm.compile`` compiles the kernels at
    build time through the global ``tvm_callback_cuda_compile`` (by default NVRTC
    from the cuda-bindings package): for the build, make it nvcc to cubin for
    ``arch``, the compiler used for exports.  Without the runtime (no GPU) TVM
    keeps the source and nothing is compiled here."""

    def __init__(self, arch: str):
        self.arch = arch
        self.previous: Any = None

    def __enter__(self) -> None:
        import tvm_ffi

        if not self.arch or tvm_ffi.get_global_func("ffi.Module.create.cuda",
                                                     allow_missing=True) is None:
            self.arch = ""
            return
        self.previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
        arch = self.arch

        def compile_cuda(code: Any, *_: Any) -> bytes:
            return cubin.compile_cubin(str(code), arch)

        tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)

    def __exit__(self, *exc: Any) -> None:
        if not self.arch:
            return
        import tvm_ffi

        if self.previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", self.previous,
                                         override=True)
        else:
            tvm_ffi.registry.remove_global_func("tvm_callback_cuda_compile")


def cache_size() -> int:
    return len(_BUILT)

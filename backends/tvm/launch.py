"""Build a scheduled graph with ``tvm.compile`` (cached in memory per
specialization) and call it.

llvm: the built module's function runs in this process on NumPy arrays.
cuda: ``tvm.compile`` builds the host code and CUDA source without a GPU;
the kernels are compiled to cubin (``cubin.py``) when the function is first
run, by writing the library the way ``kernel.export`` does and loading it with
``tvm.runtime.load_module`` (one code path for in-process runs and exports),
so building and exporting need no GPU and running needs TVM's CUDA runtime.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from gmagen.errors import CompileError

from . import cubin
from .runtime import Step


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


def build(key: tuple, make: Callable[[], tuple[Any, str, Step, Callable]], target: dict) -> Built:
    """The built function of ``key``; ``make()`` returns (IRModule, name, step,
    source_of(IRModule) -> str) and runs only on a cache miss."""
    with _LOCK:
        hit = _BUILT.get(key)
        if hit is not None:
            return hit
        import tvm

        mod, name, step, source_of = make()
        start = time.perf_counter()
        try:
            with _nvcc_callback(str(target.get("arch", "")) if target["kind"] == "cuda" else ""):
                lib = tvm.compile(mod, target=tvm.target.Target(target))
        except Exception as exc:  # TVM raises its own error types from C++
            raise CompileError(f"tvm backend: tvm.compile failed for {name} (target "
                               f"{target}): {exc}\n--- TensorIR ---\n{mod.script()}") from exc
        built = Built(lib, name, step, source_of(mod, lib), time.perf_counter() - start,
                      dict(target))
        _BUILT[key] = built
        return built


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

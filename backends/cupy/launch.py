"""Compile generated CUDA (NVRTC, cached in memory and on disk by nvrtc.py), load
cubins per device (cached), and launch on the caller's stream.

Arguments are converted by the C type of each kernel parameter (the emitters
record the declarations): pointers -> ``numpy.uint64`` of the device address,
``long long`` -> ``numpy.int64``, ``int`` -> ``numpy.int32``.  Arrays may be
CuPy arrays or torch tensors (whichever framework the executable was handed).
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from gmagen.errors import CompileError

from .nvrtc import Compiled, compile_cuda, module_from_cubin
from .prelude import Emitted

DEFAULT_SMEM = 48 * 1024  # a launch needing more dynamic shared memory must opt in

_MODULES: dict[tuple[str, int], Any] = {}
_OPTED_IN: dict[tuple[str, int, str], int] = {}
_LOCK = threading.Lock()


def build(emitted: Emitted, arch: str) -> Compiled:
    """NVRTC compile of one generated kernel (raises CompileError quoting the line)."""
    return compile_cuda(emitted.source, f"{emitted.name}.cu", arch, ("-lineinfo",))


def function(compiled: Compiled, name: str, device: int) -> Any:
    """The loaded kernel ``name`` of ``compiled`` on ``device`` (module cached)."""
    key = (compiled.key, device)
    with _LOCK:
        module = _MODULES.get(key)
    if module is None:
        try:
            module = module_from_cubin(compiled.cubin)
        except Exception as exc:
            raise CompileError(f"cupy: cannot load the cubin of {name} (compiled for "
                               f"{compiled.arch}) on CUDA device {device}: {exc}; compile for "
                               f"this device's arch (arch=...)") from exc
        with _LOCK:
            module = _MODULES.setdefault(key, module)
    return module.get_function(name)


# -- arrays of either framework ------------------------------------------------------

def is_torch(x: Any) -> bool:
    return type(x).__module__.split(".", 1)[0] == "torch"


def data_ptr(x: Any) -> int:
    if x is None:
        return 0
    return int(x.data_ptr()) if is_torch(x) else int(x.data.ptr)


def strides(x: Any) -> tuple[int, ...]:
    """Element strides."""
    if is_torch(x):
        return tuple(int(s) for s in x.stride())
    return tuple(int(s) // x.itemsize for s in x.strides)


def empty(like: Any, shape: tuple, dtype: str | None = None) -> Any:
    """An uninitialized array of IR dtype ``dtype`` (None: ``like``'s dtype) in
    ``like``'s framework, on the current device."""
    if dtype is None:
        if is_torch(like):
            import torch

            return torch.empty(shape, dtype=like.dtype, device=like.device)
        import cupy

        return cupy.empty(shape, dtype=like.dtype)
    if is_torch(like):
        import torch

        return torch.empty(shape, dtype=getattr(torch, {"f32": "float32", "f16": "float16",
                                                       "bf16": "bfloat16", "f64": "float64"}[dtype]),
                           device=like.device)
    import cupy

    return cupy.empty(shape, dtype={"f32": cupy.float32, "f16": cupy.float16,
                                    "f64": cupy.float64}[dtype])  # bf16: only via like


def _pointer(value: Any) -> np.uint64:
    return np.uint64(value if isinstance(value, (int, np.integer)) else data_ptr(value))


@lru_cache(maxsize=None)
def _parameters(params: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    """(name, converter) per declared parameter, in order: parsed once per kernel
    signature, not on every launch (a call launches up to five kernels of ~20
    parameters; the host time of an eager call is what small N pays)."""
    out = []
    for decl in params:
        if "*" in decl:
            convert: Any = _pointer
        elif decl.startswith("long long"):
            convert = np.int64
        elif decl.startswith("int"):
            convert = np.int32
        elif decl.startswith("float"):
            convert = np.float32
        else:
            raise TypeError(f"cupy launch: no conversion for parameter {decl!r}")
        out.append((decl.split()[-1], convert))
    return tuple(out)


def launch(fn: Any, emitted: Emitted, grid: tuple[int, int, int], args: Mapping[str, Any],
           stream: Any, device: int) -> None:
    """Launch ``fn`` with the arguments named by ``emitted.params``."""
    ordered = []
    for name, convert in _parameters(emitted.params):
        if name not in args:
            raise TypeError(f"cupy launch of {emitted.name}: no value for parameter {name!r}")
        ordered.append(convert(args[name]))
    for axis, (n, limit) in enumerate(zip(grid, (2 ** 31 - 1, 65535, 65535))):
        if not 1 <= n <= limit:
            from gmagen.errors import UnsupportedFeature

            raise UnsupportedFeature(f"cupy: {emitted.name} needs grid {grid}; axis {axis} "
                                     f"must lie in 1..{limit}")
    if emitted.smem > DEFAULT_SMEM:
        key = (str(fn.ptr), device, emitted.name)
        if _OPTED_IN.get(key) != emitted.smem:
            from cupy_backends.cuda.api import driver

            driver.funcSetAttribute(fn.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                    emitted.smem)
            _OPTED_IN[key] = emitted.smem
    fn(grid, (emitted.threads, 1, 1), tuple(ordered), shared_mem=emitted.smem, stream=stream)

"""Build a scheduled graph with ``tvm.compile`` (cached in memory per
specialization), and call it on NumPy arrays through DLPack.

The generated code may assume 64-byte aligned, contiguous buffers (TVM's
default ``data_alignment``; ``tvm.runtime.from_dlpack`` checks both): arrays
that already are pass without a copy, others are copied once into aligned
buffers.  Outputs are allocated aligned and handed back as NumPy views.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from gmagen.errors import CompileError

from .prelude import Param

ALIGN = 64


@dataclass
class Built:
    fn: Any                  # the built function (tvm_ffi Function)
    inputs: list[Param]
    outputs: list[Param]
    source: str
    seconds: float           # build time


_BUILT: dict[tuple, Built] = {}
_LOCK = threading.Lock()


def build(key: tuple, make: Callable[[], tuple[Any, Any, list[Param], list[Param], Callable]],
          target: dict) -> Built:
    """The built function of ``key``; ``make()`` returns (IRModule, name,
    inputs, outputs, source_of(IRModule) -> str) and runs only on a cache miss."""
    with _LOCK:
        hit = _BUILT.get(key)
        if hit is not None:
            return hit
        import tvm

        mod, name, inputs, outputs, source_of = make()
        start = time.perf_counter()
        try:
            lib = tvm.compile(mod, target=tvm.target.Target(target))
        except Exception as exc:  # TVM raises its own error types from C++
            raise CompileError(f"tvm backend: tvm.compile failed for {name} (target "
                               f"{target}): {exc}\n--- TensorIR ---\n{mod.script()}") from exc
        built = Built(lib[name], inputs, outputs, source_of(mod), time.perf_counter() - start)
        _BUILT[key] = built
        return built


def cache_size() -> int:
    return len(_BUILT)


def aligned_empty(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + nbytes].view(dt).reshape(shape)


def prepare(a: Any, dtype: str) -> np.ndarray:
    """``a`` as a C-contiguous, writable, 64-byte aligned array of ``dtype`` (a
    copy only when needed; bool key masks are viewed as uint8)."""
    a = np.asarray(a)
    if dtype == "uint8" and a.dtype == np.bool_:
        a = a.view(np.uint8) if a.flags.c_contiguous else np.ascontiguousarray(a).view(np.uint8)
    if (a.dtype == np.dtype(dtype) and a.flags.c_contiguous and a.flags.writeable
            and a.ctypes.data % ALIGN == 0):
        return a
    out = aligned_empty(a.shape, dtype)
    out[...] = a
    return out


def call(fn: Any, arrays: list[np.ndarray]) -> None:
    import tvm

    fn(*(tvm.runtime.from_dlpack(a) for a in arrays))

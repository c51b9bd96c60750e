"""Calling a built (or loaded) TVM function of one kernel plan: the runtime side,
shared by ``lower.TVMExecutable.run`` and ``gmagen.load``.

Imports nothing of TVM's compiler (``tvm.te``, ``tvm.s_tir``): a library
exported with ``kernel.export`` runs with TVM's runtime alone.  A ``Step`` is
one built function with the description of its parameters (``Slot``: the env
value it reads or writes, its shape with B / N / H symbolic, its dtype); it is
JSON round-trippable so that an exported library carries it.

CPU: NumPy arrays, copied only when not C-contiguous, writable and 64-byte
aligned (what TVM's generated code assumes).  CUDA: torch tensors (the
backend's native framework there), made contiguous and aligned the same way;
kernels run on TVM's current stream for the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

ALIGN = 64
Dim = Union[int, str]


@dataclass(frozen=True)
class Slot:
    """One parameter of a built function: env value ``name`` (``part`` "S" / "n"
    for the halves of a memory), its shape and dtype (NumPy name)."""

    name: str
    part: str
    shape: tuple[Dim, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "part": self.part, "shape": list(self.shape),
                "dtype": self.dtype}

    @staticmethod
    def from_json(data: dict) -> "Slot":
        return Slot(data["name"], data["part"], tuple(data["shape"]), data["dtype"])


@dataclass(frozen=True)
class Step:
    """One built function: parameters in call order (inputs then outputs), and
    the causal initial state's name when the plan reads one (N = 0 passes it
    through instead of launching)."""

    inputs: tuple[Slot, ...]
    outputs: tuple[Slot, ...]
    initial_state: Optional[str] = None

    def to_json(self) -> dict:
        return {"inputs": [s.to_json() for s in self.inputs],
                "outputs": [s.to_json() for s in self.outputs],
                "initial_state": self.initial_state}

    @staticmethod
    def from_json(data: dict) -> "Step":
        return Step(tuple(Slot.from_json(s) for s in data["inputs"]),
                    tuple(Slot.from_json(s) for s in data["outputs"]),
                    data.get("initial_state"))


class ShapeMismatch(ValueError):
    """An array's shape disagrees with a slot (the message names both)."""


def run_step(fn: Any, step: Step, env: dict[str, Any], device: str) -> dict[str, Any]:
    """Call ``fn`` on the env values ``step`` reads; return what it writes
    (memories as (S, n) pairs).  ``device``: "cpu" (NumPy) or "cuda" (torch)."""
    arrays: list[Any] = []
    dims: dict[str, int] = {}
    for slot in step.inputs:
        value = env[slot.name]
        if slot.part:
            value = value[0 if slot.part == "S" else 1]
        a = prepare(value, slot.dtype) if device == "cpu" else prepare_torch(value, slot.dtype)
        unify(dims, slot, tuple(a.shape))
        arrays.append(a)
    like = arrays[0] if arrays else None
    outs = [empty(resolve(s.shape, dims), s.dtype, device, like) for s in step.outputs]
    if any(dims.get(d, 1) == 0 for d in ("B", "N", "H")):
        _empty(step, outs, env, device)  # zero-extent loops (and grids) are not built for
    else:
        call(fn, arrays + outs, device)
    result: dict[str, Any] = {}
    for slot, a in zip(step.outputs, outs):
        if slot.part:
            pair = result.setdefault(slot.name, [None, None])
            pair[0 if slot.part == "S" else 1] = a
        else:
            result[slot.name] = a
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in result.items()}


def _empty(step: Step, outs: list[Any], env: dict[str, Any], device: str) -> None:
    """No token (or no row): memories are zero, a causal state passes through."""
    init = step.initial_state
    for slot, a in zip(step.outputs, outs):
        if slot.part and init is not None and env.get(init) is not None and _size(a):
            src = env[init][0 if slot.part == "S" else 1]
            if device == "cpu":
                a[...] = np.asarray(src, dtype=np.float32)
            else:
                a.copy_(src)
        elif device == "cpu":
            a[...] = 0.0
        else:
            a.zero_()


def _size(a: Any) -> int:
    return int(np.prod(tuple(a.shape), dtype=np.int64))


def unify(dims: dict[str, int], slot: Slot, shape: tuple[int, ...]) -> None:
    what = f"{slot.name}{'[0] (S)' if slot.part == 'S' else '[1] (n)' if slot.part == 'n' else ''}"
    if len(shape) != len(slot.shape):
        raise ShapeMismatch(f"{what} has {len(shape)} dims, expected {list(slot.shape)}")
    for want, got in zip(slot.shape, shape):
        if isinstance(want, str):
            if dims.setdefault(want, int(got)) != got:
                raise ShapeMismatch(f"{what} has shape {list(shape)}, expected "
                                    f"{want}={dims[want]} in {list(slot.shape)}")
        elif want != got:
            raise ShapeMismatch(f"{what} has shape {list(shape)}, expected {list(slot.shape)}")


def resolve(shape: tuple, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(dims[d] if isinstance(d, str) else d for d in shape)


# -- CPU: NumPy ---------------------------------------------------------------------

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


# -- CUDA: torch ------------------------------------------------------------------------

def _torch_dtype(dtype: str) -> Any:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "uint8": torch.uint8}[dtype]


def prepare_torch(a: Any, dtype: str) -> Any:
    """A CUDA tensor as contiguous, 64-byte aligned ``dtype`` (mixtures and states
    are cast to float32 here: they are small; tokens arrive in their own dtype)."""
    import torch

    if not isinstance(a, torch.Tensor):
        a = torch.from_dlpack(a)
    want = _torch_dtype(dtype)
    if want == torch.uint8 and a.dtype == torch.bool:
        a = a.contiguous().view(torch.uint8)
    if a.dtype != want:
        a = a.to(want)
    if not a.is_contiguous():
        a = a.contiguous()
    if a.data_ptr() % ALIGN:
        a = a.clone()
    return a


def empty(shape: tuple[int, ...], dtype: str, device: str, like: Any = None) -> Any:
    if device == "cpu":
        return aligned_empty(shape, dtype)
    import torch

    return torch.empty(shape, dtype=_torch_dtype(dtype), device=like.device)


def call(fn: Any, arrays: list[Any], device: str) -> None:
    import tvm

    if device == "cpu":
        fn(*(tvm.runtime.from_dlpack(a) for a in arrays))
        return
    import torch

    # TVM launches on its current stream of the device: make it torch's, so that
    # the kernels order with the caller's work
    stream = torch.cuda.current_stream(arrays[0].device)
    with _tvm_stream(arrays[0].device.index or 0, stream.cuda_stream):
        fn(*(tvm.runtime.from_dlpack(a) for a in arrays))


class _tvm_stream:
    """Set TVM-FFI's environment stream of a CUDA device for a call, when that
    API is there (tvm_ffi.use_raw_stream); otherwise TVM's default stream."""

    def __init__(self, device_index: int, handle: int):
        self.device_index = device_index
        self.handle = handle
        self.ctx: Any = None

    def __enter__(self) -> None:
        try:
            import tvm_ffi

            use = getattr(tvm_ffi, "use_raw_stream", None)
            if use is not None:
                self.ctx = use(tvm_ffi.device(f"cuda:{self.device_index}"), self.handle)
                self.ctx.__enter__()
        except Exception:  # an older tvm_ffi: the default stream (synchronizing)
            self.ctx = None

    def __exit__(self, *exc: Any) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)

"""Call-time checks: bind a program's symbolic input types to actual arrays.

Everything is checked before any kernel runs: one framework, one device,
dtypes, shapes in the call's layout, the mixture's shapes, optional inputs.
Errors name the argument, the expected and the actual value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from gmagen.errors import (DeviceError, DTypeError, FrameworkError, LayoutError, ShapeError,
                           format_shape)
from gmagen.ir.program import Program
from gmagen.ir.types import FLOAT_DTYPES, LAYOUTS, MemoryType

from .dlpack import device_of, device_str, dtype_display, dtype_of, framework_of

# Dims that generated code is specialized on; the rest (B, N, H, S) are runtime.
STATIC_DIMS = ("D", "Dv", "K")
_LAYOUT_AXES = {"bnhd": (0, 1, 2, 3), "bhnd": (0, 2, 1, 3)}


@dataclass(frozen=True)
class Binding:
    """What a call fixed: framework, device, layout, dims and dtypes.

    ``key`` is the specialization a backend compiles for."""

    framework: str
    device: tuple[str, int]
    layout: str
    dims: Mapping[str, int]
    dtypes: Mapping[str, str]           # dtype variable ("T", "P", "acc") -> concrete
    input_dtypes: Mapping[str, str]     # input name -> concrete dtype
    present: frozenset[str]             # optional inputs given
    key: tuple = field(compare=False, default=())

    def dim(self, name: str) -> int:
        return self.dims[name]


def _token_shape_in_layout(logical: tuple, layout: str) -> tuple:
    """Logical [B, N, H, X] written in the order the layout stores it."""
    return tuple(logical[i] for i in _LAYOUT_AXES[layout])


class _Binder:
    def __init__(self, program: Program, layout: str):
        self.program = program
        self.layout = layout
        self.dims: dict[str, int] = {}
        self.dim_source: dict[str, str] = {}

    def bind_shape(self, arg: str, actual: tuple[int, ...], declared: tuple,
                   logical_order: Optional[tuple[int, ...]] = None) -> None:
        """Unify ``actual`` with ``declared`` (in storage order when a layout applies)."""
        if logical_order is not None:
            declared = tuple(declared[i] for i in logical_order)
        names = ", ".join(str(d) for d in declared)
        layout_note = f" (layout {self.layout!r})" if logical_order is not None else ""
        if len(actual) != len(declared):
            raise ShapeError(f"{arg} has shape {format_shape(actual)} ({len(actual)} dims), "
                             f"expected [{names}]{layout_note}")
        for got, want in zip(actual, declared):
            want_val = want if isinstance(want, int) else self.dims.get(want)
            if want_val is not None and got != want_val:
                expected = [d if isinstance(d, int) else self.dims.get(d, d) for d in declared]
                source = "" if isinstance(want, int) else f"; {want} was set by {self.dim_source[want]}"
                raise ShapeError(f"{arg} has shape {format_shape(actual)}, expected [{names}] = "
                                 f"{format_shape(expected)}{layout_note}{source}")
            if isinstance(want, str) and want not in self.dims:
                self.dims[want] = int(got)
                self.dim_source[want] = arg


def _expect_array(arg: str, x: Any) -> str:
    fw = framework_of(x)
    if fw is None:
        raise FrameworkError(f"{arg} is a {type(x).__module__}.{type(x).__qualname__}, expected "
                             f"a NumPy, torch, JAX or CuPy array")
    return fw


def bind(program: Program, args: Mapping[str, Any], layout: str,
         supported_dtypes: tuple[str, ...] = FLOAT_DTYPES,
         supported_devices: tuple[str, ...] = ("cpu",), backend: str = "") -> Binding:
    """Check ``args`` (input name -> array, memory pair or None) against ``program``."""
    if layout not in LAYOUTS:
        raise LayoutError(f"layout={layout!r} is not allowed; expected one of "
                          + ", ".join(map(repr, LAYOUTS)))
    known = set(program.input_names)
    for name in args:
        if name not in known:
            raise FrameworkError(f"unexpected argument {name!r}; program {program.name!r} takes "
                                 + ", ".join(program.input_names))

    # 1. presence, framework and device of every array
    arrays: list[tuple[str, Any]] = []
    present = set()
    for inp in program.inputs:
        value = args.get(inp.name)
        if value is None:
            if not inp.optional:
                raise FrameworkError(f"missing required argument {inp.name!r}")
            continue
        present.add(inp.name)
        if isinstance(inp.type, MemoryType):
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise FrameworkError(f"{inp.name} must be a pair (S, n) as returned with "
                                     f"return_state=True, got {type(value).__name__}")
            arrays += [(f"{inp.name}[0] (S)", value[0]), (f"{inp.name}[1] (n)", value[1])]
        else:
            arrays.append((inp.name, value))
    frameworks = {name: _expect_array(name, x) for name, x in arrays}
    first_name, first_fw = next(iter(frameworks.items()))
    for name, fw in frameworks.items():
        if fw != first_fw:
            raise FrameworkError(f"{name} is a {fw} array but {first_name} is a {first_fw} "
                                 f"array; pass all arrays from one framework (gmagen never "
                                 f"copies between frameworks silently)")
    devices = {name: device_of(x) for name, x in arrays}
    first_dev = devices[first_name]
    for name, dev in devices.items():
        if dev != first_dev:
            raise DeviceError(f"{name} is on {device_str(dev)} but {first_name} is on "
                              f"{device_str(first_dev)}; all arrays must be on one device")
    if first_dev[0] not in supported_devices:
        raise DeviceError(f"backend {backend!r} runs on {', '.join(supported_devices)}, "
                          f"got arrays on {device_str(first_dev)}")

    # 2. dtypes
    binder = _Binder(program, layout)
    dtype_vars: dict[str, tuple[str, str]] = {}   # var -> (dtype, first arg)
    input_dtypes: dict[str, str] = {}
    for inp in program.inputs:
        if inp.name not in present:
            continue
        value = args[inp.name]
        parts = ([(f"{inp.name}[0] (S)", value[0]), (f"{inp.name}[1] (n)", value[1])]
                 if isinstance(inp.type, MemoryType) else [(inp.name, value)])
        for arg, x in parts:
            got = dtype_of(x)
            want = inp.type.dtype
            input_dtypes[inp.name] = got
            if inp.role == "seqlens":
                if got not in ("i32", "i64"):
                    raise DTypeError(f"{arg} has dtype {dtype_display(got)}, expected int32 or int64")
                continue
            if want in ("T", "P", "acc"):
                allowed = supported_dtypes if want == "T" else (
                    ("f32", "f64") if want == "acc" else FLOAT_DTYPES)
                if got not in allowed:
                    what = {"T": "token dtype", "P": "mixture dtype", "acc": "state dtype"}[want]
                    raise DTypeError(f"{arg} has dtype {dtype_display(got)}, expected a {what} "
                                     f"supported by backend {backend!r}: "
                                     + ", ".join(dtype_display(d) for d in allowed))
                if want in dtype_vars and dtype_vars[want][0] != got and want != "acc":
                    first_dtype, first_arg = dtype_vars[want]
                    share = "q, k and v" if want == "T" else "mean, log_var and logit"
                    raise DTypeError(f"{arg} has dtype {dtype_display(got)}, expected "
                                     f"{dtype_display(first_dtype)} like {first_arg} ({share} "
                                     f"share one dtype)")
                dtype_vars.setdefault(want, (got, arg))
            elif got != want:
                raise DTypeError(f"{arg} has dtype {dtype_display(got)}, expected "
                                 f"{dtype_display(want)}")

    # 3. shapes: tokens first (they fix B, N, H, D), then the rest
    order = sorted((i for i in program.inputs if i.name in present),
                   key=lambda i: {"token": 0, "mixture": 1, "mask": 2, "seqlens": 3}.get(i.role, 4))
    for inp in order:
        value = args[inp.name]
        if isinstance(inp.type, MemoryType):
            continue
        # every rank-4 tensor is per token ([B, N, H, X]: q/k/v, and responsibilities
        # passed back in), so the layout applies to it as it does to rank-4 results
        is_token = inp.type.rank == 4
        binder.bind_shape(inp.name, tuple(value.shape), inp.type.shape,
                          _LAYOUT_AXES[layout] if is_token else None)
    if "S1" in binder.dims:
        binder.dims["S"] = binder.dims["S1"] - 1
        binder.dim_source["S"] = "cu_seqlens"
    elif "B" in binder.dims:
        binder.dims["S"] = binder.dims["B"]
        binder.dim_source["S"] = "the batch size of the tokens"
    for inp in order:
        if isinstance(inp.type, MemoryType):
            s_arr, n_arr = args[inp.name]
            binder.bind_shape(f"{inp.name}[0] (S)", tuple(s_arr.shape), inp.type.shape)
            binder.bind_shape(f"{inp.name}[1] (n)", tuple(n_arr.shape), inp.type.n_shape)
    _check_seqlens(program, args, binder)
    for inp in program.inputs:
        x = args.get(inp.name)
        if x is not None and not isinstance(inp.type, MemoryType):
            _check_strides(inp.name, x)

    dtypes = {var: dt for var, (dt, _) in dtype_vars.items()}
    dtypes.setdefault("acc", "f32")
    key = (layout, first_dev[0], tuple(sorted(input_dtypes.items())), frozenset(present),
           tuple((d, binder.dims[d]) for d in STATIC_DIMS if d in binder.dims))
    return Binding(first_fw, first_dev, layout, dict(binder.dims), dtypes, input_dtypes,
                   frozenset(present), key)


def signature(program: Program, args: Mapping[str, Any]) -> Optional[tuple]:
    """Everything ``bind``'s result depends on, for torch tensors and NumPy arrays:
    per argument its type, dtype, shape, strides and device (a CPU tensor's pinned
    state too: DLPack names that device cuda_host).  A call whose signature was
    bound before gets that Binding back without checking again (a decode step
    spends ~40% of its host time in ``bind``); a new one goes through ``bind``, so
    a bad argument still gets its error.  None where the values matter (packed
    sequences: cu_seqlens on the CPU is read) or another framework is involved:
    always ``bind``."""
    sig: list = []
    for inp in program.inputs:
        value = args.get(inp.name)
        if value is None:
            sig.append(None)
            continue
        if inp.role == "seqlens":
            return None
        parts = value if isinstance(value, (tuple, list)) else (value,)
        sig.append(len(parts) if isinstance(value, (tuple, list)) else -1)
        for x in parts:
            kind = type(x)
            if kind is np.ndarray:
                sig.append((kind, x.dtype, x.shape, x.strides))
            elif framework_of(x) == "torch":
                device = x.device
                sig.append((kind, x.dtype, x.shape, x.stride(), device,
                            device.type == "cpu" and x.is_pinned()))
            else:
                return None
    if not set(args) <= set(program.input_names):
        return None  # a name the program does not take: bind says so
    return tuple(sig)


def _check_seqlens(program: Program, args: Mapping[str, Any], binder: _Binder) -> None:
    for inp in program.inputs:
        if inp.role != "seqlens" or args.get(inp.name) is None:
            continue
        if binder.dims.get("B", 1) != 1:
            raise ShapeError(f"{inp.name} is given, so the tokens must be packed with batch "
                             f"size 1, got B={binder.dims['B']}")
        cu = args[inp.name]
        if device_of(cu)[0] != "cpu":
            continue  # values of device arrays are not read back (no host round trip)
        values = np.asarray(cu)
        n = binder.dims.get("N")
        if len(values) < 1 or values[0] != 0 or np.any(np.diff(values) < 0) or (
                n is not None and values[-1] != n):
            raise ShapeError(f"{inp.name} must start at 0, never decrease and end at N={n}; "
                             f"got {values.tolist()[:8]}{'...' if len(values) > 8 else ''}")


def _check_strides(arg: str, x: Any) -> None:
    strides = getattr(x, "strides", None)
    if strides is None or callable(strides):
        strides = x.stride() if hasattr(x, "stride") else None
    if strides is not None and any(int(s) < 0 for s in strides):
        raise LayoutError(f"{arg} has negative strides {tuple(strides)}; pass a copy "
                          f"(negative strides cannot be exchanged through DLPack)")

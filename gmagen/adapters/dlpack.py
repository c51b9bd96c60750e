"""Framework detection and zero-copy exchange through DLPack.

Arrays come from NumPy, torch, JAX or CuPy; a backend takes one "native"
framework (NumPy for the oracle, torch for Triton, ...).  Conversion goes
through DLPack, so device arrays never visit the host; strides survive.
Frameworks are imported only when an array of theirs is seen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gmagen.errors import DeviceError, FrameworkError

FRAMEWORKS = ("numpy", "torch", "jax", "cupy")

# DLPack device types (dlpack.h: DLDeviceType).
_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 4: "opencl", 7: "vulkan", 8: "metal",
                 10: "rocm", 13: "cuda_managed", 14: "oneapi"}

_DTYPE_NAMES = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64",
                "bool": "bool", "int32": "i32", "int64": "i64"}
IR_TO_NAME = {v: k for k, v in _DTYPE_NAMES.items()}


def framework_of(x: Any) -> str | None:
    """"numpy" | "torch" | "jax" | "cupy", or None for anything else."""
    if isinstance(x, np.ndarray):
        return "numpy"
    module = type(x).__module__ or ""
    root = module.split(".", 1)[0]
    if root == "torch":
        return "torch"
    if root in ("jax", "jaxlib"):
        return "jax"
    if root == "cupy":
        return "cupy"
    return None


def device_of(x: Any) -> tuple[str, int]:
    """("cpu", 0), ("cuda", 1), ... from the array's ``__dlpack_device__``."""
    if isinstance(x, np.ndarray):
        return ("cpu", 0)
    try:
        kind, index = x.__dlpack_device__()
    except Exception:  # pragma: no cover - every supported framework implements it
        return ("unknown", 0)
    return (_DEVICE_NAMES.get(int(kind), f"dlpack{int(kind)}"), int(index))


def device_str(device: tuple[str, int]) -> str:
    return "cpu" if device[0] == "cpu" else f"{device[0]}:{device[1]}"


def dtype_of(x: Any) -> str:
    """The IR name of an array's dtype (f32, bf16, bool, ...), else its own name."""
    name = str(x.dtype).removeprefix("torch.")
    return _DTYPE_NAMES.get(name, name)


def dtype_display(ir_dtype: str) -> str:
    return IR_TO_NAME.get(ir_dtype, ir_dtype)


# -- conversions -------------------------------------------------------------

def to_numpy(x: Any, framework: str) -> np.ndarray:
    """Host arrays only: the oracle refuses device arrays rather than copying them."""
    if framework == "numpy":
        return x
    if device_of(x)[0] != "cpu":
        raise DeviceError(f"the numpy backend runs on the CPU, got an array on "
                          f"{device_str(device_of(x))}; pass host arrays or pick a GPU backend")
    if framework == "torch":
        import torch

        x = x.detach()
        if x.dtype == torch.bfloat16:  # NumPy has no bfloat16; the upcast is exact
            x = x.to(torch.float32)
        return x.numpy()
    return np.asarray(x)


def to_torch(x: Any, framework: str) -> Any:
    import torch

    if framework == "torch":
        return x
    if framework == "numpy":
        return torch.from_numpy(x)
    return torch.from_dlpack(x)


def from_numpy(x: np.ndarray, framework: str) -> Any:
    if framework == "numpy":
        return x
    if framework == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x))
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(x)
    raise FrameworkError(f"cannot return host results to {framework} arrays")


def from_torch(x: Any, framework: str) -> Any:
    if framework == "torch":
        return x
    if framework == "numpy":
        return x.detach().numpy()
    if framework == "jax":
        import jax.dlpack

        return jax.dlpack.from_dlpack(x)
    if framework == "cupy":
        import cupy

        return cupy.from_dlpack(x)
    raise FrameworkError(f"unknown framework {framework!r}")


def to_native(x: Any, framework: str, native: str) -> Any:
    """Caller's array -> the backend's framework, sharing memory where possible."""
    if native == "numpy":
        return to_numpy(x, framework)
    if native == "torch":
        return to_torch(x, framework)
    if native == framework:
        return x
    raise FrameworkError(f"no conversion from {framework} to {native}")


def from_native(x: Any, native: str, framework: str) -> Any:
    if native == "numpy":
        return from_numpy(x, framework)
    if native == "torch":
        return from_torch(x, framework)
    if native == framework:
        return x
    raise FrameworkError(f"no conversion from {native} to {framework}")


def cast(x: Any, framework: str, ir_dtype: str) -> Any:
    """Cast an array to an IR dtype within its own framework (no-op if equal)."""
    if dtype_of(x) == ir_dtype:
        return x
    name = IR_TO_NAME[ir_dtype]
    if framework == "torch":
        import torch

        return x.to(getattr(torch, name))
    if framework == "jax":
        import jax.numpy as jnp

        return x.astype(getattr(jnp, name))
    if framework == "numpy" and ir_dtype == "bf16":
        import ml_dtypes  # NumPy's bfloat16 comes from ml_dtypes (installed with JAX)

        return x.astype(ml_dtypes.bfloat16)
    return x.astype(name)

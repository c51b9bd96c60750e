"""Triton backend: GMA kernels generated from the IR's plans (``gmagen.compile(p, "triton")``).

CUDA tensors run compiled kernels; CPU tensors run the same kernels in Triton's
interpreter (float32), which is how CI checks them without a GPU.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Optional

from gmagen import knobs
from gmagen.config import Config
from gmagen.ir.passes.plan import KernelPlan

from ..base import Availability, Backend, Executable


@lru_cache(maxsize=1)
def _probe() -> tuple[bool, str, bool]:
    """(usable, reason, interpret).

    Triton decorates its own library (tl.sum, tl.cumsum, ...) when it is first
    imported, in interpreter mode or not, so the mode is one per process: the
    interpreter when there is no CUDA device (GMAGEN_TRITON_INTERPRET=auto), or
    when asked for ("1")."""
    import os
    import sys

    try:
        import torch
    except ImportError:
        return False, "torch is not installed (pip install 'gmagen[triton]')", False
    cuda = bool(torch.cuda.is_available())
    mode = knobs.triton_interpret()
    interpret = mode == "1" or (mode == "auto" and not cuda)
    if not cuda and mode == "0":
        return False, "no CUDA device, and GMAGEN_TRITON_INTERPRET=0 forbids the interpreter", False
    if interpret and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede Triton's import (see above)
    try:
        import triton.language as tl
    except ImportError:
        return False, "triton is not installed (pip install 'gmagen[triton]')", False
    if interpret and type(tl.sum).__name__ == "JITFunction":
        return False, ("triton was imported before gmagen in compiled mode, but there is no "
                       "CUDA device: set TRITON_INTERPRET=1 before importing triton"), False
    return True, "", interpret


@lru_cache(maxsize=None)
def _device_info(index: int) -> dict[str, Any]:
    import torch
    import triton

    props = torch.cuda.get_device_properties(index)
    return {"gpu": props.name, "capability": (props.major, props.minor),
            "sm_count": props.multi_processor_count, "backend_version": triton.__version__}


class TritonBackend(Backend):
    name = "triton"
    native = "torch"
    dtypes = ("f32", "f16", "bf16")
    cpu_dtypes = ("f32",)  # the interpreter does not do 16-bit arithmetic faithfully
    options = {"precision": ("ieee", "tf32x3", "tf32")}

    @property
    def devices(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("cpu",) if _probe()[2] else ("cuda",)

    @property
    def interpreted(self) -> bool:
        return _probe()[2]

    def availability(self) -> Availability:
        ok, reason, interpret = _probe()
        if not ok:
            return Availability(False, reason)
        return Availability(True, "CPU tensors in Triton's interpreter (float32)" if interpret
                            else "")

    def default_config(self, kernel: KernelPlan, binding: Any) -> Config:
        from . import space

        dims = binding.dims
        return space.default_config(kernel.kind, dims.get("D", 64), dims.get("Dv", 64),
                                    dims.get("K", 64), binding.dtypes.get("T", "f32"))

    def tuning_device(self, binding: Any) -> Optional[dict[str, Any]]:
        if self.interpreted or binding.device[0] != "cuda":
            return None
        return _device_info(binding.device[1])

    def validate_config(self, kernel: KernelPlan, config: Config) -> Config:
        from . import space

        return space.validate(kernel.kind, config)

    def tune(self, program: Any, plan: Any, kernel: KernelPlan, binding: Any,
             options: Mapping[str, Any], strategy: str = "auto",
             tune_options: Optional[Mapping[str, Any]] = None, space: Any = None) -> Any:
        """Tune ``kernel`` for this specialization (gmagen.autotune's loop over a
        TorchRunner); returns a TuneResult."""
        from gmagen.autotune.torch_runner import tune_plan

        from .tune import tuning_space

        return tune_plan(self, tuning_space, program, plan, kernel, binding, options, strategy,
                         tune_options, space)

    def lower(self, kernel: KernelPlan, binding: Any, config: Config,
              options: Mapping[str, Any]) -> Executable:
        from . import space
        from .lower import TritonExecutable

        interpret = self.interpreted
        sm_count = 4
        if not interpret:
            import torch

            sm_count = torch.cuda.get_device_properties(binding.device[1]).multi_processor_count
        full = space.validate(kernel.kind, self.default_config(kernel, binding).replace(
            **dict(config)))
        if not interpret:  # the interpreter runs float32 only
            space.check_for_dtype(kernel.kind, full, binding.dtypes.get("T", "f32"))
        return TritonExecutable(kernel, binding, full, options, interpret, sm_count)

    def describe(self) -> str:
        return ("triton: CUDA (f32/f16/bf16) and the CPU interpreter (f32); every variant, "
                "key mask, state, both layouts, any strides; no varlen yet")


BACKEND = TritonBackend()

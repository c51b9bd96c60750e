"""Torch backend: the IR's ops as plain torch operations (``gmagen.compile(p, "torch")``).

The portable path: runs wherever torch runs (CPU, CUDA, ROCm, MPS), in float16,
bfloat16, float32 and float64, differentiable by torch autograd, and the
readable reference beside the generated kernels.  torch is imported when the
backend is probed or lowered, not with this module.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

from gmagen.config import Config
from gmagen.ir.passes.plan import KernelPlan

from ..base import Availability, Backend, Executable


@lru_cache(maxsize=1)
def _probe() -> tuple[bool, str]:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return False, f"torch is not installed (pip install 'gmagen[torch]'): {exc}"
    return True, ""


class TorchBackend(Backend):
    name = "torch"
    native = "torch"
    # device names as gmagen's DLPack adapter spells them: MPS tensors are "metal"
    # (kDLMetal), ROCm ones "rocm"
    devices = ("cpu", "cuda", "rocm", "metal")
    dtypes = ("f16", "bf16", "f32", "f64")
    options: Mapping[str, tuple] = {}

    def availability(self) -> Availability:
        ok, reason = _probe()
        return Availability(ok, reason)

    def default_config(self, kernel: KernelPlan, binding: Any) -> Config:
        from .lower import DEFAULT_CONFIG

        return DEFAULT_CONFIG

    def lower(self, kernel: KernelPlan, binding: Any, config: Config,
              options: Mapping[str, Any]) -> Executable:
        from .lower import TorchExecutable

        return TorchExecutable(kernel, binding, config)

    def describe(self) -> str:
        return ("torch: plain torch ops on any torch device (cpu, cuda, rocm, mps), f16/bf16/"
                "f32/f64, differentiable; every variant, key mask, state, varlen, both layouts")


BACKEND = TorchBackend()

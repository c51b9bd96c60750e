"""TVM backend: GMA's kernel plans lowered to TVM tensor expressions (TE) and
TensorIR, scheduled from the config, built with TVM (``gmagen.compile(p, "tvm",
target="llvm")``).

Each plan kind has an emitter (``emit_<kind>.py``) that writes the plan's ops as
TE compute definitions, with the variant (norm, covariance, key mask, initial
state, layout, eps) as parameters; ``schedule.py`` turns the config into an
``s_tir`` schedule whose trace heads ``executable.source``; ``launch.py`` builds
with ``tvm.compile`` and keeps built modules in memory per specialization.

Target "llvm" runs on the CPU in float32 (arrays exchanged with NumPy through
DLPack, no copy when they are contiguous and 64-byte aligned).  TVM is imported
when the backend is probed or lowered, never with this module.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

from gmagen.config import Config
from gmagen.ir.passes.plan import KernelPlan

from ..base import Availability, Backend, Executable

# TVM release this backend was written against (TVM 0.27 renamed tir -> tirx and
# moved schedules to s_tir); older releases lack those modules.
MIN_TVM = (0, 27)


@lru_cache(maxsize=1)
def _probe() -> tuple[bool, str]:
    try:
        import tvm
    except ImportError as exc:
        return False, f"apache-tvm is not installed (pip install 'gmagen[tvm]'): {exc}"
    except Exception as exc:  # a broken install (missing libtvm, ABI mismatch)
        return False, f"cannot import tvm: {exc}"
    version = getattr(tvm, "__version__", "0")
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        parts = (0, 0)
    if parts < MIN_TVM:
        return False, (f"apache-tvm {version} is too old; the tvm backend needs "
                       f">= {'.'.join(map(str, MIN_TVM))} (tvm.tirx, tvm.s_tir)")
    try:
        import importlib

        for module in ("tvm.te", "tvm.s_tir", "tvm.tirx"):
            importlib.import_module(module)
    except ImportError as exc:
        return False, f"apache-tvm {version} lacks te / s_tir: {exc}"
    return True, ""


class TVMBackend(Backend):
    """native "numpy": on the CPU, NumPy arrays go to TVM through DLPack without a
    copy (tvm_ffi.from_dlpack), and NumPy is gmagen's only hard dependency, so
    the backend needs nothing beyond apache-tvm."""

    name = "tvm"
    native = "numpy"
    devices = ("cpu",)
    dtypes = ("f32",)
    options: Mapping[str, tuple] = {"target": ("llvm",)}

    def availability(self) -> Availability:
        ok, reason = _probe()
        return Availability(ok, reason)

    def default_config(self, kernel: KernelPlan, binding: Any) -> Config:
        from .space import default_config

        return default_config(kernel.kind)

    def lower(self, kernel: KernelPlan, binding: Any, config: Config,
              options: Mapping[str, Any]) -> Executable:
        from .lower import TVMExecutable

        return TVMExecutable(kernel, binding, config, options.get("target", "llvm"))

    def describe(self) -> str:
        return ("tvm: TE/TensorIR built with TVM for target llvm (CPU), float32; every "
                "variant, key mask, causal state, both layouts (no varlen yet)")


BACKEND = TVMBackend()

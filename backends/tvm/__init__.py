"""TVM backend: GMA's kernel plans lowered to TVM tensor expressions (TE) and
TensorIR, scheduled from the config, built with TVM (``gmagen.compile(p, "tvm",
target="llvm" | "cuda")``).

Each plan kind has an emitter (``emit_<kind>.py``) that writes the plan's ops as
TE compute definitions, with the variant (norm, covariance, key mask, initial
state, layout, eps) as parameters; ``schedule.py`` turns the config into an
``s_tir`` schedule whose trace heads ``executable.source``; ``launch.py`` builds
with ``tvm.compile`` and keeps built modules in memory per specialization.

Target "llvm" runs on the CPU in float32 (arrays exchanged with NumPy through
DLPack, no copy when they are contiguous and 64-byte aligned).  Target "cuda"
(``target="cuda"``: the arch of the CUDA device, which must exist; or
``target={"kind": "cuda", "arch": "sm_90"}`` / ``arch="sm_90"``: any machine)
takes float32, float16 or bfloat16 tokens (float32 accumulation) as torch
CUDA tensors; every plan is tiled (``schedule_cuda.py``): read, write and
responsibility one fused kernel per tile of tokens (intermediates in shared
memory and registers, nothing of size N x K in global memory), the causal scan
per-chunk partial states, a prefix over chunks and one fused kernel per chunk.
A specialization whose kernels need more shared memory per block than the arch
allows (large K x Dv: the causal scan keeps a K x (Dv + 1) state per block) is
refused at build time with UnsupportedFeature.  Building needs no GPU (kernels
to cubin with nvcc), running needs TVM's CUDA runtime.  ``kernel.export(path, ...)`` (``export.py``) writes
libraries that ``gmagen.load(path)`` runs with TVM's runtime alone.  TVM is
imported when the backend is probed or lowered, never with this module.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

from gmagen.config import Config
from gmagen.errors import OptionError
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
    if getattr(getattr(tvm, "base", None), "_RUNTIME_ONLY", False):
        return False, (f"apache-tvm {version} is loaded as the runtime only (no "
                       f"libtvm_compiler, or TVM_USE_RUNTIME_LIB=1): it cannot build; "
                       f"gmagen.load(path) still runs exported kernels")
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
    the backend needs nothing beyond apache-tvm.  Kernels for target "cuda" are
    called through ``for_options`` (a TVMCudaBackend: torch CUDA tensors)."""

    name = "tvm"
    native = "numpy"
    devices = ("cpu",)
    # gmagen.tune's options unless the caller gives them: configs are tuned per GPU
    tuning_options = {"target": "cuda"}
    dtypes = ("f32",)
    options: Mapping[str, tuple] = {"target": (), "arch": ()}

    def availability(self) -> Availability:
        ok, reason = _probe()
        return Availability(ok, reason)

    def lowering_availability(self, options: Mapping[str, Any]) -> Availability:
        """Building needs TVM's compiler only, for either target (cuda without a GPU
        when an arch is given: checked by ``check_options``)."""
        ok, reason = _probe()
        return Availability(ok, reason)

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``target``: "llvm" (default), "cuda" or {"kind": "cuda", "arch": "sm_90"};
        ``arch``: the cuda arch ("sm_90", "90", (9, 0)).  Normalized to
        {"target": "llvm"} or {"target": "cuda", "arch": "sm_90"} (arch left out for
        "cuda" on a machine with a CUDA device: the device's arch, per call)."""
        out = super().check_options(options)
        target = out.get("target", "llvm")
        arch = out.get("arch")
        if isinstance(target, Mapping):
            extra = sorted(set(target) - {"kind", "arch"})
            if extra or "kind" not in target:
                raise OptionError(f"tvm backend: target={dict(target)!r}; a target dict takes "
                                  f"'kind' ('llvm' or 'cuda') and, for cuda, 'arch' ('sm_90')")
            if "arch" in target:
                if arch is not None and normalize_arch(arch) != normalize_arch(target["arch"]):
                    raise OptionError(f"tvm backend: arch={arch!r} disagrees with the target's "
                                      f"arch {target['arch']!r}")
                arch = target["arch"]
            target = target["kind"]
        if target not in ("llvm", "cuda"):
            raise OptionError(f"tvm backend: target={target!r} is not allowed; expected 'llvm', "
                              f"'cuda' or {{'kind': 'cuda', 'arch': 'sm_90'}}")
        if target == "llvm":
            if arch is not None:
                raise OptionError(f"tvm backend: arch={arch!r} is for target 'cuda', the "
                                  f"target is 'llvm'")
            return {"target": "llvm"}
        if arch is not None:
            return {"target": "cuda", "arch": normalize_arch(arch)}
        if device_arch(0) is None:
            raise OptionError("tvm backend: target='cuda' takes the arch of the CUDA device, "
                              "and there is none here; to build without a GPU name the arch: "
                              "target={'kind': 'cuda', 'arch': 'sm_90'} or arch='sm_90'")
        return {"target": "cuda"}

    def for_options(self, options: Mapping[str, Any]) -> Backend:
        """The backend a Kernel compiled with ``options`` (from check_options) calls:
        target "cuda" takes CUDA tensors of 16- or 32-bit floats."""
        return CUDA_BACKEND if options.get("target") == "cuda" else self

    def default_config(self, kernel: KernelPlan, binding: Any) -> Config:
        from .space import default_config

        return default_config(kernel.kind, "cuda" if "cuda" in self.devices else "llvm")

    def lower(self, kernel: KernelPlan, binding: Any, config: Config,
              options: Mapping[str, Any]) -> Executable:
        from .lower import TVMExecutable

        target = options.get("target", "llvm")
        arch = ""
        if target == "cuda":
            index = binding.device[1] if binding.device[0] == "cuda" else 0
            arch = options.get("arch") or device_arch(index) or ""
        return TVMExecutable(kernel, binding, config, target, arch)

    def export(self, kernel: Any, path: str, *specs: Mapping[str, Any]) -> str:
        """``kernel.export(path, *specs)``: see ``export.export``."""
        from .export import export

        return export(kernel, path, *specs)

    def describe(self) -> str:
        return ("tvm: TE/TensorIR built with TVM for target llvm (CPU, float32) and cuda "
                "(f32/f16/bf16 tokens, float32 accumulation; builds without a GPU given an "
                "arch); every variant, key mask, causal state, both layouts (no varlen yet); "
                "kernel.export + gmagen.load run with TVM's runtime alone")


class TVMCudaBackend(TVMBackend):
    """The tvm backend as seen by kernels for target "cuda": CUDA arrays, tokens
    in float32 / float16 / bfloat16; native torch (CuPy callers' arrays are
    viewed as torch tensors through DLPack), or CuPy without torch.  Tunable
    (``tune.py``) where torch, TVM's compiler and a CUDA device are all present."""

    devices = ("cuda",)
    dtypes = ("f16", "bf16", "f32")

    def tuning_device(self, binding: Any) -> "dict[str, Any] | None":
        """Tuned configs are per GPU and TVM version; None without torch (the
        tuner's runner and its CUDA-event timing) or without a CUDA device (a
        compile-only lowering, arch=, has no device to key on)."""
        if binding.device[0] != "cuda" or not _has_torch():
            return None
        try:
            return dict(_device_info(binding.device[1]))
        except Exception:  # no driver or no such device (nothing is cached then)
            return None

    def validate_config(self, kernel: KernelPlan, config: Config) -> Config:
        from .space import validate

        return validate(config, "cuda", kernel.kind)

    def tune(self, program: Any, plan: Any, kernel: KernelPlan, binding: Any,
             options: Mapping[str, Any], strategy: str = "auto",
             tune_options: "Mapping[str, Any] | None" = None, space: Any = None) -> Any:
        """Tune ``kernel`` for this specialization (gmagen.autotune's loop over a
        TorchRunner: every candidate a TVM build); returns a TuneResult."""
        from gmagen.autotune.torch_runner import tune_plan

        from .tune import tuning_space

        return tune_plan(self, tuning_space, program, plan, kernel, binding, options, strategy,
                         tune_options, space)

    @property
    def native(self) -> str:  # type: ignore[override]
        import importlib.util

        return "torch" if importlib.util.find_spec("torch") is not None else "cupy"


@lru_cache(maxsize=1)
def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


@lru_cache(maxsize=None)
def _device_info(index: int) -> dict[str, Any]:
    """The tuning cache's description of CUDA device ``index`` (cached: a compiled
    kernel asks for it on every call, for its cache key)."""
    import torch
    import tvm

    p = torch.cuda.get_device_properties(index)
    return {"gpu": p.name, "capability": (int(p.major), int(p.minor)),
            "sm_count": int(p.multi_processor_count), "backend_version": str(tvm.__version__)}


def normalize_arch(arch: Any) -> str:
    """"sm_90" from "sm_90", "90", 90, "9.0" or (9, 0)."""
    text = arch
    if isinstance(arch, (tuple, list)) and len(arch) == 2:
        text = f"{arch[0]}{arch[1]}"
    text = str(text).strip().lower().removeprefix("sm_").removeprefix("sm").replace(".", "")
    if not text.isdigit() or len(text) < 2:
        raise OptionError(f"tvm backend: arch={arch!r} is not a CUDA arch; expected e.g. "
                          f"'sm_90', '90' or (9, 0)")
    return f"sm_{text}"


def device_arch(index: int = 0) -> "str | None":
    """The arch of CUDA device ``index`` as TVM's runtime sees it, None without one."""
    try:
        import tvm

        dev = tvm.cuda(index)
        if not dev.exist:
            return None
        return normalize_arch(dev.compute_version)
    except Exception:  # no CUDA runtime in this TVM, or no driver
        return None


BACKEND = TVMBackend()
CUDA_BACKEND = TVMCudaBackend()

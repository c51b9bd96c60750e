"""CuPy backend: CUDA C++ generated from the IR's plans, compiled with NVRTC,
launched through CuPy (``gmagen.compile(p, backend="cupy")``).

Lowering needs no GPU: with ``arch="sm_90"`` (any arch NVRTC knows) the
kernels are generated and compiled here, so ``kernel.source`` and the cubins
(``executable.compiled[...]``: ptxas resources, PTX) can be inspected on a CPU
machine; running needs a CUDA device.  Nothing heavy is imported here.

Arithmetic: float32 tokens run every product as exact float32 FMA on CUDA
cores (the 1e-4 contract).  float16/bfloat16 tokens run the big products on
tensor cores (config knob ``mma``, default 1; mma.py): the logits as 3xTF32
(~float32: they cancel), slot_write and the causal affinities in the token
dtype, products with the float32 state S and slot weights in bfloat16, all
accumulated in float32 -- the precisions of the Triton backend.  ``mma=0``
keeps 16-bit tokens on the CUDA-core path (a fallback to ask for, never taken
silently; the one default exception: causal scans whose MMA tiles do not fit
shared memory, K ~ 256, default to 0).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Optional

from gmagen.config import Config
from gmagen.errors import OptionError
from gmagen.ir.passes.plan import KernelPlan

from ..base import Availability, Backend, Executable


@lru_cache(maxsize=1)
def _probe() -> tuple[bool, str, bool]:
    """(can compile, reason, has a CUDA device)."""
    try:
        import cupy  # noqa: F401
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # ImportError, or a CUDA library that does not load
        return False, (f"cupy with NVRTC is not usable ({type(exc).__name__}: {exc}); "
                       f"pip install 'gmagen[cupy]'"), False
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return True, f"no CUDA device ({type(exc).__name__}: {exc})", False
    if count < 1:
        return True, "no CUDA device", False
    return True, "", True


@lru_cache(maxsize=1)
def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


@lru_cache(maxsize=None)
def _device_info(index: int) -> dict[str, Any]:
    """The tuning cache's description of CUDA device ``index``.  Cached: every call
    of a compiled kernel asks for it (its cache key), and cudaGetDeviceProperties
    took 1.2 ms of a 1.9 ms call on an H200 (benchmarks/profile_host.py)."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(index)
    name = props["name"]
    return {"gpu": name.decode() if isinstance(name, bytes) else str(name),
            "capability": (int(props["major"]), int(props["minor"])),
            "sm_count": int(props["multiProcessorCount"]),
            "backend_version": cupy.__version__}


class CupyBackend(Backend):
    name = "cupy"
    devices = ("cuda",)
    dtypes = ("f16", "bf16", "f32")
    options = {"arch": ()}

    @property
    def native(self) -> str:  # type: ignore[override]
        """"torch" when torch is installed: CuPy has no bfloat16 arrays, so torch
        callers' tensors (any dtype) are launched on as they are and CuPy callers'
        arrays are viewed as torch tensors through DLPack (gmagen.adapters.dlpack
        has no torch -> cupy conversion).  Without torch: "cupy" (CuPy callers,
        f16/f32)."""
        return "torch" if _has_torch() else "cupy"

    def availability(self) -> Availability:
        compiles, reason, device = _probe()
        if not compiles:
            return Availability(False, reason)
        if not device:
            return Availability(False, f"{reason}; kernels still generate and compile with "
                                       f"an explicit arch (arch='sm_90')")
        return Availability(True)

    def lowering_availability(self, options: Mapping[str, Any]) -> Availability:
        """Can ``lower`` run here with ``options``?  Without a device it can when an
        arch is given (for gmagen.compile's compile-only path)."""
        compiles, reason, device = _probe()
        if not compiles:
            return Availability(False, reason)
        if device or options.get("arch"):
            return Availability(True)
        return Availability(False, f"{reason}; pass arch='sm_90' to generate and compile only")

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        out = super().check_options(options)
        if "arch" in out:
            from .nvrtc import normalize_arch

            out["arch"] = normalize_arch(out["arch"])
        return out

    def default_config(self, kernel: KernelPlan, binding: Any) -> Config:
        from . import space

        dims = binding.dims
        K = dims.get("K", 64)
        # the plan's own variant (norm, mixtures, covariance): what fits mma=2 depends on it
        return space.default_config(kernel.kind, dims.get("D", 64), dims.get("Dv", K), K,
                                    binding.dtypes.get("T", "f32"),
                                    variant=_main_variant(kernel, binding))

    def tuning_device(self, binding: Any) -> Optional[dict[str, Any]]:
        """Tuned configs are per GPU, and need torch (the tuner's runner and its
        CUDA-event timing run on torch tensors).  None without a CUDA device: a
        compile-only lowering (arch=) has no device properties to key on."""
        if binding.device[0] != "cuda" or not _has_torch() or not _probe()[2]:
            return None
        return dict(_device_info(binding.device[1]))

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
        from .lower import CupyExecutable

        arch = options.get("arch") or _device_arch(binding.device[1])
        base = self.default_config(kernel, binding)
        full = base.replace(**dict(config))
        path = None
        if "mma" in config and config["mma"] != base.get("mma"):
            path = int(config["mma"])  # another path asked for (mma=1 or 0 over mma=2)
        elif base.get("mma") == 2 and "mma" not in config and not _fits(kernel, full, binding):
            path = 1  # a partial config (the user's, or a cache entry tuned before mma=2) of WMMA tiles
        if path is not None:
            # that path's default tiles, then the caller's knobs
            dims = binding.dims
            K = dims.get("K", 64)
            full = space.default_config(kernel.kind, dims.get("D", 64), dims.get("Dv", K), K,
                                        binding.dtypes.get("T", "f32"), mma=path,
                                        variant=_main_variant(kernel, binding)).replace(**dict(config))
        return CupyExecutable(kernel, binding, space.validate(kernel.kind, full), arch)

    def describe(self) -> str:
        return ("cupy: CUDA C++ through NVRTC (f32/f16/bf16, float32 accumulation; tensor "
                "cores for f16/bf16: mma.sync register fragments (mma=2) for write, read and scan, WMMA (mma=1) "
                "elsewhere); every "
                "variant, key mask, state, both layouts, any strides; compiles without a GPU "
                "given arch=; no varlen yet")


def _main_variant(kernel: KernelPlan, binding: Any) -> Any:
    """The Variant of the plan's main kernel (None where lowering will refuse the plan)."""
    from .lower import unit_variant

    try:
        return unit_variant(kernel, binding, kernel.kind)
    except (KeyError, AttributeError):
        return None


def _fits(kernel: KernelPlan, config: Config, binding: Any) -> bool:
    """Whether ``config`` is a valid config of the plan's main kernel at this
    specialization."""
    from . import space

    try:
        space.validate(kernel.kind, config, _main_variant(kernel, binding))
    except OptionError:
        return False
    return True


def _device_arch(device: int) -> str:
    try:
        import cupy

        cc = cupy.cuda.Device(device).compute_capability
    except Exception as exc:
        raise OptionError(f"cupy: no CUDA device {device} to take the arch from ({exc}); pass "
                          f"arch='sm_90' (or another) to compile without a GPU") from exc
    from .nvrtc import normalize_arch

    return normalize_arch(cc)


BACKEND = CupyBackend()

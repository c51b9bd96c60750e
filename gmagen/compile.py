"""gmagen.compile: verify -> passes -> plan -> backend.lower -> Kernel."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Union

from gmagen import knobs
from gmagen.backends.base import Availability
from gmagen.backends.registry import BACKENDS, available_backends as _available
from gmagen.backends.registry import backend_availability, get_backend
from gmagen.config import Config, as_config
from gmagen.errors import BackendUnavailable, OptionError
from gmagen.ir.passes.plan import plan_program
from gmagen.ir.program import Program
from gmagen.kernel import Kernel

log = knobs.configure_logging()

# backend="auto" tries these in order and records its pick in kernel.backend.
AUTO_ORDER = ("triton", "cupy", "tvm", "torch", "numpy")


def available_backends() -> dict[str, Availability]:
    """Each registered backend: Availability(ok, reason why not)."""
    return _available()


def _pick_auto() -> str:
    reasons = []
    for name in AUTO_ORDER:
        avail = backend_availability(name)
        if avail:
            be = get_backend(name)
            if "cuda" in be.devices and name != "numpy":
                return name
        reasons.append(f"{name}: {avail.reason or 'no GPU path'}")
    log.info("backend='auto' found no GPU backend (%s); using the numpy oracle",
             "; ".join(reasons))
    return "numpy"


def compile(program: Program, backend: str = "numpy", *,
            config: Union[None, str, Config, Mapping[str, Any]] = None,
            autotune: str = "cached", **options: Any) -> Kernel:
    """Compile ``program`` for ``backend``; returns a callable :class:`Kernel`.

    ``backend``: one of ``gmagen.available_backends()`` or "auto" (first GPU
    backend that can run here, else numpy; the pick is ``kernel.backend``).
    ``config``: tile knobs for every kernel of the plan, or a dict from kernel
    name (``"gma_write"``) to knobs; default: the backend's heuristic.
    ``autotune``: where configs come from when ``config`` is not given:
    "cached" (default: the user's autotune cache, then the caches shipped with
    gmagen, else the backend's heuristic; never tunes), "on-miss" (tune the first
    time a problem is seen, then cache) or "off" (the heuristic).
    ``options``: backend options (e.g. ``precision="tf32"`` for triton)."""
    if not isinstance(program, Program):
        raise OptionError(f"compile: program must be a gmagen Program (e.g. gmagen.gma()), "
                          f"got {type(program).__name__}")
    from gmagen.autotune import check_mode

    check_mode(autotune)
    name = _pick_auto() if backend == "auto" else backend
    be = get_backend(name, options)  # options may allow compile-only (cupy arch="sm_90")
    opts = be.check_options(options)
    specialize = getattr(be, "for_options", None)
    if specialize is not None:
        be = specialize(opts)  # e.g. tvm target="cuda": CUDA tensors, f16/bf16 tokens
    cfg: Any
    plan = plan_program(program)
    kernel_names = {k.name for k in plan.kernels}
    # a dict keyed by kernel names ("gma_write") is per kernel; any other is one config
    if isinstance(config, Mapping) and not isinstance(config, Config) and config and all(
            str(k).startswith("gma_") for k in config):
        unknown = set(config) - kernel_names
        if unknown:
            raise OptionError(f"config names kernels {sorted(unknown)}, but the plan of "
                              f"{program.name} has {sorted(kernel_names)}")
        cfg = {k: as_config(v) for k, v in config.items()}
    else:
        cfg = as_config(config)
    return Kernel(program, plan, be, cfg, opts, autotune=autotune)


@lru_cache(maxsize=64)
def _responsibility_kernel(backend: str, covariance: str, layout: str, opts: str) -> Kernel:
    import json

    from gmagen.dsl import responsibilities_program

    return compile(responsibilities_program(covariance, layout), backend, **json.loads(opts))


def _options_key(options: Mapping[str, Any]) -> str:
    """Options as a hashable cache key; values may be dicts (tvm's target dicts)."""
    import json

    try:
        return json.dumps(options, sort_keys=True)
    except TypeError as exc:
        raise OptionError(f"responsibilities: options {options!r} must be plain values "
                          f"(str, int, float, bool, lists, dicts): {exc}") from exc


_COVARIANCE_BY_RANK = {3: "diag", 2: "spherical", 1: "shared"}


def responsibilities(x: Any, mean: Any, log_var: Any, logit: Any, *, backend: str = "numpy",
                     layout: str = "bnhd", **options: Any) -> Any:
    """R [B, N, H, K] (layout bnhd; [B, H, N, K] for bhnd): the posterior of each
    token over the K components. The covariance kind follows log_var's rank:
    [H, K, D] diag, [H, K] spherical, [H] shared."""
    rank = len(getattr(log_var, "shape", ()))
    if rank not in _COVARIANCE_BY_RANK:
        from gmagen.errors import ShapeError

        raise ShapeError(f"log_var has {rank} dims, expected [H, K, D] (diag), [H, K] "
                         f"(spherical) or [H] (shared)")
    kern = _responsibility_kernel(backend, _COVARIANCE_BY_RANK[rank], layout,
                                  _options_key(options))
    return kern(x, mean, log_var, logit)


__all__ = ["BACKENDS", "BackendUnavailable", "available_backends", "compile", "responsibilities"]

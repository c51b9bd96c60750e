"""``gmagen.tune``: tune a program's kernels for given shapes and store the winners
in the autotune cache, where ``gmagen.compile(..., autotune="cached")`` finds them.

Inputs are the tuner's own random tensors (the backend's runner), never the
caller's.  One result per (shape, kernel plan): the default and the tuned time,
the chosen config, how many candidates were tried and rejected.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from gmagen.errors import OptionError, UnsupportedFeature
from gmagen.ir.program import Program

SHAPE_KEYS = ("B", "N", "H", "D", "Dv", "K")
DEFAULT_BUDGET_S = 30.0  # per shape: gmagen.tune, `gmagen tune`, autotune="on-miss"
# the least a kernel plan's search gets when the plans before it used up the shape's
# budget: the default's compile and timing (its result is then the default)
MIN_PLAN_BUDGET_S = 1.0
# a search may end up to one compile (or the worker pool's grace period, 3 s) past its
# deadline: held back from the shape's budget, so that the shape stays within it
# (on an H100, 30 s per shape without it took 20.7-31.5 s for Triton)
OVERRUN_RESERVE_S = 3.0


def plan_budget(budget_s: float, elapsed_s: float, plans_left: int) -> float:
    """A kernel plan's share of one shape's ``budget_s`` (less the overrun reserve,
    at most a tenth of it): what the plans before it left, split evenly over this
    plan and those after it."""
    usable = budget_s - min(OVERRUN_RESERVE_S, 0.1 * budget_s)
    return max((usable - elapsed_s) / max(plans_left, 1), MIN_PLAN_BUDGET_S)


@dataclass(frozen=True)
class TuneRow:
    """One tuned kernel plan at one shape."""

    shape: Mapping[str, int]
    kernel: str
    key: Any                # gmagen.autotune.CacheKey
    result: Any             # gmagen.autotune.TuneResult
    seconds: float

    @property
    def speedup(self) -> float:
        return self.result.default_time.median_ms / self.result.best_time.median_ms


def _example_args(program: Program, shape: Mapping[str, int], dtype: str, device: str) -> tuple:
    """Arguments of the shape (torch, on ``device``) that pick the specialization."""
    import torch

    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    B, N, H, D, Dv, K = (int(shape[k]) for k in SHAPE_KEYS)
    tok = [torch.zeros(B, N, H, d, dtype=dt, device=device) for d in (D, D, Dv)]
    return tuple(tok) + (torch.zeros(H, K, D, device=device), torch.zeros(H, K, D, device=device),
                         torch.zeros(H, K, device=device))


def tune(program: Program, shapes: Sequence[Mapping[str, int]], backend: str = "triton", *,
         dtype: str = "bf16", strategy: str = "auto", budget_s: float = DEFAULT_BUDGET_S,
         device: Optional[str] = None, options: Optional[Mapping[str, Any]] = None,
         progress: Any = None) -> list[TuneRow]:
    """Tune every kernel plan of ``program`` (written with gmagen.gma's inputs) for
    each shape ({"B", "N", "H", "D", "Dv", "K"}) and store the results.
    ``budget_s`` is per shape, its kernel plans' searches included (split evenly
    over them, a plan's leftover going to the next: ``plan_budget``), so that one
    shape takes about ``budget_s`` whatever the plan; the default's compile and
    timing count against it.  ``progress(row)`` is called after each plan."""
    if not budget_s > 0:
        raise OptionError(f"tune: budget_s={budget_s!r}, expected seconds > 0 per shape")
    import gmagen
    from gmagen import autotune
    from gmagen.autotune.torch_runner import keep_workers

    for shape in shapes:
        missing = [k for k in SHAPE_KEYS if k not in shape]
        if missing:
            raise OptionError(f"tune: shape {dict(shape)} lacks {missing}; expected keys "
                              f"{', '.join(SHAPE_KEYS)}")
    kern = gmagen.compile(program, backend, autotune="off", **(options or {}))
    # a backend's own tuning options where the caller gave none (tvm: the cuda target,
    # since configs are tuned per GPU, not its default llvm)
    extra = {k: v for k, v in getattr(kern._backend, "tuning_options", {}).items()
             if k not in (options or {})}
    if extra:
        kern = gmagen.compile(program, backend, autotune="off", **{**(options or {}), **extra})
    be = kern._backend
    tuner = getattr(be, "tune", None)
    if tuner is None:
        raise UnsupportedFeature(f"tune: backend {backend!r} has no tuner for "
                                 f"{'/'.join(be.devices)} (options {kern.options}); configs "
                                 f"are tuned per GPU")
    dev = device or ("cuda" if "cuda" in be.devices else be.devices[0])
    rows = []
    # one pool of compile workers for the whole run (their start-up is seconds)
    with keep_workers():
        for shape in shapes:
            binding = kern.binding_for(_example_args(program, shape, dtype, dev), {})
            info = be.tuning_device(binding)
            if info is None:
                raise UnsupportedFeature(f"tune: backend {backend!r} does not tune on "
                                         f"{dev} (configs are tuned per GPU)")
            kernels = kern.plan.kernels
            shape_t0 = time.monotonic()
            for i, kp in enumerate(kernels):
                t0 = time.monotonic()
                share = plan_budget(budget_s, t0 - shape_t0, len(kernels) - i)
                result = tuner(program, kern.plan, kp, binding, kern.options, strategy,
                               {"budget_s": share})
                key = kern.tuning_key(kp, binding, info)
                autotune.default_cache().put(key, result.to_entry())
                row = TuneRow(dict(shape), kp.name, key, result, time.monotonic() - t0)
                rows.append(row)
                if progress is not None:
                    progress(row)
    return rows

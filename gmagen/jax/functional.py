"""``gmagen.jax.gma``: GMA for JAX, differentiable, usable under jit, grad and vmap.

The forward is the jax lowering of ``gmagen.gma`` (``backends/jax``).  A
``jax.custom_vjp`` keeps only the inputs for the backward pass and recomputes
the forward there under ``jax.vjp``: the responsibilities (N x K per mixture)
and the per-chunk states are never stored between the passes, the same trade
the Triton backward kernels make.  The gradients are those of the lowering,
which the tests check against the float64 oracle's analytic rules
(``gmagen.ir.oracle_grad``).
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Any, Optional

import jax

from gmagen.dsl import check_choice, check_eps, gma as gma_program
from gmagen.errors import FrameworkError, ShapeError
from gmagen.ir import ops as _ops
from gmagen.ir.passes.plan import plan_program

COVARIANCE_BY_RANK = {3: "diag", 2: "spherical", 1: "shared"}
_DTYPE_NAMES = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}


@lru_cache(maxsize=128)
def _program_function(causal: bool, norm: str, covariance: str, eps: float, layout: str,
                      chunk: int, y_dtype: str):
    """The whole program (all its kernel plans) as one pure function of a dict."""
    from gmagen.backends.jax.lower import kernel_function

    program = gma_program(causal=causal, norm=norm, covariance=covariance, eps=eps,
                          layout=layout)
    kernels = [kernel_function(kp, layout, chunk, y_dtype) for kp in plan_program(program).kernels]
    y_name, state_name = program.outputs[0], program.state

    def run(inputs: dict) -> tuple:
        env = dict(inputs)
        for fn in kernels:
            env.update(fn(env))
        return env[y_name], env[state_name]

    return run


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gma(static: tuple, q, k, v, mean, log_var, logit, key_mask, initial_state):
    run = _program_function(*static)
    return run({"q": q, "k": k, "v": v, "mean": mean, "log_var": log_var, "logit": logit,
                "key_mask": key_mask, "initial_state": initial_state})


def _gma_fwd(static, q, k, v, mean, log_var, logit, key_mask, initial_state):
    out = _gma(static, q, k, v, mean, log_var, logit, key_mask, initial_state)
    return out, (q, k, v, mean, log_var, logit, key_mask, initial_state)  # inputs only


def _gma_bwd(static, saved, cotangent):
    q, k, v, mean, log_var, logit, key_mask, initial_state = saved
    run = _program_function(*static)

    def f(q, k, v, mean, log_var, logit, initial_state):
        return run({"q": q, "k": k, "v": v, "mean": mean, "log_var": log_var, "logit": logit,
                    "key_mask": key_mask, "initial_state": initial_state})

    _, pullback = jax.vjp(f, q, k, v, mean, log_var, logit, initial_state)
    dq, dk, dv, dmean, dlog_var, dlogit, dinit = pullback(cotangent)
    return dq, dk, dv, dmean, dlog_var, dlogit, None, dinit


_gma.defvjp(_gma_fwd, _gma_bwd)


def gma(q: Any, k: Any, v: Any, mean: Any, log_var: Any, logit: Any, *, causal: bool = False,
        norm: str = "row", eps: float = _ops.DEFAULT_EPS, key_mask: Optional[Any] = None,
        initial_state: Optional[tuple[Any, Any]] = None, return_state: bool = False,
        layout: str = "bnhd", chunk: int = 64) -> Any:
    """Gaussian Mixture Attention (GMA_SPEC.md) on JAX arrays; see ``gmagen.torch.gma``
    for the shapes.  Differentiable in q, k, v, mean, log_var, logit and the
    initial state; ``chunk``: tokens per step of the causal ``lax.scan``."""
    if not isinstance(causal, bool):
        raise FrameworkError(f"gmagen.jax.gma: causal must be a bool, got {causal!r}")
    check_choice("norm", norm, _ops.NORMS)
    check_choice("layout", layout, ("bnhd", "bhnd"))
    eps = check_eps(eps)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise FrameworkError(f"gmagen.jax.gma: chunk={chunk!r}, expected an int >= 1")
    rank = getattr(log_var, "ndim", None)
    if rank not in COVARIANCE_BY_RANK:
        raise ShapeError(f"gmagen.jax.gma: log_var has shape {getattr(log_var, 'shape', None)}, "
                         f"expected [H, K, D] (diag), [H, K] (spherical) or [H] (shared)")
    for arg, t, want in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("mean", mean, 3),
                         ("logit", logit, 2)):
        if getattr(t, "ndim", None) != want:
            raise ShapeError(f"gmagen.jax.gma: {arg} has shape {getattr(t, 'shape', None)}, "
                             f"expected {want} dims")
    if q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ShapeError(f"gmagen.jax.gma: q {q.shape}, k {k.shape}, v {v.shape}: q and k "
                         f"must match, and v must share their first three dims")
    if initial_state is not None and not causal:
        raise FrameworkError("gmagen.jax.gma: initial_state is given but causal=False")
    y_dtype = _DTYPE_NAMES.get(str(v.dtype))
    if y_dtype is None:
        raise FrameworkError(f"gmagen.jax.gma: v has dtype {v.dtype}; expected a float dtype")
    static = (causal, norm, COVARIANCE_BY_RANK[rank], eps, layout, chunk, y_dtype)
    init = None if initial_state is None else tuple(initial_state)
    y, state = _gma(static, q, k, v, mean, log_var, logit, key_mask, init)
    return (y, state) if return_state else y

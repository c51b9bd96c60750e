"""Gradients of the canonical GMA program (``gmagen.gma``) for ``gmagen.torch.gma``.

Each backend's forward runs through ``gmagen.compile``; its gradients come from:

  numpy          the float64 oracle's analytic VJPs (``gmagen.ir.oracle_grad.run_vjp``)
  triton         the Triton backward kernels (``backends/triton/backward.py``)
  torch          autograd through the torch lowering (``gmagen.backends.torch.ops``),
                 recomputing the responsibilities instead of storing them, on the
                 inputs' device, in float32

Nothing else is saved for backward than the inputs: the forward keeps no N x K
responsibilities.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import numpy as np
import torch


Inputs = tuple  # (q, k, v, mean, log_var, logit, key_mask, s0, n0)
COVARIANCE_BY_RANK = {3: "diag", 2: "spherical", 1: "shared"}


@lru_cache(maxsize=128)
def _program(causal: bool, norm: str, covariance: str, eps: float, layout: str):
    from gmagen.dsl import gma
    from gmagen.ir.passes.plan import plan_program

    program = gma(causal=causal, norm=norm, covariance=covariance, eps=eps, layout=layout)
    return program, plan_program(program)


def forward_torch(q, k, v, mean, log_var, logit, key_mask, s0, n0, *, causal: bool, norm: str,
                  eps: float, layout: str):
    """y (call layout, float32/float64), S, n through the torch lowering; differentiable."""
    from gmagen.backends.torch.lower import run_ops
    from gmagen.backends.torch.ops import SCAN_CHUNK

    program, plan = _program(causal, norm, COVARIANCE_BY_RANK[log_var.dim()], eps, layout)
    env = {"q": q, "k": k, "v": v, "mean": mean, "log_var": log_var, "logit": logit,
           "key_mask": key_mask, "cu_seqlens": None,
           "initial_state": None if s0 is None else (s0, n0)}
    for kernel in plan.kernels:
        env.update(run_ops(kernel, env, layout, SCAN_CHUNK))
    s, n = env[program.state]
    return env[program.outputs[0]], s, n


def _vjp_torch(inputs: Inputs, dy, ds, dn, attrs: dict) -> list[Optional[torch.Tensor]]:
    q, k, v, mean, log_var, logit, key_mask, s0, n0 = inputs
    diff = [q, k, v, mean, log_var, logit, s0, n0]
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in diff]
        lq, lk, lv, lm, llv, llg, ls0, ln0 = leaves
        y, s, n = forward_torch(lq, lk, lv, lm, llv, llg, key_mask, ls0, ln0, **attrs)
        outs, cots = [], []
        for out, ct in ((y, dy), (s, ds), (n, dn)):
            # an output that depends on no input (N = 0: y is empty, the state is
            # the initial one or zeros) contributes nothing
            if ct is not None and out.requires_grad:
                outs.append(out)
                cots.append(ct.to(out.dtype))
        want = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(outs, want, cots, allow_unused=True) if outs else [None] * len(want)
    it = iter(grads)
    return [None if t is None else next(it) for t in leaves]


def _vjp_oracle(inputs: Inputs, dy, ds, dn, attrs: dict) -> list[Optional[torch.Tensor]]:
    from gmagen.dsl import gma
    from gmagen.ir.oracle_grad import run_vjp

    q, k, v, mean, log_var, logit, key_mask, s0, n0 = inputs
    prog = gma(causal=attrs["causal"], norm=attrs["norm"],
               covariance=COVARIANCE_BY_RANK[log_var.dim()], eps=attrs["eps"],
               layout=attrs["layout"])

    def np64(t):
        return None if t is None else t.detach().cpu().double().numpy()

    feed = {"q": np64(q), "k": np64(k), "v": np64(v), "mean": np64(mean),
            "log_var": np64(log_var), "logit": np64(logit),
            "key_mask": None if key_mask is None else key_mask.cpu().numpy()}
    if attrs["causal"] and s0 is not None:
        feed["initial_state"] = (np64(s0), np64(n0))
    cts: dict = {}
    if dy is not None:
        cts[prog.outputs[0]] = np64(dy)
    if ds is not None or dn is not None:
        cts[prog.state] = (np64(ds), np64(dn))  # a None half counts as zeros
    grads = run_vjp(prog, feed, cts)
    init = grads.get("initial_state")
    out = [grads.get(name) for name in ("q", "k", "v", "mean", "log_var", "logit")]
    out += [None, None] if init is None else list(init)
    return [None if g is None else torch.from_numpy(np.asarray(g)) for g in out]


def _vjp_triton(inputs: Inputs, dy, ds, dn, attrs: dict, state) -> list[Optional[torch.Tensor]]:
    from gmagen.backends.triton.backward import gma_backward, gma_backward_causal

    q, k, v, mean, log_var, logit, key_mask, s0, n0 = inputs
    kw = dict(norm=attrs["norm"], eps=attrs["eps"], layout=attrs["layout"])
    if attrs["causal"]:
        init = None if s0 is None else (s0, n0)
        return gma_backward_causal(q, k, v, mean, log_var, logit, key_mask, init, dy, (ds, dn),
                                   **kw)
    return gma_backward(q, k, v, mean, log_var, logit, key_mask, state, dy, (ds, dn),
                        **kw) + [None, None]


def has_kernels(backend: str, causal: bool) -> bool:
    """Gradients computed outside torch autograd (by an opaque custom op)."""
    return backend in ("numpy", "triton")


def vjp(backend: str, inputs: Inputs, dy, ds, dn, attrs: dict,
        state=None) -> list[Optional[torch.Tensor]]:
    """dL/d(q, k, v, mean, log_var, logit, s0, n0), each in its input's dtype and
    device (None where the input is None).  ``state``: the forward's (S, n)."""
    if backend == "numpy":
        grads = _vjp_oracle(inputs, dy, ds, dn, attrs)
    elif backend == "triton":
        grads = _vjp_triton(inputs, dy, ds, dn, attrs, state)
    else:
        grads = _vjp_torch(inputs, dy, ds, dn, attrs)
    diff = [inputs[i] for i in (0, 1, 2, 3, 4, 5, 7, 8)]
    return [None if t is None else (torch.zeros_like(t) if g is None else
                                    g.to(device=t.device, dtype=t.dtype))
            for t, g in zip(diff, grads)]

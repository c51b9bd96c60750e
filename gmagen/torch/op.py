"""``torch.ops.gmagen.gma`` and its backward as torch.library custom ops.

Custom ops (rather than a plain autograd.Function) so that ``torch.compile``
traces models calling ``gmagen.torch.gma`` without graph breaks: the fake
implementations give the output shapes, and the backward is an op of its own,
so compiled training graphs keep it too.

The forward always returns the state (S, n) beside y: it is O(K * Dv) per head,
and the state's gradient flows back when the caller uses it (streaming).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from . import grad as _grad

COVARIANCE_BY_RANK = _grad.COVARIANCE_BY_RANK


@lru_cache(maxsize=128)
def _kernel(causal: bool, norm: str, covariance: str, eps: float, layout: str, backend: str):
    import gmagen

    program = gmagen.gma(causal=causal, norm=norm, covariance=covariance, eps=eps, layout=layout)
    return gmagen.compile(program, backend=backend)


def state_dtype(v: Tensor) -> torch.dtype:
    """States accumulate in float32 (float64 for float64 values), GMA_SPEC."""
    return torch.float64 if v.dtype == torch.float64 else torch.float32


def _shapes(q: Tensor, v: Tensor, mean: Tensor, layout: str) -> tuple[int, int, int, int]:
    B = q.shape[0]
    H = q.shape[2] if layout == "bnhd" else q.shape[1]
    return B, H, mean.shape[1], v.shape[-1]


def _fresh(t: Tensor, inputs: tuple) -> Tensor:
    """Custom ops may not return an alias of an input (e.g. an initial state
    passed through unchanged)."""
    for x in inputs:
        if x is not None and x.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            return t.clone()
    return t


@torch.library.custom_op("gmagen::gma", mutates_args=())
def gma_op(q: Tensor, k: Tensor, v: Tensor, mean: Tensor, log_var: Tensor, logit: Tensor,
           key_mask: Optional[Tensor], s0: Optional[Tensor], n0: Optional[Tensor],
           causal: bool, norm: str, eps: float, layout: str,
           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    kern = _kernel(causal, norm, COVARIANCE_BY_RANK[log_var.dim()], eps, layout, backend)
    # DLPack refuses tensors that require grad; autograd is handled around this op
    q, k, v, mean, log_var, logit = (t.detach() for t in (q, k, v, mean, log_var, logit))
    opt = {} if s0 is None else {"initial_state": (s0.detach(), n0.detach())}
    y, (s, n) = kern(q, k, v, mean, log_var, logit, key_mask=key_mask, return_state=True, **opt)
    sd = state_dtype(v)
    inputs = (q, k, v, mean, log_var, logit, key_mask, s0, n0)
    y = _fresh(y.to(v.dtype).contiguous(), inputs)  # the fake promises a contiguous y
    return y, _fresh(s.to(device=v.device, dtype=sd).contiguous(), inputs), _fresh(
        n.to(device=v.device, dtype=sd).contiguous(), inputs)


@gma_op.register_fake
def _(q, k, v, mean, log_var, logit, key_mask, s0, n0, causal, norm, eps, layout, backend):
    B, H, K, Dv = _shapes(q, v, mean, layout)
    sd = state_dtype(v)
    return (v.new_empty(v.shape), v.new_empty((B, H, K, Dv), dtype=sd),
            v.new_empty((B, H, K), dtype=sd))


# gradients from the oracle (backend="numpy") or the Triton backward kernels
@torch.library.custom_op("gmagen::gma_backward", mutates_args=())
def gma_backward_op(dy: Tensor, ds: Tensor, dn: Tensor, q: Tensor, k: Tensor, v: Tensor,
                    mean: Tensor, log_var: Tensor, logit: Tensor, key_mask: Optional[Tensor],
                    s0: Optional[Tensor], n0: Optional[Tensor], s: Tensor, n: Tensor,
                    causal: bool, norm: str, eps: float, layout: str,
                    backend: str) -> list[Tensor]:
    """[dq, dk, dv, dmean, dlog_var, dlogit] (+ [ds0, dn0] when s0 is given)."""
    attrs = dict(causal=causal, norm=norm, eps=eps, layout=layout)
    grads = _grad.vjp(backend, (q, k, v, mean, log_var, logit, key_mask, s0, n0), dy, ds, dn,
                      attrs, state=(s, n))
    return [g for g in grads if g is not None]


@gma_backward_op.register_fake
def _(dy, ds, dn, q, k, v, mean, log_var, logit, key_mask, s0, n0, s, n, causal, norm, eps,
      layout, backend):
    outs = [torch.empty_like(t) for t in (q, k, v, mean, log_var, logit)]
    if s0 is not None:
        outs += [torch.empty_like(s0), torch.empty_like(n0)]
    return outs


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mean, log_var, logit, key_mask, s0, n0, causal, norm, eps, layout, backend = inputs
    # the inputs and the O(K * Dv) state: responsibilities are recomputed in backward
    ctx.save_for_backward(q, k, v, mean, log_var, logit, key_mask, s0, n0, output[1], output[2])
    ctx.attrs = (causal, norm, eps, layout, backend)


def _backward(ctx, dy, ds, dn):
    q, k, v, mean, log_var, logit, key_mask, s0, n0, s, n = ctx.saved_tensors
    causal, norm, eps, layout, backend = ctx.attrs
    # unused outputs may come back as None: their cotangent is zero
    dy = torch.zeros_like(v) if dy is None else dy
    B, H, K, Dv = _shapes(q, v, mean, layout)
    sd = state_dtype(v)
    ds = v.new_zeros((B, H, K, Dv), dtype=sd) if ds is None else ds
    dn = v.new_zeros((B, H, K), dtype=sd) if dn is None else dn
    if _grad.has_kernels(backend, causal):  # NumPy or Triton: opaque to tracing, an op
        grads = gma_backward_op(dy, ds, dn, q, k, v, mean, log_var, logit, key_mask, s0, n0,
                                s, n, causal, norm, eps, layout, backend)
    else:
        # torch ops recomputing the responsibilities, differentiated by autograd here,
        # in the backward pass (as torch.utils.checkpoint does): inside a custom op
        # autograd would not record them
        grads = [g for g in _grad.vjp(backend, (q, k, v, mean, log_var, logit, key_mask, s0, n0),
                                      dy, ds, dn, dict(causal=causal, norm=norm, eps=eps,
                                                       layout=layout)) if g is not None]
    dq, dk, dv, dmean, dlv, dlogit = grads[:6]
    ds0, dn0 = (grads[6], grads[7]) if s0 is not None else (None, None)
    return (dq, dk, dv, dmean, dlv, dlogit, None, ds0, dn0, None, None, None, None, None)


gma_op.register_autograd(_backward, setup_context=_setup_context)

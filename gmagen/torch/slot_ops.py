"""The two halves of bidirectional GMA as differentiable torch functions, on any
backend: ``slot_write`` (keys and values -> the memory (S, n)) and
``slot_read`` (queries and a given memory -> y).

Context parallelism (context_parallel.py) needs them apart: each rank writes its
shard's memory, the memories are summed over the ranks, and each rank reads the
sum.  Running each half alone costs what it costs inside one bidirectional call;
before, a rank ran a whole bidirectional call for the write (its read unused)
and a causal scan with every key masked for the read, ~2.6x the work of one
call on the shard (Triton's H100 timings: a causal call is ~1.65x a
bidirectional one).

Forward: ``gmagen.compile`` of ``gmagen.dsl.slot_write_program`` /
``slot_read_program`` on the chosen backend.  Backward:

  triton   the write and read halves of the bidirectional backward kernels
           (``backends/triton/backward.py``: slot_write_backward, slot_read_backward)
  numpy    the float64 oracle's analytic VJPs of the same programs
  others   autograd through the torch lowering's ops, recomputing the
           responsibilities (as gmagen.torch.grad does for them)

Nothing of size N x K is kept for backward: only the inputs (and, for the read,
the O(K * Dv) memory).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from torch.utils.checkpoint import checkpoint

from .grad import COVARIANCE_BY_RANK
from .op import state_dtype


@lru_cache(maxsize=64)
def _write_program(covariance: str, layout: str):
    from gmagen.dsl import slot_write_program

    return slot_write_program(covariance, layout=layout)


@lru_cache(maxsize=64)
def _read_program(norm: str, covariance: str, eps: float, layout: str):
    from gmagen.dsl import slot_read_program

    return slot_read_program(norm, covariance, eps, layout=layout)


@lru_cache(maxsize=128)
def _compiled(program, backend: str):
    import gmagen

    return gmagen.compile(program, backend=backend)


def _tokens_bnhd(t: Tensor, layout: str) -> Tensor:
    """A token tensor as a logical [B, N, H, X] view."""
    return t.transpose(1, 2) if layout == "bhnd" else t


def torch_write(k, v, mean, log_var, logit, key_mask, layout: str) -> tuple[Tensor, Tensor]:
    """slot_write with the torch lowering's ops (differentiable): [B, H, K, Dv], [B, H, K]."""
    from gmagen.backends.torch import ops as torch_ops

    k, v = _tokens_bnhd(k, layout), _tokens_bnhd(v, layout)
    r = torch_ops.responsibility(k, mean, log_var, logit, COVARIANCE_BY_RANK[log_var.dim()])
    s, n = torch_ops.slot_write(r, v, key_mask)
    sd = state_dtype(v)
    return s.to(sd), n.to(sd)


def torch_read(q, v_dtype: torch.dtype, mean, log_var, logit, s, n, norm: str, eps: float,
               layout: str) -> Tensor:
    """slot_read with the torch lowering's ops (differentiable); y in ``v_dtype``, in the
    call's layout."""
    from gmagen.backends.torch import ops as torch_ops

    r = torch_ops.responsibility(_tokens_bnhd(q, layout), mean, log_var, logit,
                                 COVARIANCE_BY_RANK[log_var.dim()])
    y = torch_ops.slot_read(r, (s, n), norm=norm, eps=eps).to(v_dtype)
    return _tokens_bnhd(y, layout)


def _checkpointed(fn, *args):
    """Recompute in backward instead of keeping the [B, N, H, K] responsibilities (as
    ``gmagen.torch.grad`` does for the torch backend)."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _np64(t: Optional[Tensor]):
    return None if t is None else t.detach().cpu().double().numpy()


def _like(grads: list, inputs: list) -> list:
    """Each gradient in its input's dtype and device; zeros where none came back."""
    return [torch.zeros_like(t) if g is None else
            torch.as_tensor(g).to(device=t.device, dtype=t.dtype)  # NumPy (oracle) or torch
            for t, g in zip(inputs, grads)]


def _torch_vjp(fn, diff: list, cotangents: list, *rest) -> list:
    """Gradients of fn(*diff, *rest) w.r.t. ``diff`` for the given output cotangents,
    by autograd through the torch lowering (recomputed here, in backward)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in diff]
        outs = fn(*leaves, *rest)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, c.to(o.dtype)) for o, c in zip(outs, cotangents)
                 if c is not None and o.requires_grad]
        if not pairs:
            return [None] * len(leaves)
        return list(torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs],
                                        allow_unused=True))


class _SlotWrite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, mean, log_var, logit, key_mask, layout, backend):
        ctx.save_for_backward(k, v, mean, log_var, logit, key_mask)
        ctx.attrs = (layout, backend)
        cov = COVARIANCE_BY_RANK[log_var.dim()]
        kern = _compiled(_write_program(cov, layout), backend)
        s, n = kern(*(t.detach() for t in (k, v, mean, log_var, logit)), key_mask=key_mask)
        sd = state_dtype(v)
        return (s.to(device=v.device, dtype=sd).contiguous(),
                n.to(device=v.device, dtype=sd).contiguous())

    @staticmethod
    def backward(ctx, ds, dn):
        k, v, mean, log_var, logit, key_mask = ctx.saved_tensors
        layout, backend = ctx.attrs
        diff = [k, v, mean, log_var, logit]
        if backend == "triton":
            from gmagen.backends.triton.backward import slot_write_backward

            grads = slot_write_backward(k, v, mean, log_var, logit, key_mask, (ds, dn),
                                        layout=layout)
        elif backend == "numpy":
            from gmagen.ir.oracle_grad import run_vjp

            prog = _write_program(COVARIANCE_BY_RANK[log_var.dim()], layout)
            feed = dict(zip(("k", "v", "mean", "log_var", "logit"), map(_np64, diff)))
            feed["key_mask"] = None if key_mask is None else key_mask.cpu().numpy()
            g = run_vjp(prog, feed, {prog.outputs[0]: (_np64(ds), _np64(dn))})
            grads = [g.get(name) for name in ("k", "v", "mean", "log_var", "logit")]
        else:
            grads = _torch_vjp(torch_write, diff, [ds, dn], key_mask, layout)
        return (*_like(grads, diff), None, None, None)


class _SlotRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, mean, log_var, logit, s, n, v_dtype, norm, eps, layout, backend):
        ctx.save_for_backward(q, mean, log_var, logit, s, n)
        ctx.attrs = (v_dtype, norm, eps, layout, backend)
        cov = COVARIANCE_BY_RANK[log_var.dim()]
        kern = _compiled(_read_program(norm, cov, eps, layout), backend)
        y = kern(*(t.detach() for t in (q, mean, log_var, logit)), (s.detach(), n.detach()))
        return y.to(device=q.device, dtype=v_dtype)

    @staticmethod
    def backward(ctx, dy):
        q, mean, log_var, logit, s, n = ctx.saved_tensors
        v_dtype, norm, eps, layout, backend = ctx.attrs
        diff = [q, mean, log_var, logit, s, n]
        if backend == "triton":
            from gmagen.backends.triton.backward import slot_read_backward

            grads = slot_read_backward(q, mean, log_var, logit, (s, n), dy.to(v_dtype),
                                       norm=norm, eps=eps, layout=layout)
        elif backend == "numpy":
            from gmagen.ir.oracle_grad import run_vjp

            prog = _read_program(norm, COVARIANCE_BY_RANK[log_var.dim()], eps, layout)
            feed = dict(zip(("q", "mean", "log_var", "logit"), map(_np64, diff)))
            feed["memory"] = (_np64(s), _np64(n))
            g = run_vjp(prog, feed, {prog.outputs[0]: _np64(dy)})
            grads = [g.get(name) for name in ("q", "mean", "log_var", "logit")]
            grads += list(g.get("memory") or (None, None))
        else:
            grads = _torch_vjp(
                lambda q_, m_, lv_, lg_, s_, n_: torch_read(q_, v_dtype, m_, lv_, lg_, s_, n_,
                                                            norm, eps, layout), diff, [dy])
        return (*_like(grads, diff), None, None, None, None, None)


def slot_write(k: Tensor, v: Tensor, mean: Tensor, log_var: Tensor, logit: Tensor,
               key_mask: Optional[Tensor] = None, *, layout: str = "bnhd",
               backend: str = "torch") -> tuple[Tensor, Tensor]:
    """(S [B, H, K, Dv], n [B, H, K]) of the keys, float32 (float64 for float64 v),
    differentiable w.r.t. k, v and the mixture."""
    if backend == "torch":  # the lowering's ops are differentiable as they are
        return _checkpointed(torch_write, k, v, mean, log_var, logit, key_mask, layout)
    return _SlotWrite.apply(k, v, mean, log_var, logit, key_mask, layout, backend)


def slot_read(q: Tensor, mean: Tensor, log_var: Tensor, logit: Tensor, s: Tensor, n: Tensor,
              *, v_dtype: torch.dtype, norm: str = "row", eps: float = 1e-6,
              layout: str = "bnhd", backend: str = "torch") -> Tensor:
    """y of the queries reading the memory (S, n), in ``v_dtype`` and the call's layout;
    differentiable w.r.t. q, the mixture and the memory."""
    if backend == "torch":
        return _checkpointed(torch_read, q, v_dtype, mean, log_var, logit, s, n, norm, eps,
                             layout)
    return _SlotRead.apply(q, mean, log_var, logit, s, n, v_dtype, norm, eps, layout, backend)

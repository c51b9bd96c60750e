"""``gmagen.torch.gma``: the differentiable functional form of GMA for torch."""

from __future__ import annotations

import logging
from typing import Optional, Union

import torch
from torch import Tensor

from gmagen.backends.registry import backend_availability
from gmagen.dsl import check_choice, check_eps
from gmagen.errors import BackendUnavailable, FrameworkError, ShapeError, UnsupportedFeature
from gmagen.ir import ops as _ops

from .op import gma_op

log = logging.getLogger("gmagen")

# backends that can run gmagen.torch.gma (their gradients: gmagen/torch/grad.py)
BACKENDS = ("triton", "torch", "numpy")
_picked: set = set()


def pick_backend(device: torch.device) -> str:
    """backend=None: triton for CUDA tensors when it can run, else the torch lowering."""
    if device.type == "cuda":
        avail = backend_availability("triton")
        name = "triton" if avail else "torch"
        why = "" if avail else f" (triton cannot run here: {avail.reason})"
    else:
        name, why = "torch", ""
    if (device.type, name) not in _picked:  # say it once per device kind
        _picked.add((device.type, name))
        log.info("gmagen.torch.gma: backend=None picked %r for %s tensors%s", name, device.type,
                 why)
    return name


def _check_tensor(arg: str, t: object, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise FrameworkError(f"gmagen.torch.gma: {arg} must be a torch.Tensor, got "
                             f"{type(t).__name__}")


def _check_backward_dims(q: Tensor, v: Tensor, mean: Tensor) -> None:
    """Refuse before the forward runs what the Triton backward kernels cannot do."""
    from gmagen.backends.triton.backward import MAX_CUDA_DIM

    D, Dv, K = q.shape[-1], v.shape[-1], mean.shape[1]
    if max(D, Dv, K) > MAX_CUDA_DIM:
        raise UnsupportedFeature(
            f"gmagen.torch.gma: backend='triton' with gradients on CUDA supports D, Dv, K up to "
            f"{MAX_CUDA_DIM}; got D={D}, Dv={Dv}, K={K} (the forward alone runs up to 256; "
            "backend='torch' differentiates any size)")


def gma(q: Tensor, k: Tensor, v: Tensor, mean: Tensor, log_var: Tensor, logit: Tensor, *,
        causal: bool = False, norm: str = "row", eps: float = _ops.DEFAULT_EPS,
        key_mask: Optional[Tensor] = None,
        initial_state: Optional[tuple[Tensor, Tensor]] = None, return_state: bool = False,
        layout: str = "bnhd", backend: Optional[str] = None,
        cp_group: Optional["torch.distributed.ProcessGroup"] = None
        ) -> Union[Tensor, tuple[Tensor, tuple[Tensor, Tensor]]]:
    """Gaussian Mixture Attention (GMA_SPEC.md), differentiable in every float input.

    q, k [B, N, H, D] and v [B, N, H, Dv] (layout "bhnd": [B, H, N, X]); mean
    [H, K, D]; log_var [H, K, D] (diag), [H, K] (spherical) or [H] (shared);
    logit [H, K]; key_mask [B, N] bool (False keys write nothing);
    initial_state (S [B, H, K, Dv], n [B, H, K]) for causal streaming.
    Returns y [B, N, H, Dv] in v's dtype, and with ``return_state`` the state
    (S, n) after the last token (bidirectional: of the whole sequence), float32.

    backend: "triton", "torch", "numpy" (the float64 oracle, CPU), or None:
    triton for CUDA tensors, the torch lowering otherwise (the pick is logged at
    GMAGEN_LOG=info).  Gradients: see ``gmagen.torch.grad``.

    cp_group: a torch.distributed process group over which the sequence is
    sharded (context parallelism, ``gmagen.torch.context_parallel``): q, k, v and
    key_mask hold this rank's contiguous piece of the tokens (rank order is
    sequence order; pieces may differ in length or be empty), y is this rank's
    piece of the whole sequence's output; initial_state enters rank 0's piece,
    the returned state is the whole sequence's on every rank.  Mixture
    gradients are this rank's share (sum them over the group, as DDP does)."""
    for arg, t in (("q", q), ("k", k), ("v", v), ("mean", mean), ("log_var", log_var),
                   ("logit", logit)):
        _check_tensor(arg, t)
    _check_tensor("key_mask", key_mask, optional=True)
    if not isinstance(causal, bool):
        raise FrameworkError(f"gmagen.torch.gma: causal must be a bool, got {causal!r}")
    check_choice("norm", norm, _ops.NORMS)
    check_choice("layout", layout, ("bnhd", "bhnd"))
    eps = check_eps(eps)
    if log_var.dim() not in (1, 2, 3):
        raise ShapeError(f"gmagen.torch.gma: log_var has shape {list(log_var.shape)}, expected "
                         f"[H, K, D] (diag), [H, K] (spherical) or [H] (shared)")
    s0 = n0 = None
    if initial_state is not None:
        if not causal:
            raise FrameworkError("gmagen.torch.gma: initial_state is given but causal=False; "
                                 "a bidirectional call reads its whole sequence")
        if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
            raise FrameworkError("gmagen.torch.gma: initial_state must be a pair (S, n), got "
                                 f"{type(initial_state).__name__}")
        s0, n0 = initial_state
        _check_tensor("initial_state[0]", s0)
        _check_tensor("initial_state[1]", n0)
    if backend is None:
        backend = pick_backend(q.device)
    elif backend not in BACKENDS:
        raise BackendUnavailable(f"gmagen.torch.gma: backend={backend!r}; expected one of "
                                 f"{', '.join(BACKENDS)} or None")
    if backend == "triton" and q.device.type == "cuda" and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, mean, log_var, logit, s0, n0)):
        _check_backward_dims(q, v, mean)
    if cp_group is not None:
        from .context_parallel import gma_context_parallel

        return gma_context_parallel(q, k, v, mean, log_var, logit, group=cp_group,
                                    causal=causal, norm=norm, eps=eps, key_mask=key_mask,
                                    initial_state=None if s0 is None else (s0, n0),
                                    return_state=return_state, layout=layout, backend=backend)
    y, s, n = gma_op(q, k, v, mean, log_var, logit, key_mask, s0, n0, causal, norm, eps, layout,
                     backend)
    return (y, (s, n)) if return_state else y

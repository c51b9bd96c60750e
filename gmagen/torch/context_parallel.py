"""Context parallelism for ``gmagen.torch.gma(..., cp_group=group)`` (issue 9).

One sequence is sharded over the ranks of a torch.distributed process group:
rank i of the group holds the i-th contiguous piece of the tokens (q, k, v and
key_mask; shards may differ in length, a shard may be empty).  The mixture
parameters are replicated.  Only the K-slot state (S [B, H, K, Dv], n [B, H, K],
GMA_SPEC "causal_scan") ever crosses ranks, never q, k or v:

  bidirectional   local slot_write -> one all_reduce(SUM) of (S, n) -> local
                  slot_read of the global memory.  Backward: the all_reduce of
                  (dS, dn).
  causal          local slot_write (the shard's own state) -> a ring pass of
                  the exclusive prefix: rank i receives the state entering its
                  shard from rank i-1, adds its own and sends the sum to rank
                  i+1 -> the local causal scan starting from the incoming state.
                  Backward: the same pass in reverse order carries the gradient
                  of each incoming state back to the earlier ranks.

Traffic per call and rank, in units of one state, (K*Dv + K) elements per batch
entry and head, in the state dtype (float32; float64 for float64 values):

  bidirectional   forward 2(W-1)/W (ring all_reduce), backward 2(W-1)/W
  causal          forward 1 (send), +1 with return_state (broadcast of the
                  final state from the last rank); backward 1, +1 with
                  return_state (reduce of its gradient to the last rank)

so at most 2 states whatever N and the world size W.  The ring's latency grows
with W (W-1 sequential hops of one small message); a log-depth scan would take
ceil(log2 W) rounds but send ceil(log2 W) states per rank, past the 2-state
budget for W > 4.  The bytes are counted at the call sites from the tensors
handed to each collective (``last_exchange``), with the per-rank send volume of
the ring algorithms (all_reduce: 2(W-1)/W of the payload; send, broadcast and
reduce: at most the payload once).

The local causal scan is ``torch.ops.gmagen.gma`` with the incoming state as
initial state (any backend of ``gmagen.torch.gma``, with its gradients).  The
local slot_write and slot_read are ``slot_ops.slot_write`` / ``slot_read``: the
two halves of a bidirectional call compiled apart (``gmagen.dsl``'s
slot_write_program and slot_read_program) on the same backend, with the
matching halves of its backward, so a rank does the work of one bidirectional
call on its shard and no more.

Collective semantics: every rank of the group makes the same calls with the same
B, H, K, Dv, flags and dtypes, and, when training, backpropagates through every
call's outputs (as with DDP): the backward passes run collectives too.  Use a
cp_group of its own, not the group a DDP/FSDP wrapper reduces gradients on: its
asynchronous bucket reductions could interleave with these collectives in a
different order on different ranks.  The caller's ``initial_state`` (causal) is
the state entering the whole sequence, i.e. rank 0's shard; only rank 0's value
is read (the other ranks may pass the same value or None) and only rank 0 gets
its gradient (zeros elsewhere, so that the sum over the group is the full
gradient, as for the mixture parameters).  ``return_state=True`` returns the
state of the whole sequence on every rank.  Communication runs through blocking
torch.distributed calls (gloo on CPU, NCCL on GPUs, where NCCL orders them after
the work queued on the current stream); nothing overlaps them with compute yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from gmagen.errors import FrameworkError

from . import slot_ops
from .op import gma_op, state_dtype


# -- bytes exchanged ---------------------------------------------------------------

@dataclass(frozen=True)
class Exchange:
    """What this rank sent in one pass (forward or backward) of one call."""

    variant: str  # "bidirectional" | "causal"
    direction: str  # "forward" | "backward"
    world_size: int
    bytes_sent: int
    collectives: int  # collective / point-to-point calls made
    state_bytes: int  # one (S, n) payload: B * H * (K*Dv + K) * itemsize


_last: dict[str, Exchange] = {}
_totals = {"forward": 0, "backward": 0}


def last_exchange(direction: str = "forward") -> Optional[Exchange]:
    """The record of this process's last context-parallel forward (or backward) pass."""
    return _last.get(direction)


def last_bytes_exchanged(direction: str = "forward") -> int:
    """Bytes this rank sent in its last context-parallel forward (or backward) pass."""
    rec = _last.get(direction)
    return 0 if rec is None else rec.bytes_sent


def total_bytes_exchanged() -> dict[str, int]:
    """Bytes sent by this rank since the start (or ``reset_stats``), per direction."""
    return dict(_totals)


def reset_stats() -> None:
    _last.clear()
    for key in _totals:
        _totals[key] = 0


class _Meter:
    """Counts one pass's traffic; a fresh one per pass (no per-call state elsewhere)."""

    def __init__(self, variant: str, direction: str, world: int, state_bytes: int):
        self.variant, self.direction, self.world = variant, direction, world
        self.state_bytes = state_bytes
        self.sent = 0
        self.calls = 0

    def add(self, payload: int, fraction: float = 1.0) -> None:
        self.sent += math.ceil(payload * fraction)
        self.calls += 1

    def close(self) -> None:
        _last[self.direction] = Exchange(self.variant, self.direction, self.world, self.sent,
                                         self.calls, self.state_bytes)
        _totals[self.direction] += self.sent


# -- the state as one flat message ----------------------------------------------------

def _pack(s: Tensor, n: Tensor) -> Tensor:
    """(S [B, H, K, Dv], n [B, H, K]) -> one contiguous buffer (a copy)."""
    return torch.cat([s.reshape(-1), n.reshape(-1)])


def _unpack(buf: Tensor, s_shape: torch.Size, n_shape: torch.Size) -> tuple[Tensor, Tensor]:
    m = math.prod(s_shape)
    return buf[:m].view(s_shape), buf[m:].view(n_shape)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class _AllReduceState(torch.autograd.Function):
    """S = sum over ranks of the shards' S (and n); backward: the same sum of (dS, dn)."""

    @staticmethod
    def forward(ctx, s: Tensor, n: Tensor, group) -> tuple[Tensor, Tensor]:
        ctx.group, ctx.shapes = group, (s.shape, n.shape)
        return _all_reduce(_pack(s, n), group, "forward", ctx.shapes)

    @staticmethod
    def backward(ctx, ds: Tensor, dn: Tensor):
        return _all_reduce(_pack(ds, dn), ctx.group, "backward", ctx.shapes) + (None,)


def _all_reduce(buf: Tensor, group, direction: str, shapes) -> tuple[Tensor, Tensor]:
    world = dist.get_world_size(group)
    meter = _Meter("bidirectional", direction, world, _nbytes(buf))
    if world > 1:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        meter.add(_nbytes(buf), 2 * (world - 1) / world)  # ring: reduce-scatter + all-gather
    meter.close()
    return _unpack(buf, *shapes)


class _RingScan(torch.autograd.Function):
    """Exclusive prefix sum of the shards' states along the ranks.

    Rank i gets in_i = S0 + sum_{j<i} S_j (S0: the caller's initial state, on rank 0)
    and, with ``with_total``, the state of the whole sequence, in_{W-1} + S_{W-1}.
    Backward, with g_i the gradient of in_i and t_i that of the total: the total's
    gradient sum_i t_i is reduced to the last rank, then passes i = W-1 .. 0 carry
    G_i = sum_{j>i} g_j (+ sum t): dS_i = G_i, dS0 = g_0 + G_0."""

    @staticmethod
    def forward(ctx, s_loc: Tensor, n_loc: Tensor, s0: Optional[Tensor], n0: Optional[Tensor],
                group, with_total: bool):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        ctx.group, ctx.with_total, ctx.has_s0 = group, with_total, s0 is not None
        ctx.shapes = (s_loc.shape, n_loc.shape)
        local = _pack(s_loc, n_loc)
        meter = _Meter("causal", "forward", world, _nbytes(local))
        if rank == 0:
            incoming = _pack(s0, n0) if s0 is not None else torch.zeros_like(local)
        # other ranks ignore their s0 (and give it a zero gradient)
        else:
            incoming = torch.empty_like(local)
            dist.recv(incoming, src=dist.get_global_rank(group, rank - 1), group=group)
        out = incoming + local  # [B*H*(K*Dv + K)]: the state after this shard
        if rank < world - 1:
            dist.send(out, dst=dist.get_global_rank(group, rank + 1), group=group)
            meter.add(_nbytes(out))
        result = _unpack(incoming, *ctx.shapes)
        if with_total:
            total = out if rank == world - 1 else torch.empty_like(out)
            if world > 1:
                dist.broadcast(total, src=dist.get_global_rank(group, world - 1), group=group)
                meter.add(_nbytes(total))
            result += _unpack(total, *ctx.shapes)
        meter.close()
        return result

    @staticmethod
    def backward(ctx, *grads):
        group = ctx.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        g_in = _pack(grads[0], grads[1])
        meter = _Meter("causal", "backward", world, _nbytes(g_in))
        g_out = torch.zeros_like(g_in)  # gradient of the state after this shard
        if ctx.with_total:
            g_tot = _pack(grads[2], grads[3])
            if world > 1:
                dist.reduce(g_tot, dst=dist.get_global_rank(group, world - 1), group=group)
                meter.add(_nbytes(g_tot))
            if rank == world - 1:
                g_out = g_tot
        if rank < world - 1:
            from_next = torch.empty_like(g_in)
            dist.recv(from_next, src=dist.get_global_rank(group, rank + 1), group=group)
            g_out = g_out + from_next
        g_incoming = g_in + g_out
        if rank > 0:
            dist.send(g_incoming, dst=dist.get_global_rank(group, rank - 1), group=group)
            meter.add(_nbytes(g_incoming))
        meter.close()
        ds_loc, dn_loc = _unpack(g_out, *ctx.shapes)
        ds0 = dn0 = None
        if ctx.has_s0:
            ds0, dn0 = _unpack(g_incoming if rank == 0 else torch.zeros_like(g_incoming),
                               *ctx.shapes)
        return ds_loc, dn_loc, ds0, dn0, None, None


class _Zeros(torch.autograd.Function):
    """Zero outputs that keep their inputs in the autograd graph.

    An empty shard computes nothing, but its rank must still take part in the
    backward pass's collectives and give its inputs (zero) gradients like every
    other rank; with constant outputs autograd would skip it."""

    @staticmethod
    def forward(ctx, specs, *inputs):
        ctx.like = [(t.shape, t.dtype, t.device) if isinstance(t, Tensor) else None
                    for t in inputs]
        return tuple(torch.zeros(shape, dtype=dtype, device=device)
                     for shape, dtype, device in specs)

    @staticmethod
    def backward(ctx, *grads):
        return (None,) + tuple(None if like is None else torch.zeros(like[0], dtype=like[1],
                                                                      device=like[2])
                               for like in ctx.like)


# -- the local parts ----------------------------------------------------------------------

def _state_specs(q: Tensor, v: Tensor, mean: Tensor, layout: str):
    B, H = q.shape[0], q.shape[2] if layout == "bnhd" else q.shape[1]
    K, Dv, sd = mean.shape[1], v.shape[-1], state_dtype(v)
    return [((B, H, K, Dv), sd, v.device), ((B, H, K), sd, v.device)]


def _slot_write(k, v, mean, log_var, logit, key_mask, layout, backend, n_local):
    """The shard's own state (S, n): slot_ops.slot_write (only the write half runs)."""
    if n_local == 0:
        return _Zeros.apply(_state_specs(k, v, mean, layout), k, v, mean, log_var, logit)
    return slot_ops.slot_write(k, v, mean, log_var, logit, key_mask, layout=layout,
                               backend=backend)


def _slot_read(q, v, mean, log_var, logit, s, n, norm, eps, layout, backend, n_local):
    """y of the shard's queries reading the memory (S, n): slot_ops.slot_read."""
    if n_local == 0:
        return _Zeros.apply([(v.shape, v.dtype, v.device)], q, v, mean, log_var, logit, s, n)[0]
    return slot_ops.slot_read(q, mean, log_var, logit, s, n, v_dtype=v.dtype, norm=norm, eps=eps,
                              layout=layout, backend=backend)


def _causal_local(q, k, v, mean, log_var, logit, key_mask, s_in, n_in, norm, eps, layout,
                  backend, n_local):
    if n_local == 0:
        return _Zeros.apply([(v.shape, v.dtype, v.device)], q, k, v, mean, log_var, logit,
                            s_in, n_in)[0]
    y, _, _ = gma_op(q, k, v, mean, log_var, logit, key_mask, s_in, n_in, True, norm, eps,
                     layout, backend)
    return y


def check_group(group) -> None:
    if not dist.is_available():
        raise FrameworkError("gmagen.torch.gma: cp_group is given but torch.distributed is not "
                             "available in this torch build")
    if not dist.is_initialized():
        raise FrameworkError("gmagen.torch.gma: cp_group is given but torch.distributed is not "
                             "initialized; call torch.distributed.init_process_group first")
    if not isinstance(group, dist.ProcessGroup):
        raise FrameworkError("gmagen.torch.gma: cp_group must be a torch.distributed "
                             f"ProcessGroup (e.g. dist.group.WORLD), got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise FrameworkError("gmagen.torch.gma: this process is not a member of cp_group")


def gma_context_parallel(q: Tensor, k: Tensor, v: Tensor, mean: Tensor, log_var: Tensor,
                         logit: Tensor, *, group, causal: bool, norm: str, eps: float,
                         key_mask: Optional[Tensor], initial_state: Optional[tuple],
                         return_state: bool, layout: str, backend: str):
    """This rank's shard of ``gmagen.torch.gma`` on the sequence sharded over ``group``
    (arguments already checked by ``gma``); see the module docstring."""
    check_group(group)
    n_local = q.shape[1 if layout == "bnhd" else 2]
    s_loc, n_loc = _slot_write(k, v, mean, log_var, logit, key_mask, layout, backend, n_local)
    if not causal:
        s, n = _AllReduceState.apply(s_loc, n_loc, group)
        y = _slot_read(q, v, mean, log_var, logit, s, n, norm, eps, layout, backend, n_local)
        return (y, (s, n)) if return_state else y
    s0 = n0 = None
    if initial_state is not None:
        s0, n0 = (t.to(device=s_loc.device, dtype=s_loc.dtype) for t in initial_state)
    scanned = _RingScan.apply(s_loc, n_loc, s0, n0, group, return_state)
    y = _causal_local(q, k, v, mean, log_var, logit, key_mask, scanned[0], scanned[1], norm,
                      eps, layout, backend, n_local)
    return (y, (scanned[2], scanned[3])) if return_state else y

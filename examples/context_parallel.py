"""Context parallelism: one long sequence sharded over the ranks of a torchrun job.

Each rank holds a contiguous piece of the tokens (rank order = sequence order)
and calls ``gmagen.torch.gma(..., cp_group=dist.group.WORLD)``; only the K-slot
state crosses ranks (``gmagen.torch.context_parallel``).  The script

  1. checks the sharded forward (and, with --check-backward, the gradients)
     against a single-process run of the whole sequence on rank 0, within
     GMA_SPEC's tolerance for the dtype;
  2. times the sharded call, forward and forward+backward, and the single-process
     call on rank 0 for comparison, and prints the bytes each rank sent per call.

NCCL and CUDA when every rank sees a GPU (rank i uses cuda:LOCAL_RANK), gloo and
CPU otherwise (or with --device cpu).  For the check every rank draws the whole
sequence from one seed on the CPU and keeps its piece; rank 0 also runs the
whole sequence and gathers the pieces of y.  Neither is part of a real job.

    torchrun --nproc_per_node=2 examples/context_parallel.py
    torchrun --nproc_per_node=3 examples/context_parallel.py --seq-len 4096 --uneven --causal
    torchrun --nproc_per_node=2 examples/context_parallel.py --device cuda --dtype bfloat16 \\
        --seq-len 1048576 --heads 16 --dim 64 --components 64
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist

import gmagen.torch as gt
from gmagen.torch import context_parallel as cp

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
# GMA_SPEC precision contract (forward, gradients); the reference is the same dtype
# on one process, so this is generous
TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (1e-4, 5e-4),
       torch.float16: (1e-2, 2e-2), torch.bfloat16: (2e-2, 4e-2)}
NAMES = ("q", "k", "v", "mean", "log_var", "logit")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=16384, help="N of the whole sequence")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=16, help="D = Dv")
    p.add_argument("--components", type=int, default=16, help="K")
    p.add_argument("--causal", action="store_true", help="causal (default: bidirectional)")
    p.add_argument("--norm", choices=("row", "slot"), default="row")
    p.add_argument("--covariance", choices=("diag", "spherical", "shared"), default="diag")
    p.add_argument("--return-state", action="store_true")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", default=None, help="gmagen.torch.gma backend (default: auto)")
    p.add_argument("--uneven", action="store_true", help="shard i gets a share ~ i + 1")
    p.add_argument("--iters", type=int, default=5, help="timed calls after one warm-up")
    p.add_argument("--check-backward", action="store_true",
                   help="also compare the gradients with the single-process run")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank on CPU")
    return p.parse_args(argv)


def shard_bounds(n: int, world: int, uneven: bool) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) per rank; even split, or shares proportional to rank + 1."""
    weights = [r + 1 for r in range(world)] if uneven else [1] * world
    cuts = [n * sum(weights[:r]) // sum(weights) for r in range(world + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def make_inputs(args, device, dtype) -> dict[str, torch.Tensor]:
    """The whole sequence, the same on every rank (one seed, drawn on the CPU)."""
    g = torch.Generator().manual_seed(0)
    B, N, H, D, K = args.batch, args.seq_len, args.heads, args.dim, args.components
    lv = {"diag": (H, K, D), "spherical": (H, K), "shared": (H,)}[args.covariance]
    t = {"q": torch.randn(B, N, H, D, generator=g), "k": torch.randn(B, N, H, D, generator=g),
         "v": torch.randn(B, N, H, D, generator=g),
         "mean": 0.5 * torch.randn(H, K, D, generator=g),
         "log_var": 0.1 * torch.randn(lv, generator=g),
         "logit": 0.1 * torch.randn(H, K, generator=g)}
    return {k: x.to(device=device, dtype=dtype) for k, x in t.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, iters: int, device, barrier: bool = False) -> float:
    """Seconds per call on this rank, after one warm-up (``barrier``: the ranks
    start timing together)."""
    fn()
    sync(device)
    if barrier:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def timed(fn, iters: int, device) -> float:
    """Seconds per call (after one warm-up), the slowest rank's."""
    dt = torch.tensor([seconds_per_call(fn, iters, device, barrier=True)], dtype=torch.float64,
                      device=device)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt)


def gather_to_rank0(x: torch.Tensor, bounds, n_dim: int = 1):
    """Rank 0: the pieces of x (uneven along dim n_dim) concatenated; others: None."""
    rank, world = dist.get_rank(), dist.get_world_size()
    longest = max(hi - lo for lo, hi in bounds)
    pad = list(x.shape)
    pad[n_dim] = longest
    buf = x.new_zeros(pad)
    buf.narrow(n_dim, 0, x.shape[n_dim]).copy_(x)
    bufs = [torch.empty_like(buf) for _ in range(world)] if rank == 0 else None
    dist.gather(buf, bufs, dst=0)
    if rank != 0:
        return None
    return torch.cat([b.narrow(n_dim, 0, hi - lo) for b, (lo, hi) in zip(bufs, bounds)], n_dim)


def main(argv=None) -> int:
    args = parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        if args.threads:
            torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        ok = run(args, device, use_cuda)
        # run's autograd graphs hold the group (for their backward): release them
        # before the group goes; a gloo group destroyed at interpreter exit instead
        # aborted that rank ("terminate called without an active exception")
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


def run(args, device, use_cuda: bool) -> bool:
    """The check against one process, the timings and the bytes report; True when
    the check passed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[args.dtype]
    bounds = shard_bounds(args.seq_len, world, args.uneven)
    lo, hi = bounds[rank]
    full = make_inputs(args, device, dtype)
    local = {k: (x[:, lo:hi] if k in ("q", "k", "v") else x).clone().requires_grad_()
             for k, x in full.items()}
    kw = dict(causal=args.causal, norm=args.norm, backend=args.backend,
              return_state=args.return_state)

    def sharded():
        return gt.gma(*[local[k] for k in NAMES], cp_group=dist.group.WORLD, **kw)

    def sharded_fwd_bwd():
        out = sharded()
        y = out[0] if args.return_state else out
        y.float().square().mean().backward()

    # -- check against one process on the whole sequence --------------------------------
    out = sharded()
    y = out[0] if args.return_state else out
    fwd_bytes = cp.last_exchange("forward")
    y_all = gather_to_rank0(y.detach(), bounds)
    ok = True
    if rank == 0:
        ref_leaves = {k: x.clone().requires_grad_() for k, x in full.items()}
        ref = gt.gma(*[ref_leaves[k] for k in NAMES], **kw)
        y_ref = ref[0] if args.return_state else ref
        err = rel(y_all, y_ref.detach())
        ok = err <= TOL[dtype][0]
        print(f"forward: y of {world} shards {[hi - lo for lo, hi in bounds]} vs one process: "
              f"relative error {err:.2e} ({'ok' if ok else 'FAILED'}, tolerance "
              f"{TOL[dtype][0]:.0e})")
    if args.check_backward:
        # the loss is the mean over the whole sequence: each rank's part of it
        (y.float().square().sum() / (args.batch * args.seq_len)).backward()
        grads = {k: local[k].grad for k in NAMES}
        for k in ("mean", "log_var", "logit"):  # replicated: each rank holds its share
            dist.all_reduce(grads[k])
        got = {k: gather_to_rank0(grads[k], bounds) if k in ("q", "k", "v") else grads[k]
               for k in NAMES}
        if rank == 0:
            (y_ref.float().square().sum() / (args.batch * args.seq_len)).backward()
            errs = {k: rel(got[k], ref_leaves[k].grad) for k in NAMES}
            good = all(e <= TOL[dtype][1] for e in errs.values())
            ok = ok and good
            print("backward: " + ", ".join(f"d{k} {e:.1e}" for k, e in errs.items())
                  + f" ({'ok' if good else 'FAILED'}, tolerance {TOL[dtype][1]:.0e})")
        for x in local.values():
            x.grad = None
    bwd_bytes = cp.last_exchange("backward")

    # -- timing -----------------------------------------------------------------------------
    with torch.no_grad():
        t_fwd = timed(sharded, args.iters, device)
    t_step = timed(sharded_fwd_bwd, args.iters, device)
    bwd_bytes = cp.last_exchange("backward") or bwd_bytes
    t_one = t_one_step = None
    if rank == 0:  # the whole sequence on one device (the others wait at the barrier)
        leaves = [full[k].clone().requires_grad_() for k in NAMES]

        def one():
            return gt.gma(*leaves, **kw)

        def one_step():
            out = one()
            (out[0] if args.return_state else out).float().square().mean().backward()

        with torch.no_grad():  # rank 0 alone: no collectives here
            t_one = seconds_per_call(one, args.iters, device)
        t_one_step = seconds_per_call(one_step, args.iters, device)
    dist.barrier()

    sent = torch.tensor([fwd_bytes.bytes_sent, bwd_bytes.bytes_sent if bwd_bytes else 0],
                        dtype=torch.float64, device=device)
    most = sent.clone()
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    if rank == 0:
        B, H, K, Dv = args.batch, args.heads, args.components, args.dim
        per_bh = (K * Dv + K) * (8 if dtype == torch.float64 else 4)  # the state's dtype
        print(f"{'causal' if args.causal else 'bidirectional'} norm={args.norm} "
              f"cov={args.covariance} {args.dtype} on {world} x {device.type} "
              f"({'nccl' if use_cuda else 'gloo'}): B={B} N={args.seq_len} H={H} D=Dv={Dv} "
              f"K={K}")
        print(f"  sharded   forward {t_fwd * 1e3:9.2f} ms   forward+backward "
              f"{t_step * 1e3:9.2f} ms")
        print(f"  1 process forward {t_one * 1e3:9.2f} ms   forward+backward "
              f"{t_one_step * 1e3:9.2f} ms   (speed-up {t_one / t_fwd:.2f}x, "
              f"{t_one_step / t_step:.2f}x)")
        print(f"  bytes sent per call and rank (most of any rank): forward {int(most[0])}, "
              f"backward {int(most[1])}; per batch entry and head "
              f"{most[0] / (B * H):.0f} / {most[1] / (B * H):.0f} (target <= 2 x "
              f"(K*Dv + K) x itemsize = {2 * per_bh}); independent of N")
    return ok


if __name__ == "__main__":
    raise SystemExit(main())

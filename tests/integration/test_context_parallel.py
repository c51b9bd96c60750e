"""gmagen.torch.gma(..., cp_group=...): context parallelism over gloo processes on CPU.

Each world (torch.multiprocessing, a FileStore in tmp_path) runs many checks to
amortise its start-up: every variant's forward, state and gradients on a
sharded sequence (uneven and empty shards) against the float64 oracle and its
analytic VJPs on the whole sequence, and the bytes exchanged per call.  A worker
never raises between collectives (a rank that stopped early would leave the
others waiting): failures are collected and raised at the end."""

from __future__ import annotations

import datetime
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
mp = pytest.importorskip("torch.multiprocessing")

import gmagen  # noqa: E402

gmagen.available_backends()  # probe triton first (see tests/integration/test_torch_gma.py)

import gmagen.torch as gt  # noqa: E402
from gmagen.errors import FrameworkError  # noqa: E402
from gmagen.ir.oracle import run  # noqa: E402
from gmagen.ir.oracle_grad import run_vjp  # noqa: E402
from gmagen.torch import context_parallel as cp  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build",
                allow_module_level=True)

NAMES = ("q", "k", "v", "mean", "log_var", "logit")
VARIANTS = list(itertools.product((False, True), ("row", "slot"), ("diag", "spherical", "shared")))
B, H, D, DV, K = 2, 2, 4, 3, 3
FWD_TOL, GRAD_TOL = 1e-10, 1e-8  # GMA_SPEC precision contract, float64
# float32 backends (Triton's interpreter): the float32 contract, gradients looser
F32_TOL = {"fwd": 1e-5, "grad": 1e-4}


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if not np.isfinite(a).all():
        return float("nan")
    den = float(np.linalg.norm(b.ravel()))
    num = float(np.linalg.norm((a - b).ravel()))
    return num / den if den > 0 else num


def _contiguous(t):
    """A contiguous copy: gloo reads and writes memory order, so a gradient with
    other strides (the torch backend's can be transposed) would be summed scrambled."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _np(t):
    return t.detach().double().numpy()


def _full_inputs(seed: int, N: int, cov: str, world: int):
    """The whole sequence's inputs and cotangents (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    lv = {"diag": (H, K, D), "spherical": (H, K), "shared": (H,)}[cov]
    d = torch.float64
    t = {"q": torch.randn(B, N, H, D, generator=g, dtype=d),
         "k": torch.randn(B, N, H, D, generator=g, dtype=d),
         "v": torch.randn(B, N, H, DV, generator=g, dtype=d),
         "mean": 0.5 * torch.randn(H, K, D, generator=g, dtype=d),
         "log_var": 0.1 * torch.randn(lv, generator=g, dtype=d),
         "logit": 0.1 * torch.randn(H, K, generator=g, dtype=d)}
    mask = torch.rand(B, N, generator=g) < 0.7
    mask[1, : N // 2] = False  # a long masked run, crossing shard boundaries
    init = (torch.rand(B, H, K, DV, generator=g, dtype=d),
            torch.rand(B, H, K, generator=g, dtype=d))
    dy = torch.randn(B, N, H, DV, generator=g, dtype=d)
    # each rank's loss uses the returned state with its own cotangent
    ds = [torch.randn(B, H, K, DV, generator=g, dtype=d) for _ in range(world)]
    dn = [torch.randn(B, H, K, generator=g, dtype=d) for _ in range(world)]
    return t, mask, init, dy, ds, dn


def _check_case(rank: int, world: int, fails: list, *, shards, causal, norm, cov, masked,
                init, return_state, backend, layout="bnhd", seed=0) -> None:
    """One sharded call against the oracle on the whole sequence (float64)."""
    name = (f"W{world} shards={shards} {'causal' if causal else 'bidir'}-{norm}-{cov}"
            f"{'-mask' if masked else ''}{'-init' if init else ''}"
            f"{'-state' if return_state else ''} {backend} {layout}")
    N = sum(shards)
    lo = sum(shards[:rank])
    hi = lo + shards[rank]
    t, mask, s_init, dy, ds, dn = _full_inputs(seed, N, cov, world)
    prog = gmagen.gma(causal=causal, norm=norm, covariance=cov)
    feed = {k: _np(x) for k, x in t.items()}
    if masked:
        feed["key_mask"] = mask.numpy()
    if init:
        feed["initial_state"] = tuple(_np(x) for x in s_init)
    ref = run(prog, feed)
    cots = {prog.outputs[0]: _np(dy)}
    if return_state:
        cots[prog.state] = (_np(sum(ds)), _np(sum(dn)))
    ref_grads = run_vjp(prog, feed, cots)

    # this rank's piece; replicated parameters as its own leaves
    dt = torch.float32 if backend == "triton" else torch.float64
    fwd_tol, grad_tol = ((F32_TOL["fwd"], F32_TOL["grad"]) if dt == torch.float32
                         else (FWD_TOL, GRAD_TOL))
    local = {k: (x[:, lo:hi] if k in ("q", "k", "v") else x).to(dt).clone().requires_grad_()
             for k, x in t.items()}
    args = [local[k] for k in NAMES]
    if layout == "bhnd":  # non-contiguous views in the other layout
        args = [x.transpose(1, 2) if i < 3 else x for i, x in enumerate(args)]
    extra = {}
    if masked:
        extra["key_mask"] = mask[:, lo:hi].clone()
    leaves_init = []
    if init:
        leaves_init = [x.to(dt).clone().requires_grad_() for x in s_init]
        extra["initial_state"] = tuple(leaves_init)
    out = gt.gma(*args, causal=causal, norm=norm, backend=backend, layout=layout,
                 return_state=return_state, cp_group=dist.group.WORLD, **extra)
    y, (s, n) = out if return_state else (out, (None, None))
    y_bnhd = y.transpose(1, 2) if layout == "bhnd" else y

    def expect(what, got, want, tol):
        err = _rel(got, want)
        if not err <= tol:  # NaN fails too
            fails.append(f"rank {rank} {name}: {what} relative error {err:.2e} > {tol:.0e}")

    expect("y", _np(y_bnhd), ref[prog.outputs[0]][:, lo:hi], fwd_tol)
    loss = (y_bnhd * dy[:, lo:hi]).sum()
    if return_state:
        expect("S", _np(s), ref[prog.state][0], fwd_tol)
        expect("n", _np(n), ref[prog.state][1], fwd_tol)
        loss = loss + (s * ds[rank]).sum() + (n * dn[rank]).sum()
    wrt = [local[k] for k in NAMES] + leaves_init
    grads = torch.autograd.grad(loss, wrt)
    for k, gr in zip(NAMES, grads):
        if k in ("q", "k", "v"):  # this rank's shard of the full gradient
            expect(f"d{k}", _np(gr), ref_grads[k][:, lo:hi], grad_tol)
        else:  # this rank's share: the sum over the group is the full gradient
            total = _contiguous(gr)
            dist.all_reduce(total)
            expect(f"d{k}", _np(total), ref_grads[k], grad_tol)
    for what, gr, want in zip(("dS0", "dn0"), grads[6:], ref_grads.get("initial_state") or ()):
        total = _contiguous(gr)
        dist.all_reduce(total)
        expect(what, _np(total), want, grad_tol)
        if rank != 0 and float(gr.abs().max()) != 0.0:
            fails.append(f"rank {rank} {name}: {what} is nonzero off rank 0")


def _check_bytes(rank: int, world: int, fails: list) -> None:
    """Bytes sent per call: independent of N, within the issue's 2 states per rank."""
    budget = 2 * B * H * (K * DV + K) * 4  # float32 state
    seen: dict = {}
    for causal, return_state in ((False, True), (True, False), (True, True)):
        for N in (4 * world, 50 * world):
            shards = [N // world] * world
            t, mask, _, _, _, _ = _full_inputs(7, N, "diag", world)
            lo = rank * shards[0]
            args = [(x[:, lo:lo + shards[0]] if i < 3 else x).float().requires_grad_()
                    for i, x in enumerate(t[k] for k in NAMES)]
            out = gt.gma(*args, causal=causal, backend="torch", return_state=return_state,
                         key_mask=mask[:, lo:lo + shards[0]], cp_group=dist.group.WORLD)
            y, st = out if return_state else (out, ())
            fwd = cp.last_exchange("forward")
            loss = y.square().sum() + sum(x.sum() for x in st)
            loss.backward()
            bwd = cp.last_exchange("backward")
            key = (causal, return_state)
            got = (fwd.bytes_sent, bwd.bytes_sent)
            if fwd.state_bytes != B * H * (K * DV + K) * 4:
                fails.append(f"rank {rank}: state_bytes {fwd.state_bytes}")
            if max(got) > budget:
                fails.append(f"rank {rank} W{world} causal={causal} state={return_state} N={N}: "
                             f"sent {got} bytes (forward, backward) > budget {budget}")
            if seen.setdefault(key, got) != got:
                fails.append(f"rank {rank} W{world} causal={causal} state={return_state}: bytes "
                             f"{seen[key]} at N={4 * world}, {got} at N={N}")
    print(f"rank {rank} W{world} bytes sent per call (forward, backward), budget {budget}: "
          + ", ".join(f"{'causal' if c else 'bidir'}{'+state' if s else ''} {v}"
                      for (c, s), v in seen.items()))


def _world_2(rank: int, world: int, fails: list) -> None:
    shards = (8, 5)
    for i, (causal, norm, cov) in enumerate(VARIANTS):
        for backend in ("torch", "numpy"):
            _check_case(rank, world, fails, shards=shards, causal=causal, norm=norm, cov=cov,
                        masked=i % 2 == 0, init=causal and i % 3 != 2, return_state=i % 4 != 3,
                        backend=backend, seed=i)
    _check_case(rank, world, fails, shards=(3, 9), causal=True, norm="row", cov="diag",
                masked=True, init=True, return_state=True, backend="torch", layout="bhnd",
                seed=20)
    _check_case(rank, world, fails, shards=(6, 6), causal=False, norm="slot", cov="diag",
                masked=True, init=False, return_state=True, backend="torch", layout="bhnd",
                seed=21)
    # Triton (the interpreter, float32): the write and read halves and their backward
    # kernels apart (slot_ops), and the causal scan from the incoming state
    for i, (causal, norm, cov) in enumerate([(False, "row", "diag"), (False, "slot", "spherical"),
                                             (True, "row", "shared")]):
        _check_case(rank, world, fails, shards=(9, 4), causal=causal, norm=norm, cov=cov,
                    masked=True, init=causal, return_state=True, backend="triton",
                    layout="bhnd" if i == 1 else "bnhd", seed=30 + i)
    _check_bytes(rank, world, fails)


def _world_3(rank: int, world: int, fails: list) -> None:
    patterns = [(5, 0, 7), (0, 6, 3), (4, 4, 0), (1, 9, 2)]
    for i, (causal, norm, cov) in enumerate(VARIANTS):
        _check_case(rank, world, fails, shards=patterns[i % 4], causal=causal, norm=norm,
                    cov=cov, masked=i % 2 == 1, init=causal and i % 2 == 0,
                    return_state=i % 3 != 1, backend="torch", seed=100 + i)
    for i, shards in enumerate(patterns[:3]):
        _check_case(rank, world, fails, shards=shards, causal=i != 1, norm="row",
                    cov="spherical", masked=True, init=i == 0, return_state=True,
                    backend="numpy", seed=200 + i)
    _check_bytes(rank, world, fails)


def _worker(rank: int, world: int, store: str, body: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    fails: list = []
    try:
        globals()[body](rank, world, fails)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if fails:
        raise AssertionError(f"{len(fails)} check(s) failed:\n" + "\n".join(fails[:30]))


def _spawn(tmp_path, world: int, body: str) -> None:
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), body), nprocs=world, join=True)


def test_context_parallel_two_ranks_every_variant(tmp_path):
    """Uneven shards, every variant on the torch and numpy backends, both layouts,
    forward, state and gradients vs the oracle; bytes per call."""
    _spawn(tmp_path, 2, "_world_2")


def test_context_parallel_three_ranks_empty_shards(tmp_path):
    """Empty first, middle and last shards, every variant; bytes per call."""
    _spawn(tmp_path, 3, "_world_3")


def test_cp_group_needs_initialized_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    x = [torch.randn(1, 4, 2, 3) for _ in range(3)]
    mix = [torch.randn(2, 2, 3), torch.zeros(2, 2, 3), torch.zeros(2, 2)]
    with pytest.raises(FrameworkError, match="not initialized"):
        gt.gma(*x, *mix, cp_group=object())


def test_example_under_torchrun():
    """examples/context_parallel.py under torchrun (2 gloo ranks): its check passes
    and it reports the bytes per call."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "context_parallel.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), "--seq-len", "300", "--causal", "--uneven", "--return-state",
           "--check-backward", "--iters", "1", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "forward: y of 2 shards [100, 200]" in out.stdout and "(ok" in out.stdout, out.stdout
    assert "backward: dq" in out.stdout and "FAILED" not in out.stdout, out.stdout
    assert "bytes sent per call and rank" in out.stdout, out.stdout

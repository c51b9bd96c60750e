"""Precompiling a batch at once (issue 8): the loop's side on a fake runner and a
fake clock, and TorchRunner's worker pool on the CPU (fake worker tasks; the
real ones need CUDA: tests/gpu/test_tune_precompile.py)."""

from __future__ import annotations

import math
import os
import time
from typing import Optional

import pytest

from gmagen.autotune import ErrorConfig, measure
from gmagen.autotune.strategies import exhaustive, random_local
from gmagen.config import Config
from gmagen.errors import OptionError

from .fakes import BOWL_BEST, FakeRunner, tile_space

OOR = "OutOfResources: out of resource: shared memory, Required: 300000, Hardware limit: 232448"


class PrecompilingRunner(FakeRunner):
    """A FakeRunner whose precompile compiles ``precompile_workers`` configs per
    ``round_s`` of the fake clock; a precompiled config then compiles in
    ``warm_s`` (the disk cache)."""

    def __init__(self, *, round_s: float = 2.5, workers: int = 4, warm_s: float = 0.02,
                 broken: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        self.round_s, self.precompile_workers, self.warm_s = round_s, workers, warm_s
        self.broken = dict(broken or {})   # config -> error message from precompile
        self.calls: list[list[Config]] = []
        self.timeouts: list[Optional[float]] = []
        self.warm: set[Config] = set()

    def precompile(self, configs, timeout_s=None):
        self.calls.append(list(configs))
        self.timeouts.append(timeout_s)
        rounds = math.ceil(len(configs) / self.precompile_workers)
        finished = rounds if timeout_s is None else min(rounds, int(timeout_s // self.round_s))
        self.clock += rounds * self.round_s if finished == rounds else timeout_s
        done = configs[:finished * self.precompile_workers]
        self.warm.update(done)
        return {c: self.broken.get(c) for c in done}

    def compile(self, config):
        if config in self.warm:
            self.clock += self.warm_s - self.compile_s  # FakeRunner adds compile_s
        return super().compile(config)


def test_precompile_once_per_batch_with_the_unseen_configs():
    runner = PrecompilingRunner(compile_s=2.5)
    result = exhaustive.tune(tile_space(), runner, {"budget_s": 1000, "batch": 4})
    assert result.best == BOWL_BEST and result.complete
    configs = list(tile_space().prune(runner.limits))
    batches = [[c for c in configs[i:i + 4] if c != runner.default]
               for i in range(0, len(configs), 4)]
    assert runner.calls == [b for b in batches if b]
    # every candidate compiled once more in the tuning process, from the warm cache
    assert runner.compiled[0] == runner.default
    assert sorted(map(str, runner.compiled[1:])) == sorted(str(c) for b in batches for c in b)
    assert all(t is not None and t > 0 for t in runner.timeouts)


def test_precompile_failures_are_rejected_with_their_message_and_never_timed():
    bad = Config(block_n=256, num_warps=8, num_stages=1)
    worse = Config(block_n=32, num_warps=2, num_stages=3)
    runner = PrecompilingRunner(broken={bad: OOR, worse: "CompileError: Triton could not compile"})
    result = exhaustive.tune(tile_space(), runner, {"budget_s": 1000, "batch": 8})
    rejected = {r.config: r for r in result.rejected}
    assert rejected[bad] == ErrorConfig(bad, "out-of-resources", OOR)
    assert rejected[worse].kind == "compile" and "could not compile" in rejected[worse].message
    assert len(result.rejected) == 2
    for c in (bad, worse):
        assert c not in runner.compiled and c not in result.measurements
    assert result.best == BOWL_BEST


@pytest.mark.parametrize("budget", [6.0, 12.0, 30.0])
@pytest.mark.parametrize("round_s", [2.5, 8.0])
def test_budget_holds_when_precompile_is_slow(budget, round_s):
    runner = PrecompilingRunner(round_s=round_s, workers=4, compile_s=2.5,
                                default=Config(block_n=64, num_warps=4, num_stages=2, block_d=32))
    result = random_local.tune(tile_space(block_d=True), runner, {"budget_s": budget})
    assert result.elapsed_s <= budget and runner.clock <= budget
    # precompile was never granted more than the budget had left
    assert all(t <= budget for t in runner.timeouts)


def test_precompile_out_of_time_drops_what_it_did_not_finish():
    """A precompile that runs out of its time ends the search; configs it
    finished may still be checked and timed, the others are not tried."""
    runner = PrecompilingRunner(round_s=3.0, workers=2, compile_s=2.5)
    result = exhaustive.tune(tile_space(), runner, {"budget_s": 10.0, "batch": 8})
    assert not result.complete and result.elapsed_s <= 10.0
    assert len(runner.calls) == 1
    finished = runner.warm
    assert 0 < len(finished) < 8
    tried = set(runner.compiled[1:])
    assert tried and tried <= finished   # the per-config deadline checks may stop early
    assert result.tried == len(tried) + 1


def test_parallel_compiles_fit_more_candidates_in_the_budget():
    serial = FakeRunner(compile_s=2.5)
    parallel = PrecompilingRunner(compile_s=2.5, round_s=2.5, workers=8)
    opts = {"budget_s": 30.0, "batch": 8}
    a = exhaustive.tune(tile_space(), serial, opts)
    b = exhaustive.tune(tile_space(), parallel, opts)
    assert a.elapsed_s <= 30 and b.elapsed_s <= 30
    assert b.tried >= 3 * a.tried, (a.tried, b.tried)


def test_a_runner_without_precompile_still_works():
    runner = FakeRunner()
    assert not hasattr(runner, "precompile")
    result = exhaustive.tune(tile_space(), runner, {"budget_s": 1000})
    assert result.best == BOWL_BEST and result.complete and result.tried == 60


def test_measure_rejects_what_precompile_cannot_compile():
    bad = Config(block_n=256, num_warps=8, num_stages=1)
    runner = PrecompilingRunner(broken={bad: OOR})
    out = measure(runner, [BOWL_BEST, bad], repeats=3)
    assert runner.calls == [[BOWL_BEST, bad]]
    assert out[bad] == ErrorConfig(bad, "out-of-resources", OOR) and bad not in runner.compiled
    assert out[BOWL_BEST].median_ms == pytest.approx(1.0, rel=0.1)


def test_workers_from_the_environment(monkeypatch):
    from gmagen.autotune.torch_runner import MAX_WORKERS, default_workers

    monkeypatch.setenv("GMAGEN_TUNE_WORKERS", "0")
    assert default_workers() == 0
    monkeypatch.setenv("GMAGEN_TUNE_WORKERS", "3")
    assert default_workers() == 3
    monkeypatch.delenv("GMAGEN_TUNE_WORKERS")
    assert default_workers() == max(0, min(MAX_WORKERS, (os.cpu_count() or 1) - 1))
    for bad in ("-1", "many"):
        monkeypatch.setenv("GMAGEN_TUNE_WORKERS", bad)
        with pytest.raises(OptionError, match=f"GMAGEN_TUNE_WORKERS='{bad}'.*non-negative int"):
            default_workers()


# -- TorchRunner on the CPU (Triton's interpreter) -----------------------------

def _interpreter_runner(**kwargs):
    torch = pytest.importorskip("torch")
    import gmagen

    if not gmagen.available_backends()["triton"]:
        pytest.skip(f"triton: {gmagen.available_backends()['triton'].reason}")
    from gmagen.autotune.torch_runner import TorchRunner
    from gmagen.backends.triton import BACKEND

    if not BACKEND.interpreted:
        pytest.skip("a CUDA device: the interpreter's case does not apply")
    program = gmagen.gma()
    kern = gmagen.compile(program, "triton")
    g = torch.Generator().manual_seed(0)
    B, N, H, D, K = 1, 40, 2, 8, 4
    args = [torch.randn(B, N, H, D, generator=g) for _ in range(3)] + [
        torch.randn(H, K, D, generator=g), torch.zeros(H, K, D), torch.zeros(H, K)]
    bind = gmagen.adapters.checks.bind(program, kern._collect(tuple(args), {}), program.layout,
                                       BACKEND.dtypes, BACKEND.devices, "triton")
    return TorchRunner(BACKEND, program, kern.plan, kern.plan.kernels[0], bind, {}, **kwargs)


def test_torch_runner_precompile_is_a_no_op_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("GMAGEN_TUNE_WORKERS", "4")
    runner = _interpreter_runner(start_workers=8)
    assert runner.precompile_workers == 0 and runner._pool is None
    assert runner.precompile([Config(num_warps=2), Config(block_n=16)], 10.0) == {}
    assert runner._pool is None
    runner.close()


def fake_task(token, module, program, plan, index, binding, options, config):
    """Stands for the worker's compile (spawned processes import it from here)."""
    if config["num_warps"] == 2:
        return "error", OOR
    if config["num_warps"] == 8:
        return "skip", "MemoryError: the worker's, not the config's"
    if config["block_n"] == 16:
        time.sleep(60)
    return "ok", str(os.getpid())


def test_torch_runner_worker_pool(monkeypatch):
    """The pool's plumbing with spawned processes and a fake task: results,
    skips, a timeout that stops the workers, a fresh pool after it, close."""
    runner = _interpreter_runner()
    runner.precompile_workers = 2   # as on CUDA
    runner._compile_task = fake_task
    ok, bad, skip, slow = (Config(block_n=32, num_warps=4), Config(block_n=32, num_warps=2),
                           Config(block_n=32, num_warps=8), Config(block_n=16, num_warps=4))
    try:
        assert runner.precompile([ok, bad, skip], 120.0) == {ok: None, bad: OOR}
        pool = runner._pool
        assert pool is not None and runner.precompile([ok], 120.0) == {ok: None}
        assert runner._pool is pool   # reused across batches
        processes = list(pool._processes.values())
        t0 = time.monotonic()
        out = runner.precompile([slow, ok], 3.0)
        assert time.monotonic() - t0 < 30
        assert slow not in out and out.get(ok, None) is None
        assert runner._pool is None   # out of time: the workers were stopped
        assert all(not p.is_alive() for p in processes)
        assert runner.precompile([bad], 120.0) == {bad: OOR}   # a fresh pool
        processes = list(runner._pool._processes.values())
    finally:
        runner.close()
    assert runner._pool is None and all(not p.is_alive() for p in processes)


def _pooled_runner(task=None):
    """An interpreter runner made to use 2 worker processes running ``task``
    (default fake_task) in place of the compile, as on CUDA."""
    runner = _interpreter_runner()
    runner.precompile_workers = 2
    runner._compile_task = task or fake_task
    return runner


def test_runners_of_one_tuning_run_share_the_pool():
    """Inside keep_workers (gmagen.tune): a runner's pool outlives it and the next
    runner takes it up (no second start-up); a kill (out of time) drops it; on
    leaving keep_workers the workers stop."""
    from gmagen.autotune.torch_runner import keep_workers

    ok = Config(block_n=32, num_warps=4)
    with keep_workers():
        first = _pooled_runner()
        assert first.precompile([ok], 120.0) == {ok: None}
        pool = first._pool
        processes = list(pool._processes.values())
        first.close()
        assert all(p.is_alive() for p in processes)   # kept for the next runner
        second = _pooled_runner()
        assert second.precompile([ok], 120.0) == {ok: None}
        assert second._pool is pool
        second.close()
        assert all(p.is_alive() for p in processes)
    assert all(not p.is_alive() for p in processes)   # stopped with the run

    with keep_workers():
        runner = _pooled_runner()
        runner.precompile([ok], 120.0)
        processes = list(runner._pool._processes.values())
        runner.close(kill=True)   # a broken or late pool is not handed on
        assert all(not p.is_alive() for p in processes)
        again = _pooled_runner()
        assert again.precompile([ok], 120.0) == {ok: None} and again._pool is not pool
        again.close()


def test_shared_pool_survives_a_timeout_within_the_grace(monkeypatch):
    """Out of time in a shared pool: queued configs are dropped, running ones get
    GRACE_S to finish, and the pool is kept for the next runner; a compile that
    outlasts the grace still gets the pool killed."""
    from gmagen.autotune import torch_runner
    from gmagen.autotune.torch_runner import keep_workers

    ok, slow = Config(block_n=32, num_warps=4), Config(block_n=16, num_warps=4)
    monkeypatch.setattr(torch_runner, "GRACE_S", 120.0)
    with keep_workers():
        runner = _pooled_runner()
        assert runner.precompile([ok], 120.0) == {ok: None}
        pool = runner._pool
        monkeypatch.setattr(torch_runner, "GRACE_S", 0.5)
        out = runner.precompile([slow, ok], 0.5)    # slow sleeps 60 s: past the grace
        assert slow not in out and runner._pool is None
        runner.close()
        again = _pooled_runner(quick_then_slow_task)
        assert again.precompile([ok], 120.0) == {ok: None}
        pool = again._pool
        monkeypatch.setattr(torch_runner, "GRACE_S", 120.0)
        out = again.precompile([Config(block_n=64, num_warps=4)], 0.2)  # sleeps 2 s
        assert out == {} and again._pool is pool   # finished within the grace: kept
        again.close()


def quick_then_slow_task(token, module, program, plan, index, binding, options, config):
    if config["block_n"] == 64:
        time.sleep(2)
    return "ok", ""


def test_worker_gives_back_a_replaced_runners_memory(monkeypatch):
    """A worker holds one runner's inputs at a time; when the next runner's replace
    them (a pool kept over a grid of shapes), the old ones go back to the driver, and
    so does each run's output, so that 15 workers do not hold every shape they saw
    (at N=65536 on an H100 the tuner itself then ran out of memory)."""
    torch = pytest.importorskip("torch")
    from gmagen.autotune import torch_runner as tr

    freed: list[str] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append("empty"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(tr, "_random_inputs", lambda *a: {"x": object()})

    class Generator:  # no CUDA here: the inputs are fakes
        def __init__(self, device=None):
            pass

        def manual_seed(self, seed):
            return self

    monkeypatch.setattr(torch, "Generator", Generator)
    monkeypatch.setattr(tr, "_WORKER", {})

    class Exe:
        def run(self, env, binding):
            return {}

    class Backend:
        @staticmethod
        def lower(kp, binding, config, options):
            return Exe()

        @staticmethod
        def default_config(kp, binding):
            return Config()

    import sys
    import types

    module = types.ModuleType("fake_tune_backend")
    module.BACKEND = Backend()
    monkeypatch.setitem(sys.modules, "fake_tune_backend", module)

    class Plan:
        kernels = [object()]

    class Binding:
        device = ("cuda", 0)

    args = ("fake_tune_backend", None, Plan(), 0, Binding(), {})
    first = tr._worker_inputs("runner-1", *args)
    assert tr._worker_inputs("runner-1", *args) is first and freed == []  # kept
    tr._worker_inputs("runner-2", *args)
    assert freed == ["empty"]  # runner 1's inputs released
    assert tr._worker_compile("runner-2", *args, Config()) == ("ok", "")
    assert freed == ["empty", "empty"]  # the run's outputs released

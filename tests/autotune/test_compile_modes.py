"""gmagen.compile(..., autotune=...) with the Triton backend: cached configs are
used (exact and nearest bucket), "off" ignores them, "on-miss" without a tuner
says so, stale or corrupt entries fall back to the heuristic with a warning.
The GPU is faked: Triton runs in its interpreter and ``tuning_device`` reports
an H100, so the cache logic is exercised exactly as on the GPU."""

from __future__ import annotations

import numpy as np
import pytest

import gmagen
from gmagen import autotune
from gmagen.config import Config
from gmagen.errors import UnsupportedFeature

torch = pytest.importorskip("torch")
if not gmagen.available_backends()["triton"]:
    pytest.skip(f"triton: {gmagen.available_backends()['triton'].reason}", allow_module_level=True)

FAKE_GPU = {"gpu": "NVIDIA H100 80GB HBM3", "capability": (9, 0), "sm_count": 132,
            "backend_version": "3.6.0"}


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    from gmagen.backends.triton import TritonBackend

    monkeypatch.setenv("GMAGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(TritonBackend, "tuning_device", lambda self, binding: FAKE_GPU)
    keys = []
    original = autotune.select

    def spy(key, *args, **kwargs):
        keys.append(key)
        return original(key, *args, **kwargs)

    monkeypatch.setattr(autotune, "select", spy)
    return keys


def _inputs(N=40, B=1, H=2, D=8, K=4):
    g = torch.Generator().manual_seed(0)
    tok = [torch.randn(B, N, H, D, generator=g) for _ in range(3)]
    return tok + [torch.randn(H, K, D, generator=g), torch.zeros(H, K, D), torch.zeros(H, K)]


def _entry(**knobs) -> autotune.Entry:
    return autotune.Entry(Config(knobs), time_ms=1.0, default_time_ms=1.5, noise_ms=0.01,
                          tried=4, rejected=0)


def test_cached_config_is_used_and_off_ignores_it(fake_gpu):
    args = _inputs()
    ref = gmagen.compile(gmagen.gma(), "numpy")(*[a.numpy() for a in args])
    gmagen.compile(gmagen.gma(), "triton")(*args)  # miss: the heuristic; records the keys
    write_key = next(k for k in fake_gpu if k.program.endswith(":gma_write"))
    autotune.default_cache().put(write_key, _entry(block_n=16, num_warps=2))

    kern = gmagen.compile(gmagen.gma(), "triton")
    y = kern(*args)
    assert kern.config["gma_write"]["block_n"] == 16 and kern.config["gma_write"]["num_warps"] == 2
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-5)
    off = gmagen.compile(gmagen.gma(), "triton", autotune="off")
    off(*args)
    assert off.config["gma_write"]["block_n"] != 16
    # an explicit config wins over the cache
    mine = gmagen.compile(gmagen.gma(), "triton", config={"gma_write": {"block_n": 32}})
    mine(*args)
    assert mine.config["gma_write"]["block_n"] == 32


def test_nearest_bucket_serves_another_length(fake_gpu):
    gmagen.compile(gmagen.gma(), "triton")(*_inputs(N=40))
    key = next(k for k in fake_gpu if k.program.endswith(":gma_write"))
    autotune.default_cache().put(key, _entry(block_n=16))
    kern = gmagen.compile(gmagen.gma(), "triton")
    kern(*_inputs(N=200))  # another N bucket: the nearest one is used
    assert kern.config["gma_write"]["block_n"] == 16
    for other in fake_gpu[:2]:  # this program's two kernels at N=40 (write, read)
        if other != key:
            autotune.default_cache().put(other, _entry(block_n=32))
    exact = gmagen.compile(gmagen.gma(), "triton", autotune="on-miss")
    exact(*_inputs(N=40))  # on-miss with exact hits for every kernel: no tuning needed
    assert exact.config["gma_write"]["block_n"] == 16
    assert exact.config["gma_read"]["block_n"] == 32


def test_on_miss_without_a_tuner_says_so(fake_gpu, monkeypatch):
    from gmagen.backends.triton import TritonBackend

    monkeypatch.delattr(TritonBackend, "tune")
    with pytest.raises(UnsupportedFeature, match="on-miss.*no tuner"):
        gmagen.compile(gmagen.gma(), "triton", autotune="on-miss")(*_inputs())


def test_on_miss_tunes_once_then_hits(fake_gpu, monkeypatch):
    from gmagen.autotune import Choice, Space
    from gmagen.backends.triton import TritonBackend

    calls = []
    original = TritonBackend.tune

    def small(self, program, plan, kernel, binding, options, strategy="auto", tune_options=None):
        calls.append(kernel.name)  # a two-config space keeps the interpreter quick
        # on-miss: the default 30 s per shape, split over the program's two plans
        assert tune_options == {"budget_s": 13.5}
        return original(self, program, plan, kernel, binding, options, "exhaustive",
                        {"repeats": 2, "final_repeats": 3, "finalists": 2},
                        Space({"block_n": Choice([16, 32])}))

    monkeypatch.setattr(TritonBackend, "tune", small)
    args = _inputs()
    ref = gmagen.compile(gmagen.gma(), "numpy")(*[a.numpy() for a in args])
    y = gmagen.compile(gmagen.gma(), "triton", autotune="on-miss")(*args)
    assert sorted(calls) == ["gma_read", "gma_write"]
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-5)
    again = gmagen.compile(gmagen.gma(), "triton", autotune="on-miss")
    again(*args)  # a new Kernel (as in a new process): served from the cache
    assert sorted(calls) == ["gma_read", "gma_write"]
    # the stored winner (a candidate, or the default kept within noise) is what it uses
    key = next(k for k in fake_gpu if k.program.endswith(":gma_write"))
    stored = autotune.default_cache().get(key, nearest=False).config
    assert all(again.config["gma_write"][knob] == value for knob, value in stored.items())


def test_stale_and_corrupt_caches_fall_back_to_the_heuristic(fake_gpu, tmp_path):
    args = _inputs()
    gmagen.compile(gmagen.gma(), "triton")(*args)
    key = next(k for k in fake_gpu if k.program.endswith(":gma_write"))
    autotune.default_cache().put(key, _entry(block_n=16, no_such_knob=3))  # stale
    kern = gmagen.compile(gmagen.gma(), "triton")
    kern(*args)
    assert kern.config["gma_write"]["block_n"] != 16
    for f in (tmp_path / "autotune").glob("*.json"):
        f.write_text("{ truncated")
    autotune._CACHES.clear()  # a fresh process reads the file again
    with pytest.warns(autotune.CacheWarning):
        kern = gmagen.compile(gmagen.gma(), "triton")
        kern(*args)
    assert kern.config["gma_write"]["block_n"] != 16


def test_no_gpu_no_lookup(monkeypatch, tmp_path):
    # the interpreter: tuning_device is None, the cache is never read
    monkeypatch.setenv("GMAGEN_CACHE_DIR", str(tmp_path))
    called = []
    monkeypatch.setattr(autotune, "select", lambda *a, **k: called.append(1))
    gmagen.compile(gmagen.gma(), "triton")(*_inputs())
    assert not called


def test_triton_tuner_in_the_interpreter(fake_gpu):
    """The Triton runner end to end (wall-clock samples in the interpreter): a tiny
    space, every candidate checked against the default's output, the winner stored
    and served to the next compile; a wrong config is rejected."""
    from gmagen.autotune import Choice, Space
    from gmagen.backends.triton import BACKEND
    from gmagen.autotune.torch_runner import TorchRunner

    program = gmagen.gma()
    kern = gmagen.compile(program, "triton")
    args = _inputs()
    kern(*args)
    write = kern.plan.kernels[0]
    bind = gmagen.adapters.checks.bind(program, kern._collect(tuple(args), {}), program.layout,
                                       BACKEND.dtypes, BACKEND.devices, "triton")
    space = Space({"block_n": Choice([16, 32]), "num_warps": Choice([2, 4])})
    opts = {"budget_s": 60, "repeats": 2, "final_repeats": 3, "finalists": 2}
    result = BACKEND.tune(program, kern.plan, write, bind, {}, "exhaustive", opts, space)
    assert result.tried >= 4 and not result.rejected  # the 4 candidates (+ the default)
    assert result.best["block_n"] in (16, 32, 64)  # 64: the default, kept within noise

    runner = TorchRunner(BACKEND, program, kern.plan, kern.plan.kernels[1], bind, {})
    ref = runner.run(runner.compile(Config()))
    wrong = {k: tuple(x * 1.01 for x in v) for k, v in ref.items()}
    assert runner.check(ref, ref) is None and "differs" in runner.check(wrong, ref)


def test_gmagen_tune_stores_what_compile_uses(fake_gpu, monkeypatch):
    from gmagen.autotune import Choice, Space
    from gmagen.backends.triton import TritonBackend

    original = TritonBackend.tune

    def small(self, program, plan, kernel, binding, options, strategy="auto", tune_options=None):
        return original(self, program, plan, kernel, binding, options, "exhaustive",
                        {"repeats": 2, "final_repeats": 3, "finalists": 2, **(tune_options or {})},
                        Space({"num_warps": Choice([2, 4])}))

    monkeypatch.setattr(TritonBackend, "tune", small)
    seen = []
    rows = gmagen.tune(gmagen.gma(causal=True), [dict(B=1, N=40, H=2, D=8, Dv=8, K=4)],
                       "triton", dtype="f32", budget_s=20, progress=seen.append)
    assert [r.kernel for r in rows] == [kp.name for kp in
                                        gmagen.compile(gmagen.gma(causal=True), "triton").plan.kernels]
    assert seen == rows and all(r.result.tried >= 2 for r in rows)
    kern = gmagen.compile(gmagen.gma(causal=True), "triton")
    kern(*_inputs(N=40))
    for r in rows:  # one plan: kernel.config is that plan's Config
        cfg = kern.config if len(rows) == 1 else kern.config[r.kernel]
        assert cfg["num_warps"] == r.result.best["num_warps"]


def test_plan_budget_splits_a_shape_budget():
    """gmagen.tune's budget is per shape: even shares, a plan's leftover (or overrun)
    moves to the plans after it, never below the floor that times the default."""
    from gmagen.tune import MIN_PLAN_BUDGET_S, plan_budget

    # 30 s: 27 usable (3 s held back for a search's overrun past its deadline)
    assert plan_budget(30.0, 0.0, 2) == 13.5
    assert plan_budget(30.0, 10.0, 1) == 17.0      # the first plan finished early
    assert plan_budget(30.0, 29.5, 1) == MIN_PLAN_BUDGET_S
    assert plan_budget(30.0, 0.0, 1) == 27.0
    assert plan_budget(10.0, 0.0, 1) == 9.0        # at most a tenth held back


def test_gmagen_tune_budget_is_per_shape(fake_gpu, monkeypatch):
    """Two plans share one shape's budget: the second gets what the first left."""
    import importlib
    import types

    from gmagen.autotune import Measurement, TuneResult
    from gmagen.backends.triton import TritonBackend

    budgets = []
    clock = [0.0]

    def fake(self, program, plan, kernel, binding, options, strategy="auto", tune_options=None):
        budgets.append(tune_options["budget_s"])
        clock[0] += 4.0  # each plan takes 4 s
        m = Measurement(Config(), (1.0, 1.0, 1.0))
        return TuneResult(best=Config(), best_time=m, incumbent=Config(), default=Config(),
                          default_time=m, strategy="fake", tried=1, rejected=[],
                          elapsed_s=4.0, complete=True, decision="fake")

    monkeypatch.setattr(TritonBackend, "tune", fake)
    monkeypatch.setattr(importlib.import_module("gmagen.tune"), "time",
                        types.SimpleNamespace(monotonic=lambda: clock[0]))
    rows = gmagen.tune(gmagen.gma(), [dict(B=1, N=40, H=2, D=8, Dv=8, K=4)], "triton",
                       dtype="f32", budget_s=20)
    assert [r.kernel for r in rows] == ["gma_write", "gma_read"]
    assert budgets == [9.0, 14.0]  # 20 s, 18 usable: 9 each, and the 5 s the first left over
    with pytest.raises(gmagen.errors.OptionError, match="budget_s=0"):
        gmagen.tune(gmagen.gma(), [dict(B=1, N=40, H=2, D=8, Dv=8, K=4)], "triton", budget_s=0)


def test_cli_tune_progress_table_and_export(fake_gpu, monkeypatch, tmp_path, capsys):
    """`gmagen tune`: a step per kernel plan (the progress bar's), the closing table,
    --export; the tuner is a fake (the search itself is tested above)."""
    from gmagen.autotune import Measurement, TuneResult
    from gmagen.backends.triton import TritonBackend
    from gmagen.cli.main import main

    budgets = []

    def fake(self, program, plan, kernel, binding, options, strategy="auto", tune_options=None):
        budgets.append(tune_options["budget_s"])
        best = Config(num_warps=2)
        m = Measurement(best, (1.0, 1.0, 1.0))
        return TuneResult(best=best, best_time=m, incumbent=Config(), default=Config(),
                          default_time=Measurement(Config(), (2.0, 2.0, 2.0)), strategy="fake",
                          tried=3, rejected=[], elapsed_s=0.1, complete=True, decision="fake win")

    monkeypatch.setattr(TritonBackend, "tune", fake)
    monkeypatch.setattr("gmagen.cli.tune._gpu_name", lambda: FAKE_GPU["gpu"])
    out = tmp_path / "export.json"
    assert main(["tune", "--shape", "1,40,2,8,8,4", "--shape", "1,80,2,8,8,4", "--dtype", "f32",
                 "--budget", "6", "--export", str(out)]) == 0
    text = capsys.readouterr().out
    for n in (40, 80):
        for kernel in ("gma_write", "gma_read"):
            assert f"triton {kernel} N={n}: 2.000 -> 1.000 ms" in text
    assert "gmagen tune" in text and "2.00x" in text and "3/0" in text
    assert budgets[0] == pytest.approx(2.7, abs=0.1)  # 6 s per shape (5.4 usable), two plans
    assert "exported 4 entries" in text and out.is_file()

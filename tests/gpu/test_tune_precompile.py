"""Issue 8: tuning candidates compiled in parallel worker processes.

Each case runs in a fresh process with empty Triton and gmagen caches (a
process keeps compiled kernels in memory, so two tunings in one process would
not both start cold): the write plan tuned with workers and without must try
and reject the same configs, and each winner must agree with the default
config's output; after ``precompile`` a config's ``compile`` + first run in the
tuning process must take under a second (Triton's disk cache).  The measured
times are printed (pytest -s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (precompiling is a no-op in Triton's interpreter)",
                allow_module_level=True)

import gmagen  # noqa: E402

if not gmagen.available_backends()["triton"]:
    pytest.skip("triton backend unavailable", allow_module_level=True)

pytestmark = pytest.mark.gpu
WORKERS = 4

CHILD = r"""
import json, sys, time
import torch, gmagen
from gmagen.autotune import Choice, Space
from gmagen.autotune.torch_runner import TorchRunner
from gmagen.backends.triton import BACKEND
from gmagen.config import Config

workers, latency = int(sys.argv[1]), sys.argv[2] == "1"
program = gmagen.gma()
kern = gmagen.compile(program, "triton", autotune="off")
B, N, H, D, K = 2, 4096, 4, 64, 64
g = torch.Generator(device="cuda").manual_seed(0)
args = [torch.randn(B, N, H, D, device="cuda", generator=g).bfloat16() for _ in range(3)] + [
    torch.randn(H, K, D, device="cuda", generator=g) * .5,
    torch.randn(H, K, D, device="cuda", generator=g) * .1,
    torch.randn(H, K, device="cuda", generator=g) * .1]
kern(*args)
torch.cuda.synchronize()
bind = gmagen.adapters.checks.bind(program, kern._collect(tuple(args), {}), program.layout,
                                   BACKEND.dtypes, BACKEND.devices, "triton")
kp = kern.plan.kernels[0]
out = {"workers": workers}
if latency:  # configs outside the tuned space: cold here
    cfgs = [Config(num_stages=s, block_n=b) for s in (1, 3) for b in (32, 128)]
    with TorchRunner(BACKEND, program, kern.plan, kp, bind, kern.options,
                     workers=workers) as runner:
        t0 = time.monotonic()
        out["precompiled"] = {str(c): m for c, m in runner.precompile(cfgs, 300.0).items()}
        out["precompile_s"] = time.monotonic() - t0
        out["first_run_s"] = {}
        for c in cfgs + [Config(num_stages=4, block_n=64)]:  # the last one not precompiled
            t0 = time.monotonic()
            runner.run(runner.compile(c))
            torch.cuda.synchronize()
            out["first_run_s"][str(c)] = time.monotonic() - t0
space = Space({"block_n": Choice([32, 64, 128]), "num_warps": Choice([2, 4, 8])})
t0 = time.monotonic()
result = BACKEND.tune(program, kern.plan, kp, bind, kern.options, "exhaustive",
                      {"budget_s": 400, "repeats": 3, "final_repeats": 5}, space)
out["tune_s"] = time.monotonic() - t0
with TorchRunner(BACKEND, program, kern.plan, kp, bind, kern.options, workers=0) as runner:
    ref = runner.run(runner.compile(Config()))
    out["winner_check"] = runner.check(runner.run(runner.compile(result.best)), ref)
out.update(best=str(result.best), tried=result.tried, complete=result.complete,
           rejected=sorted(str(r.config) for r in result.rejected),
           measured=sorted(map(str, result.measurements)), decision=result.decision)
print(json.dumps(out))
"""


def _child(tmp_path, workers: int, latency: bool) -> dict:
    root = tmp_path / f"w{workers}"
    env = dict(os.environ, TRITON_CACHE_DIR=str(root / "triton"),
               GMAGEN_CACHE_DIR=str(root / "gmagen"), GMAGEN_TUNE_WORKERS=str(workers))
    out = subprocess.run([sys.executable, "-c", CHILD, str(workers), "1" if latency else "0"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, f"workers={workers}: exit {out.returncode}\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_precompiled_configs_compile_from_the_disk_cache(tmp_path):
    rec = _child(tmp_path, WORKERS, latency=True)
    print(f"\nprecompile of {len(rec['precompiled'])} configs with {WORKERS} workers: "
          f"{rec['precompile_s']:.2f} s (workers started in it)")
    for config, seconds in rec["first_run_s"].items():
        print(f"  compile + first run {config}: {seconds:.3f} s")
    assert all(m is None for m in rec["precompiled"].values()), rec["precompiled"]
    assert len(rec["precompiled"]) == 4
    slow = {c: s for c, s in list(rec["first_run_s"].items())[:4] if s >= 1.0}
    assert not slow, f"precompiled configs still compiled in the tuning process: {slow}"


def test_tuning_with_workers_finds_what_tuning_without_finds(tmp_path):
    serial = _child(tmp_path, 0, latency=False)
    parallel = _child(tmp_path, WORKERS, latency=False)
    print(f"\ntune, cold caches: {serial['tune_s']:.1f} s serially, {parallel['tune_s']:.1f} s "
          f"with {WORKERS} workers; winners {serial['best']} / {parallel['best']}")
    for rec in (serial, parallel):
        assert rec["complete"] and rec["winner_check"] is None, rec
    assert parallel["tried"] == serial["tried"]
    assert parallel["rejected"] == serial["rejected"]
    assert parallel["measured"] == serial["measured"]

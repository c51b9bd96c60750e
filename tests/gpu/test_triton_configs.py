"""Every config the Triton tuner may pick must run and agree with the default
config, on the GPU: the tuner rejects a wrong result, but a config that faults
(an illegal address) poisons the CUDA context of the tuning process, so it is
checked here, one config per subprocess.

The configs: the default's neighbours (what the local search tries first) and
a seeded sample of the pruned space, for the write, read and scan plans at the
benchmark's head sizes (bf16, D = Dv = K = 64) and a length whose segments are
uneven.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import gmagen  # noqa: E402

if not gmagen.available_backends()["triton"]:
    pytest.skip("triton backend unavailable", allow_module_level=True)

pytestmark = pytest.mark.gpu
PLANS = {"gma_write": (False, "write"), "gma_read": (False, "read"), "gma_scan": (True, "scan")}


def _configs(kind: str, sample: int = 10) -> list[dict]:
    from gmagen.autotune.torch_runner import device_limits
    from gmagen.backends.triton import space, tune
    from gmagen.config import Config

    default = space.default_config(kind, 64, 64, 64, "bf16")
    tuned = tune.tuning_space(kind, default, 64, 64, 64, "bf16")
    pruned = tuned.prune(device_limits(0))
    incumbent = Config({k: default[k] for k in tuned.knobs})
    near = list(pruned.neighbours(incumbent))
    rest = [c for c in pruned.configs if c != incumbent and c not in near]
    return [dict(c) for c in near + random.Random(0).sample(rest, min(sample, len(rest)))]


CASES = [(plan, cfg) for plan, (_, kind) in PLANS.items() for cfg in _configs(kind)]

CHILD = r"""
import json, sys
import torch, gmagen
plan, cfg, N = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
causal = plan == "gma_scan"
g = torch.Generator(device="cuda").manual_seed(0)
B, H, D = 4, 16, 64
x = [torch.randn(B, N, H, D, device="cuda", generator=g).bfloat16() for _ in range(3)]
mix = [torch.randn(H, D, D, device="cuda", generator=g) * .5,
       torch.randn(H, D, D, device="cuda", generator=g) * .1,
       torch.randn(H, D, device="cuda", generator=g) * .1]
ref = gmagen.compile(gmagen.gma(causal=causal), backend="triton", autotune="off")(*x, *mix)
y = gmagen.compile(gmagen.gma(causal=causal), backend="triton", config={plan: cfg})(*x, *mix)
torch.cuda.synchronize()
err = float((y.double() - ref.double()).norm() / ref.double().norm())
print(json.dumps({"error": err}))
"""


@pytest.mark.parametrize("plan,config", CASES,
                         ids=[f"{p}-" + "-".join(f"{k}{v}" for k, v in sorted(c.items()))
                              for p, c in CASES])
@pytest.mark.parametrize("N", [4099])
def test_config_runs_and_agrees(plan, config, N):
    out = subprocess.run([sys.executable, "-c", CHILD, plan, json.dumps(config), str(N)],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, CUDA_LAUNCH_BLOCKING="1"))
    assert out.returncode == 0, f"{plan} {config}: exit {out.returncode}\n{out.stderr[-1500:]}"
    err = json.loads(out.stdout.strip().splitlines()[-1])["error"]
    assert err <= 2e-2, f"{plan} {config}: differs from the default config by {err:.3e}"

"""Triton backward kernels (bidirectional and causal) on CUDA vs the oracle's analytic VJPs, every
variant and dtype, through gmagen.torch.gma; determinism of the gradients.

Skipped without a CUDA device (CI); run through scripts/gpu_run.sh on the GPU machine.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (run scripts/gpu_run.sh on the GPU machine)",
                allow_module_level=True)

import gmagen  # noqa: E402
import gmagen.torch as gt  # noqa: E402
from gmagen.cases import round_to  # noqa: E402
from gmagen.ir.oracle_grad import run_vjp  # noqa: E402

pytestmark = pytest.mark.gpu
GRAD_TOL = {"f32": 5e-4, "f16": 2e-2, "bf16": 4e-2}  # GMA_SPEC, gradients
TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
NAMES = ("q", "k", "v", "mean", "log_var", "logit")
VARIANTS = list(itertools.product((False, True), ("row", "slot"), ("diag", "spherical", "shared"),
                                  (False, True)))


def _case(seed, dtype, norm, cov, masked, B=2, N=300, H=2, D=64, Dv=64, K=32):
    rng = np.random.default_rng(seed)
    lv = {"diag": (H, K, D), "spherical": (H, K), "shared": (H,)}[cov]
    arrs = {"q": rng.normal(size=(B, N, H, D)), "k": rng.normal(size=(B, N, H, D)),
            "v": rng.normal(size=(B, N, H, Dv)), "mean": rng.normal(0, 0.5, (H, K, D)),
            "log_var": rng.normal(0, 0.1, lv), "logit": rng.normal(0, 0.1, (H, K))}
    arrs = {k: round_to(a, dtype if k in ("q", "k", "v") else "f32") for k, a in arrs.items()}
    mask = rng.random((B, N)) > 0.25 if masked else None
    dy = rng.normal(size=(B, N, H, Dv))
    return arrs, mask, dy


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("causal,norm,cov,masked", VARIANTS,
                         ids=[f"{'causal' if c else 'bidir'}-{n}-{v}{'-mask' if m else ''}"
                              for c, n, v, m in VARIANTS])
def test_backward_variant(causal, norm, cov, masked, dtype):
    arrs, mask, dy = _case(0, dtype, norm, cov, masked)
    prog = gmagen.gma(causal=causal, norm=norm, covariance=cov)
    ref = run_vjp(prog, {**arrs, "key_mask": mask}, {"y": dy})
    t = {k: torch.tensor(a, dtype=TORCH[dtype] if k in ("q", "k", "v") else torch.float32,
                         device="cuda", requires_grad=True) for k, a in arrs.items()}
    m = None if mask is None else torch.tensor(mask, device="cuda")
    y = gt.gma(*[t[k] for k in NAMES], causal=causal, norm=norm, key_mask=m, backend="triton")
    y.backward(torch.tensor(dy, dtype=y.dtype, device="cuda"))
    for name in NAMES:
        g = t[name].grad.double().cpu().numpy()
        err = np.linalg.norm(g - ref[name]) / np.linalg.norm(ref[name])
        assert err <= GRAD_TOL[dtype], f"d{name}: {err:.2e} > {GRAD_TOL[dtype]:.0e}"


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_backward_deterministic_at_benchmark_shape(causal):
    B, N, H, D, K = 4, 16384, 16, 64, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
               for _ in range(3))
    mix = [0.5 * torch.randn(H, K, D, device="cuda", generator=g),
           0.1 * torch.randn(H, K, D, device="cuda", generator=g),
           0.1 * torch.randn(H, K, device="cuda", generator=g)]
    dy = torch.randn(B, N, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, *mix)]
        gt.gma(*leaves, causal=causal, backend="triton").backward(dy)
        grads.append([x.grad for x in leaves])
    for name, a, b in zip(NAMES, *grads):
        assert torch.equal(a, b), f"d{name} differs between two runs"


def test_backward_refuses_large_heads_before_running():
    q = torch.randn(1, 8, 1, 128, device="cuda", requires_grad=True)
    mix = [torch.zeros(1, 4, 128, device="cuda"), torch.zeros(1, 4, 128, device="cuda"),
           torch.zeros(1, 4, device="cuda")]
    with pytest.raises(gmagen.errors.UnsupportedFeature, match="D=128"):
        gt.gma(q, q, q, *mix, backend="triton")
    with torch.no_grad():  # the forward alone runs
        assert gt.gma(q, q, q, *mix, backend="triton").shape == (1, 8, 1, 128)

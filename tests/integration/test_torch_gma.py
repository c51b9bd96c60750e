"""gmagen.torch: the custom op (forward, gradients, fake, torch.compile) and the
GaussianMixtureAttention layer, against the float64 oracle and its analytic VJPs."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gmagen  # noqa: E402

# Probe triton before torch's custom-op machinery imports it: without a GPU the
# probe must set TRITON_INTERPRET first (see backends/triton/__init__.py)
TRITON = gmagen.available_backends()["triton"]

import gmagen.torch as gt  # noqa: E402
from gmagen.errors import BackendUnavailable, FrameworkError, OptionError, ShapeError  # noqa: E402
from gmagen.torch.op import gma_op  # noqa: E402

NAMES = ("q", "k", "v", "mean", "log_var", "logit")
VARIANTS = list(itertools.product((False, True), ("row", "slot"), ("diag", "spherical", "shared")))
VIDS = [f"{'causal' if c else 'bidir'}-{n}-{v}" for c, n, v in VARIANTS]


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "NaN/inf"
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def inputs(seed, B=2, N=11, H=2, D=4, Dv=3, K=3, cov="diag", dtype=torch.float64, mask=False,
           init=False):
    g = torch.Generator().manual_seed(seed)
    lv = {"diag": (H, K, D), "spherical": (H, K), "shared": (H,)}[cov]
    t = {"q": torch.randn(B, N, H, D, generator=g), "k": torch.randn(B, N, H, D, generator=g),
         "v": torch.randn(B, N, H, Dv, generator=g),
         "mean": 0.5 * torch.randn(H, K, D, generator=g),
         "log_var": 0.1 * torch.randn(lv, generator=g), "logit": 0.1 * torch.randn(H, K, generator=g)}
    t = {k: v.to(dtype).requires_grad_() for k, v in t.items()}
    extra = {}
    if mask:
        m = torch.rand(B, N, generator=g) < 0.7
        m[0] = False  # a fully masked row
        extra["key_mask"] = m
    if init:
        extra["initial_state"] = (torch.rand(B, H, K, Dv, generator=g).to(dtype).requires_grad_(),
                                  torch.rand(B, H, K, generator=g).to(dtype).requires_grad_())
    return t, extra


def loss_and_grads(t, extra, **kw):
    """A loss using y and the state, and its gradients for every float input."""
    y, (s, n) = gt.gma(*[t[k] for k in NAMES], return_state=True, **extra, **kw)
    loss = (y * torch.cos(y)).sum() + (s * s).sum() + n.square().sum()
    wrt = [t[k] for k in NAMES] + list(extra.get("initial_state", ()))
    return y, torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("causal,norm,cov", VARIANTS, ids=VIDS)
def test_forward_matches_oracle(causal, norm, cov):
    t, extra = inputs(1, cov=cov, mask=True, init=causal)
    prog = gmagen.gma(causal=causal, norm=norm, covariance=cov)
    np_extra = {"key_mask": extra["key_mask"].numpy()}
    if causal:
        np_extra["initial_state"] = tuple(a.detach().numpy() for a in extra["initial_state"])
    ref, (rs, rn) = gmagen.compile(prog)(*[t[k].detach().numpy() for k in NAMES],
                                         return_state=True, **np_extra)
    for backend in ("torch", "numpy"):
        y, (s, n) = gt.gma(*[t[k] for k in NAMES], causal=causal, norm=norm, backend=backend,
                           return_state=True, **extra)
        assert y.dtype == torch.float64 and s.dtype == torch.float64
        assert rel(y, torch.from_numpy(ref)) < 1e-10, backend
        assert rel(s, torch.from_numpy(rs)) < 1e-10 and rel(n, torch.from_numpy(rn)) < 1e-10


@pytest.mark.parametrize("masked", [False, True], ids=["", "mask"])
@pytest.mark.parametrize("causal,norm,cov", VARIANTS, ids=VIDS)
def test_gradients_match_oracle_vjp(causal, norm, cov, masked):
    """torch-lowering autograd (recompute) vs the oracle's analytic VJPs, float64."""
    t, extra = inputs(2, cov=cov, mask=masked, init=causal)
    _, g_torch = loss_and_grads(t, extra, causal=causal, norm=norm, backend="torch")
    _, g_oracle = loss_and_grads(t, extra, causal=causal, norm=norm, backend="numpy")
    names = list(NAMES) + (["S0", "n0"] if causal else [])
    for name, a, b in zip(names, g_torch, g_oracle):
        assert a.shape == b.shape
        assert rel(a, b) < 1e-8, f"d{name}: {rel(a, b):.2e}"


def test_gradcheck_torch_backend():
    t, extra = inputs(3, B=1, N=6, H=1, D=2, Dv=2, K=2, init=True)
    s0, n0 = extra["initial_state"]

    def f(q, k, v, mean, log_var, logit, s0, n0):
        y, (s, n) = gt.gma(q, k, v, mean, log_var, logit, causal=True, norm="slot",
                           initial_state=(s0, n0), return_state=True, backend="torch")
        return y, s, n

    assert torch.autograd.gradcheck(f, [t[k] for k in NAMES] + [s0, n0])


def test_float32_gradients_within_contract():
    """float32 inputs: gradients within GMA_SPEC's 5e-4 of the float64 oracle's."""
    t64, extra = inputs(4, N=40, D=8, Dv=8, K=4, mask=True)
    t32 = {k: v.detach().float().requires_grad_() for k, v in t64.items()}
    _, g32 = loss_and_grads(t32, extra, causal=True, backend="torch")
    _, g64 = loss_and_grads(t64, extra, causal=True, backend="numpy")
    for name, a, b in zip(NAMES, g32, g64):
        assert a.dtype == torch.float32
        assert rel(a, b) < 5e-4, name


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_triton_forward_and_gradients(causal):
    """backend="triton": the Triton forward and backward kernels (interpreter here)."""
    if not TRITON:
        pytest.skip(f"triton: {TRITON.reason}")
    t64, extra = inputs(5, N=20, D=8, Dv=8, K=4, mask=True, init=causal)
    t32 = {k: v.detach().float().requires_grad_() for k, v in t64.items()}
    if causal:
        extra32 = {**extra, "initial_state": tuple(x.detach().float().requires_grad_()
                                                   for x in extra["initial_state"])}
    else:
        extra32 = extra
    y, g = loss_and_grads(t32, extra32, causal=causal, backend="triton")
    y_ref, g_ref = loss_and_grads(t64, extra, causal=causal, backend="numpy")
    assert rel(y, y_ref) < 1e-4
    for name, a, b in zip(NAMES, g, g_ref):
        assert rel(a, b) < 5e-4, name


def test_streaming_state_and_its_gradient():
    """Two causal pieces carrying the state give the one-pass y, and gradients
    flow through the carried state."""
    t, _ = inputs(6, N=17)
    args = [t[k] for k in NAMES]
    full = gt.gma(*args, causal=True, backend="torch")
    cut = 7
    a = [x[:, :cut] if i < 3 else x for i, x in enumerate(args)]
    b = [x[:, cut:] if i < 3 else x for i, x in enumerate(args)]
    y1, st = gt.gma(*a, causal=True, return_state=True, backend="torch")
    y2 = gt.gma(*b, causal=True, initial_state=st, backend="torch")
    pieces = torch.cat([y1, y2], 1)
    assert rel(pieces, full) < 1e-12
    w = torch.randn_like(full)
    g_full = torch.autograd.grad((full * w).sum(), args)
    g_cut = torch.autograd.grad((pieces * w).sum(), args)
    for name, x, y in zip(NAMES, g_cut, g_full):
        assert rel(x, y) < 1e-10, name


def test_bhnd_layout():
    t, _ = inputs(7)
    args = [t[k] for k in NAMES]
    y = gt.gma(*args, causal=True, backend="torch")
    tb = [x.transpose(1, 2) if i < 3 else x for i, x in enumerate(args)]
    yb = gt.gma(*tb, causal=True, layout="bhnd", backend="torch")
    assert yb.shape == (2, 2, 11, 3)
    assert rel(yb.transpose(1, 2), y) < 1e-12
    g = torch.autograd.grad(yb.square().sum(), args)
    g_ref = torch.autograd.grad(y.square().sum(), args)
    assert all(rel(a, b) < 1e-10 for a, b in zip(g, g_ref))


def test_opcheck():
    """Schema, fake tensor, autograd registration and AOT dispatch of the custom op."""
    t, extra = inputs(8, dtype=torch.float32, mask=True, init=True)
    s0, n0 = (x.detach().float() for x in extra["initial_state"])
    args = tuple(t[k].detach() for k in NAMES) + (extra["key_mask"], s0, n0, True, "slot", 1e-6,
                                                  "bnhd", "torch")
    torch.library.opcheck(gma_op, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    """No graph breaks (fullgraph=True), and the compiled forward and backward agree."""
    t, _ = inputs(9, dtype=torch.float32)
    args = [t[k] for k in NAMES]

    def f(*a):
        return gt.gma(*a, causal=True, backend="torch").square().sum()

    ref = torch.autograd.grad(f(*args), args)
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    got = torch.autograd.grad(compiled(*args), args)
    for name, a, b in zip(NAMES, got, ref):
        assert rel(a, b) < 1e-5, name


def test_backend_none_picks_torch_on_cpu(caplog):
    import gmagen.torch.functional as fn

    fn._picked.clear()
    t, _ = inputs(10, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="gmagen"):
        y = gt.gma(*[t[k] for k in NAMES])
    assert "picked 'torch' for cpu tensors" in caplog.text
    ref = gt.gma(*[t[k] for k in NAMES], backend="torch")
    assert torch.equal(y, ref)


def test_errors_name_the_argument():
    t, _ = inputs(11, dtype=torch.float32)
    args = [t[k] for k in NAMES]
    with pytest.raises(BackendUnavailable, match="backend='cupy'"):
        gt.gma(*args, backend="cupy")
    with pytest.raises(FrameworkError, match="initial_state is given but causal=False"):
        gt.gma(*args, initial_state=(torch.zeros(2, 2, 3, 3), torch.zeros(2, 2, 3)))
    with pytest.raises(FrameworkError, match="q must be a torch.Tensor"):
        gt.gma(np.zeros((2, 3, 2, 4)), *args[1:])
    with pytest.raises(OptionError, match="norm='max'"):
        gt.gma(*args, norm="max")
    with pytest.raises(ShapeError, match="k"):  # the kernel's call checks, before any kernel runs
        gt.gma(args[0], args[1][:, :, :, :3], *args[2:], backend="torch")


# -- the layer -------------------------------------------------------------------

def test_layer_shapes_init_and_gradients():
    torch.manual_seed(0)
    layer = gt.GaussianMixtureAttention(32, 4, num_components=8, causal=True)
    assert layer.mean.shape == (4, 8, 8) and layer.log_var.shape == (4, 8, 8)
    assert torch.allclose(layer.log_var, torch.full_like(layer.log_var, 0.5 * np.log(8)))
    x = torch.randn(2, 13, 32)
    y = layer(x)
    assert y.shape == (2, 13, 32)
    y.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_layer_causal_ignores_the_future():
    torch.manual_seed(1)
    layer = gt.GaussianMixtureAttention(16, 2, num_components=4, causal=True)
    x = torch.randn(1, 10, 16)
    x2 = x.clone()
    x2[:, 6:] += 5.0
    y, y2 = layer(x), layer(x2)
    assert torch.allclose(y[:, :6], y2[:, :6], atol=1e-6)
    assert not torch.allclose(y[:, 6:], y2[:, 6:], atol=1e-3)


def test_layer_key_padding_mask():
    """Padded keys (True, as nn.MultiheadAttention) change nothing for the others."""
    torch.manual_seed(2)
    layer = gt.GaussianMixtureAttention(16, 2, num_components=4)
    x = torch.randn(1, 10, 16)
    pad = torch.zeros(1, 10, dtype=torch.bool)
    pad[:, 7:] = True
    x2 = x.clone()
    x2[:, 7:] = 100.0
    y, y2 = layer(x, key_padding_mask=pad), layer(x2, key_padding_mask=pad)
    assert torch.allclose(y[:, :7], y2[:, :7], atol=1e-5)
    with pytest.raises(ShapeError, match="key_padding_mask"):
        layer(x, key_padding_mask=pad.float())


def test_layer_streams_with_state():
    torch.manual_seed(3)
    layer = gt.GaussianMixtureAttention(16, 2, num_components=4, causal=True, norm="slot",
                                        covariance="spherical").double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    full = layer(x)
    y1, st = layer(x[:, :5], return_state=True)
    y2 = layer(x[:, 5:], initial_state=st)
    assert rel(torch.cat([y1, y2], 1), full) < 1e-12


def test_layer_errors():
    with pytest.raises(ShapeError, match="embed_dim=30 is not divisible by num_heads=4"):
        gt.GaussianMixtureAttention(30, 4)
    layer = gt.GaussianMixtureAttention(16, 2)
    with pytest.raises(ShapeError, match=r"expected \[B, N, embed_dim=16\]"):
        layer(torch.randn(2, 3, 8))


def test_layer_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(4)
    layer = gt.GaussianMixtureAttention(16, 2, num_components=4, causal=True, backend="torch")
    x = torch.randn(2, 9, 16)
    ref = layer(x)
    ref.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    assert rel(y, ref) < 1e-6
    for n, p in layer.named_parameters():
        assert rel(p.grad, ref_grads[n]) < 1e-5, n


def test_triton_still_usable_after_gmagen_torch_on_cpu():
    """torch's custom-op machinery imports triton; gmagen.torch probes the triton
    backend first, so a later triton call in the same process still works."""
    import subprocess
    import sys

    code = ("import torch, gmagen.torch as gt, gmagen\n"
            "x = [torch.randn(1, 8, 2, 4, requires_grad=True) for _ in range(3)]\n"
            "y = gt.gma(*x, torch.randn(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3),"
            " causal=True)\n"
            "y.sum().backward()\n"
            "avail = gmagen.available_backends()['triton']\n"
            "print('TRITON', bool(avail), avail.reason)\n")
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a fresh user
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    if "triton is not installed" not in out.stdout:
        assert "TRITON True" in out.stdout, out.stdout


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_empty_sequence_gradients(causal):
    # N = 0: y is empty, the state is the initial one (causal) or zeros; gradients
    # of the tokens and mixture are zero, the initial state's is the state's cotangent
    H, K, D = 2, 3, 4
    q, k, v = (torch.randn(1, 0, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mix = [torch.randn(H, K, D, dtype=torch.float64, requires_grad=True),
           torch.zeros(H, K, D, dtype=torch.float64, requires_grad=True),
           torch.zeros(H, K, dtype=torch.float64, requires_grad=True)]
    kw = {}
    if causal:
        s0 = torch.randn(1, H, K, D, dtype=torch.float64, requires_grad=True)
        n0 = torch.rand(1, H, K, dtype=torch.float64, requires_grad=True)
        kw = {"initial_state": (s0, n0)}
    y, (s, n) = gt.gma(q, k, v, *mix, causal=causal, backend="torch", return_state=True, **kw)
    (y.sum() + 2 * s.sum() + 3 * n.sum()).backward()
    assert y.shape == (1, 0, H, D)
    assert all(float(t.grad.abs().sum()) == 0.0 for t in mix)
    if causal:
        assert torch.equal(s0.grad, torch.full_like(s0, 2.0))
        assert torch.equal(n0.grad, torch.full_like(n0, 3.0))

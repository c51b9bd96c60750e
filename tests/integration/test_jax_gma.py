"""gmagen.jax.gma: forward and gradients (custom VJP) vs the float64 oracle and its
analytic VJPs; jit(grad), vmap, streaming state, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import gmagen  # noqa: E402
import gmagen.jax as gj  # noqa: E402
from gmagen.errors import FrameworkError, OptionError, ShapeError  # noqa: E402
from gmagen.ir.oracle_grad import run_vjp  # noqa: E402

NAMES = ("q", "k", "v", "mean", "log_var", "logit")
VARIANTS = list(itertools.product((False, True), ("row", "slot"), ("diag", "spherical", "shared")))
VIDS = [f"{'causal' if c else 'bidir'}-{n}-{v}" for c, n, v in VARIANTS]
GRAD_TOL = 5e-4  # GMA_SPEC, float32 gradients


def case(seed, B=2, N=13, H=2, D=4, Dv=3, K=3, cov="diag", causal=False):
    rng = np.random.default_rng(seed)
    lv = {"diag": (H, K, D), "spherical": (H, K), "shared": (H,)}[cov]
    arrs = {"q": rng.normal(size=(B, N, H, D)), "k": rng.normal(size=(B, N, H, D)),
            "v": rng.normal(size=(B, N, H, Dv)), "mean": rng.normal(0, 0.5, (H, K, D)),
            "log_var": rng.normal(0, 0.1, lv), "logit": rng.normal(0, 0.1, (H, K))}
    arrs = {k: a.astype(np.float32) for k, a in arrs.items()}
    mask = rng.random((B, N)) < 0.7
    mask[0, :] = False  # a fully masked row
    init = ((rng.random((B, H, K, Dv)).astype(np.float32), rng.random((B, H, K)).astype(np.float32))
            if causal else None)
    dy = rng.normal(size=(B, N, H, Dv)).astype(np.float32)
    return arrs, mask, init, dy


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert np.isfinite(a).all()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("causal,norm,cov", VARIANTS, ids=VIDS)
def test_gradients_match_oracle(causal, norm, cov):
    arrs, mask, init, dy = case(1, cov=cov, causal=causal)
    ds = np.random.default_rng(2).normal(size=(2, 2, 3, 3)).astype(np.float32)

    def loss(q, k, v, mean, log_var, logit, init):
        y, (s, _) = gj.gma(q, k, v, mean, log_var, logit, causal=causal, norm=norm,
                           key_mask=jnp.asarray(mask), initial_state=init, return_state=True,
                           chunk=4)
        return jnp.sum(y * dy) + jnp.sum(s * ds)

    args = [jnp.asarray(arrs[n]) for n in NAMES]
    init_j = None if init is None else tuple(jnp.asarray(x) for x in init)
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(7))))(*args, init_j)
    prog = gmagen.gma(causal=causal, norm=norm, covariance=cov)
    feed = {**arrs, "key_mask": mask}
    if init is not None:
        feed["initial_state"] = init
    ref = run_vjp(prog, feed, {"y": dy, prog.state: (ds, None)})
    for name, g in zip(NAMES, grads):
        assert rel(g, ref[name]) < GRAD_TOL, name
    if causal:
        for g, r in zip(grads[6], ref["initial_state"]):
            assert rel(g, r) < GRAD_TOL


def test_forward_matches_oracle_and_state():
    arrs, mask, init, _ = case(3, causal=True)
    y, (s, n) = gj.gma(*[jnp.asarray(arrs[k]) for k in NAMES], causal=True,
                       key_mask=jnp.asarray(mask), initial_state=init, return_state=True)
    ref, (rs, rn) = gmagen.compile(gmagen.gma(causal=True))(
        *[arrs[k] for k in NAMES], key_mask=mask, initial_state=init, return_state=True)
    assert y.dtype == jnp.float32
    assert rel(y, ref) < 1e-4 and rel(s, rs) < 1e-4 and rel(n, rn) < 1e-4


def test_streaming_gradient_equals_full_pass():
    """Gradients through a state carried between two pieces equal the one-pass ones."""
    arrs, _, _, dy = case(4, N=17, causal=True)
    args = [jnp.asarray(arrs[k]) for k in NAMES]

    def full(*a):
        return jnp.sum(gj.gma(*a, causal=True, chunk=4) * dy)

    def pieces(*a):
        first = [x[:, :7] if i < 3 else x for i, x in enumerate(a)]
        rest = [x[:, 7:] if i < 3 else x for i, x in enumerate(a)]
        y1, st = gj.gma(*first, causal=True, return_state=True, chunk=4)
        y2 = gj.gma(*rest, causal=True, initial_state=st, chunk=4)
        return jnp.sum(jnp.concatenate([y1, y2], 1) * dy)

    g_full = jax.grad(full, argnums=tuple(range(6)))(*args)
    g_cut = jax.grad(pieces, argnums=tuple(range(6)))(*args)
    for name, a, b in zip(NAMES, g_cut, g_full):
        assert rel(a, b) < 1e-5, name


def test_vmap_matches_a_loop():
    arrs, _, _, _ = case(5)
    stack = {k: np.stack([arrs[k], 2.0 * arrs[k]]) if k in ("q", "k", "v") else arrs[k]
             for k in NAMES}
    f = jax.vmap(lambda q, k, v: gj.gma(q, k, v, *[jnp.asarray(stack[n]) for n in NAMES[3:]]))
    out = f(*[jnp.asarray(stack[n]) for n in ("q", "k", "v")])
    for i in range(2):
        one = gj.gma(*[jnp.asarray(stack[n][i]) for n in ("q", "k", "v")],
                     *[jnp.asarray(stack[n]) for n in NAMES[3:]])
        assert rel(out[i], one) < 1e-6


def test_errors_name_the_argument():
    arrs, _, _, _ = case(6)
    args = [jnp.asarray(arrs[k]) for k in NAMES]
    with pytest.raises(OptionError, match="norm='max'"):
        gj.gma(*args, norm="max")
    with pytest.raises(ShapeError, match="log_var has shape"):
        gj.gma(*args[:4], args[4][None], args[5])
    with pytest.raises(ShapeError, match="q and k must match"):
        gj.gma(args[0], args[1][:, :, :, :3], *args[2:])
    with pytest.raises(FrameworkError, match="initial_state is given but causal=False"):
        gj.gma(*args, initial_state=(jnp.zeros((2, 2, 3, 3)), jnp.zeros((2, 2, 3))))

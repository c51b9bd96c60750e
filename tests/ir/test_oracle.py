"""The float64 oracle (and the numpy backend built on it) against the quadratic
N x N form of GMA_SPEC, for every variant and every hard case."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

import gmagen
from gmagen.ir import oracle

TOL64 = 1e-10
CAUSAL = (False, True)
NORMS = ("row", "slot")
COVARIANCES = ("diag", "spherical", "shared")


@functools.lru_cache(maxsize=None)
def kernel(causal: bool, norm: str, covariance: str, layout: str = "bnhd"):
    return gmagen.compile(gmagen.gma(causal, norm, covariance, layout=layout), backend="numpy")


def _strided(rng, shape, how: str) -> np.ndarray:
    """A non-contiguous view with logical ``shape``: a slice of a bigger array or
    a transposed view, so that kernels cannot assume dense row-major input."""
    if how == "slice":
        big = rng.normal(size=tuple(2 * s + 1 for s in shape))
        view = big[tuple(slice(1, None, 2) for _ in shape)]
    else:  # transposed: stored in reversed axis order
        view = rng.normal(size=shape[::-1]).transpose(tuple(range(len(shape)))[::-1])
    assert view.shape == tuple(shape) and (len(shape) == 1 or not view.flags.c_contiguous)
    return view


BASE = {"B": 2, "N": 17, "H": 2, "D": 3, "Dv": 4, "K": 4}
# name -> (shape changes, make_inputs options); N = 63, 65, 130 are multiples of no
# tile, 64 and 128 sit exactly on the oracle's SCAN_CHUNK, 130 spans three chunks
CASES = {
    "plain": ({}, {}),
    "N1": ({"N": 1}, {}),
    "N63": ({"N": 63}, {}),
    "N64": ({"N": 64}, {}),
    "N65": ({"N": 65}, {}),
    "N128": ({"B": 1, "N": 128}, {}),
    "N130": ({"N": 130}, {}),
    "K1": ({"K": 1}, {}),
    "sharp": ({}, {"log_var_mean": -8.0}),   # tiny variances: near one-hot R
    "large": ({}, {"scale": 30.0}),          # q, k of magnitude ~30
    "fully-masked": ({}, {}),
    "strided": ({}, {}),
}


def _case(name: str, rng, covariance: str, mask: bool, make_inputs) -> dict:
    changes, opts = CASES[name]
    shape = {**BASE, **changes}
    inputs = make_inputs(rng, *shape.values(), covariance, mask, **opts)
    if name == "fully-masked":
        inputs["key_mask"][0] = False
        inputs["key_mask"][1, 0] = True  # the other row keeps a key
    if name == "strided":
        b, n, h, d, dv, k = shape.values()
        inputs["q"] = _strided(rng, (b, n, h, d), "slice")
        inputs["k"] = _strided(rng, (b, n, h, d), "transpose")
        inputs["v"] = np.swapaxes(rng.normal(size=(b, h, n, dv)), 1, 2)
        inputs["mean"] = 0.5 * _strided(rng, (h, k, d), "transpose")
        inputs["log_var"] = 0.1 * _strided(rng, inputs["log_var"].shape, "slice")
        inputs["logit"] = 0.1 * _strided(rng, (h, k), "transpose")
        if mask:
            inputs["key_mask"] = (rng.random((b, 2 * n)) < 0.75)[:, ::2]
    return inputs


def _params():
    for causal, norm, cov, mask, case in itertools.product(CAUSAL, NORMS, COVARIANCES,
                                                           (False, True), CASES):
        if case == "fully-masked" and not mask:
            continue
        shape = {**BASE, **CASES[case][0]}
        variant = f"{'causal' if causal else 'bidir'}-{norm}-{cov}{'-mask' if mask else ''}"
        name = "" if case == "plain" or case.startswith(("N", "K")) else f"-{case}"
        yield pytest.param(causal, norm, cov, mask, case,
                           id=f"B{shape['B']}-N{shape['N']}-K{shape['K']}-f64-{variant}{name}")


@pytest.mark.parametrize("causal, norm, covariance, mask, case", list(_params()))
def test_oracle_matches_quadratic(causal, norm, covariance, mask, case, rng, gma_ref):
    inputs = _case(case, rng, covariance, mask, gma_ref.make_inputs)
    ref = gma_ref.quadratic_gma(**inputs, causal=causal, norm=norm, covariance=covariance)
    kern = kernel(causal, norm, covariance)
    y = gma_ref.call(kern, inputs)
    gma_ref.assert_close(y, ref, TOL64, "numpy backend")
    y_oracle = oracle.run(kern.program, inputs)["y"]
    gma_ref.assert_close(y_oracle, ref, TOL64, "oracle.run")
    if case == "fully-masked":
        # no key writes anything: the numerator is 0 and eps > 0 keeps it finite
        assert np.all(y[0] == 0.0) and np.all(y_oracle[0] == 0.0)
        assert np.abs(y[1]).sum() > 0


@pytest.mark.parametrize("causal", CAUSAL, ids=["bidir", "causal"])
def test_everything_masked_gives_zero(causal, rng, gma_ref):
    inputs = gma_ref.make_inputs(rng, 2, 9, 2, 3, 4, 3, mask=True)
    inputs["key_mask"][:] = False
    for norm in NORMS:
        y, (s, n) = gma_ref.call(kernel(causal, norm, "diag"), inputs, return_state=True)
        assert np.all(y == 0.0) and np.all(s == 0.0) and np.all(n == 0.0)


@pytest.mark.parametrize("causal", CAUSAL, ids=["bidir", "causal"])
def test_oracle_run_bhnd_layout(causal, rng, gma_ref):
    inputs = gma_ref.make_inputs(rng, 2, 11, 3, 4, 5, 3, mask=True)
    ref = gma_ref.quadratic_gma(**inputs, causal=causal, norm="row")
    program = gmagen.gma(causal, layout="bhnd")
    swapped = {name: (np.swapaxes(x, 1, 2) if name in "qkv" else x)
               for name, x in inputs.items()}
    y = oracle.run(program, swapped)["y"]
    assert y.shape == (2, 3, 11, 5)
    gma_ref.assert_close(np.swapaxes(y, 1, 2), ref, TOL64)


# -- responsibilities ----------------------------------------------------------

@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("case", ["normal", "sharp", "large", "K1"])
def test_responsibility_is_a_softmax(covariance, case, rng, gma_ref):
    K = 1 if case == "K1" else 5
    opts = {"sharp": {"log_var_mean": -8.0}, "large": {"scale": 30.0}}.get(case, {})
    inputs = gma_ref.make_inputs(rng, 2, 13, 3, 4, 2, K, covariance, **opts)
    mix = (inputs["mean"], inputs["log_var"], inputs["logit"])
    r = oracle.responsibility(inputs["q"], *mix, covariance=covariance)
    assert r.shape == (2, 13, 3, K) and r.dtype == np.float64
    assert np.all(r >= 0.0) and not np.isnan(r).any()
    np.testing.assert_allclose(r.sum(-1), 1.0, rtol=0, atol=1e-12)
    gma_ref.assert_close(r, gma_ref.ref_responsibility(inputs["q"], *mix, covariance), TOL64)
    if case == "sharp":  # tiny variances: nearly one-hot rows
        assert np.median(r.max(-1)) > 0.99
    # the public entry point picks the covariance from log_var's rank
    r_api = gmagen.responsibilities(inputs["q"], *mix)
    gma_ref.assert_close(r_api, r, TOL64, "gmagen.responsibilities")


def _expanded(mean, log_var, logit, covariance):
    """GMA_SPEC: l = (x*x) @ A^T + x @ Bm^T + c, per head."""
    h, k, d = mean.shape
    if covariance == "diag":
        rho = log_var
    elif covariance == "spherical":
        rho = np.repeat(log_var[:, :, None], d, 2)
    else:
        rho = np.tile(log_var[:, None, None], (1, k, d))
    a = -np.exp(-rho) / 2                                         # [H, K, D]
    bm = mean * np.exp(-rho)                                      # [H, K, D]
    c = logit - 0.5 * (mean ** 2 * np.exp(-rho) + rho).sum(-1)    # [H, K]
    return a, bm, c


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_expanded_logits_identity(covariance, rng, gma_ref):
    inputs = gma_ref.make_inputs(rng, 2, 21, 3, 6, 2, 5, covariance)
    x, mix = inputs["k"], (inputs["mean"], inputs["log_var"], inputs["logit"])
    a, bm, c = _expanded(*mix, covariance)
    expanded = (np.einsum("bnhd,hkd->bnhk", x * x, a) + np.einsum("bnhd,hkd->bnhk", x, bm) + c)
    direct = oracle.responsibility_logits(x, *mix, covariance=covariance)
    gma_ref.assert_close(expanded, direct, TOL64, "expanded logits")
    gma_ref.assert_close(direct, gma_ref.ref_logits(x, *mix, covariance), TOL64, "logits")
    if covariance == "shared":
        # the x*x term is the same for every k and drops out of the softmax
        lin = np.einsum("bnhd,hkd->bnhk", x, bm) + c
        e = np.exp(lin - lin.max(-1, keepdims=True))
        gma_ref.assert_close(e / e.sum(-1, keepdims=True),
                             oracle.responsibility(x, *mix, covariance=covariance), TOL64)

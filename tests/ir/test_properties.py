"""Property tests over random small shapes and variants (hypothesis)."""

from __future__ import annotations

import functools

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gmagen

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@functools.lru_cache(maxsize=None)
def kernel(causal: bool, norm: str, covariance: str, eps: float = 1e-6):
    return gmagen.compile(gmagen.gma(causal, norm, covariance, eps), backend="numpy")


@st.composite
def cases(draw):
    shape = dict(B=draw(st.integers(1, 2)), N=draw(st.integers(1, 40)),
                 H=draw(st.integers(1, 3)), D=draw(st.integers(1, 9)),
                 Dv=draw(st.integers(1, 6)), K=draw(st.integers(1, 6)))
    variant = dict(causal=draw(st.booleans()), norm=draw(st.sampled_from(["row", "slot"])),
                   covariance=draw(st.sampled_from(["diag", "spherical", "shared"])))
    mask = draw(st.booleans())
    # the seed comes from hypothesis so that a failing example replays exactly
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return shape, variant, mask, seed


@SETTINGS
@given(cases())
def test_oracle_equals_quadratic_form(gma_ref, case):
    shape, variant, mask, seed = case
    inputs = gma_ref.make_inputs(np.random.default_rng(seed), *shape.values(),
                                 variant["covariance"], mask)
    y = gma_ref.call(kernel(**variant), inputs)
    gma_ref.assert_close(y, gma_ref.quadratic_gma(**inputs, **variant), 1e-10)


@SETTINGS
@given(cases())
def test_y_is_a_convex_combination_of_values(gma_ref, case):
    """Row-stochastic affinity: each y_i lies in the box of the values it sees
    (keys j <= i when causal, unmasked keys only), and is 0 if it sees none."""
    shape, variant, mask, seed = case
    eps = 1e-14  # eps shrinks y towards 0; negligible next to sum_j A_ij here
    inputs = gma_ref.make_inputs(np.random.default_rng(seed), *shape.values(),
                                 variant["covariance"], mask)
    y = gma_ref.call(kernel(**variant, eps=eps), inputs)
    v = inputs["v"]
    m = inputs.get("key_mask", np.ones(v.shape[:2], dtype=bool))
    slack = 1e-9 * (1.0 + np.abs(v).max())
    for b in range(v.shape[0]):
        for i in range(v.shape[1]):
            seen = m[b, : i + 1] if variant["causal"] else m[b]
            vis = v[b, : len(seen)][seen]  # [#visible, H, Dv]
            if len(vis) == 0:
                assert np.all(y[b, i] == 0.0)
                continue
            assert np.all(y[b, i] >= vis.min(0) - slack), (b, i)
            assert np.all(y[b, i] <= vis.max(0) + slack), (b, i)


@SETTINGS
@given(cases())
def test_affinity_is_row_stochastic_through_constant_values(gma_ref, case):
    """v = c for every key: y_i = c wherever query i sees a key (row norm)."""
    shape, variant, mask, seed = case
    rng = np.random.default_rng(seed)
    inputs = gma_ref.make_inputs(rng, *shape.values(), variant["covariance"], mask)
    c = rng.normal(size=shape["Dv"])
    inputs["v"] = np.broadcast_to(c, inputs["v"].shape)
    variant["norm"] = "row"
    y = gma_ref.call(kernel(**variant, eps=1e-300), inputs)
    m = inputs.get("key_mask", np.ones(inputs["v"].shape[:2], dtype=bool))
    sees = np.cumsum(m, axis=1) > 0 if variant["causal"] else np.repeat(
        m.any(1, keepdims=True), m.shape[1], axis=1)
    np.testing.assert_allclose(y[sees], np.broadcast_to(c, y[sees].shape), rtol=1e-12,
                               atol=1e-12)

"""Streaming: a causal sequence run in pieces, each piece starting from the state
the previous one returned, equals one pass (GMA_SPEC "causal_scan")."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import gmagen

TOL64 = 1e-10
TOKENS = ("q", "k", "v")


@functools.lru_cache(maxsize=None)
def kernel(causal: bool, norm: str = "row", covariance: str = "diag"):
    return gmagen.compile(gmagen.gma(causal, norm, covariance), backend="numpy")


def _piece(inputs: dict, lo: int, hi: int) -> dict:
    out = dict(inputs)
    for name in TOKENS:
        out[name] = inputs[name][:, lo:hi]
    if "key_mask" in inputs:
        out["key_mask"] = inputs["key_mask"][:, lo:hi]
    return out


def _run_pieces(gma_ref, kern, inputs: dict, bounds: list[int]):
    """y and final state from running [bounds[i], bounds[i+1]) one after another."""
    state, ys = None, []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        extra = {} if state is None else {"initial_state": state}
        y, state = gma_ref.call(kern, _piece(inputs, lo, hi), **extra, return_state=True)
        ys.append(y)
    return np.concatenate(ys, axis=1), state


@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_scan_split_at_every_boundary(norm, mask, rng, gma_ref):
    n = 20
    inputs = gma_ref.make_inputs(rng, 2, n, 2, 3, 4, 5, mask=mask)
    kern = kernel(True, norm)
    y_full, (s_full, n_full) = gma_ref.call(kern, inputs, return_state=True)
    gma_ref.assert_close(y_full, gma_ref.quadratic_gma(**inputs, causal=True, norm=norm), TOL64)
    # t = 0 and t = n put an empty piece first or last: the state passes through
    for t in range(n + 1):
        y, (s, nn) = _run_pieces(gma_ref, kern, inputs, [0, t, n])
        gma_ref.assert_close(y, y_full, TOL64, f"y split at {t}")
        gma_ref.assert_close(s, s_full, TOL64, f"S split at {t}")
        gma_ref.assert_close(nn, n_full, TOL64, f"n split at {t}")


@pytest.mark.parametrize("covariance", ["diag", "spherical", "shared"])
def test_scan_many_pieces(covariance, rng, gma_ref):
    n = 150  # crosses the oracle's 64-token chunks inside pieces too
    inputs = gma_ref.make_inputs(rng, 2, n, 2, 3, 4, 3, covariance, mask=True)
    kern = kernel(True, "row", covariance)
    y_full, state_full = gma_ref.call(kern, inputs, return_state=True)
    cuts = sorted(rng.choice(np.arange(1, n), size=6, replace=False).tolist())
    y, state = _run_pieces(gma_ref, kern, inputs, [0] + cuts + [n])
    gma_ref.assert_close(y, y_full, TOL64)
    gma_ref.assert_close(state[0], state_full[0], TOL64, "S")
    gma_ref.assert_close(state[1], state_full[1], TOL64, "n")


def test_scan_one_token_at_a_time(rng, gma_ref):
    """Decoding: N = 1 per call."""
    n = 12
    inputs = gma_ref.make_inputs(rng, 2, n, 3, 4, 2, 4, mask=True)
    kern = kernel(True, "slot")
    y_full, state_full = gma_ref.call(kern, inputs, return_state=True)
    y, state = _run_pieces(gma_ref, kern, inputs, list(range(n + 1)))
    gma_ref.assert_close(y, y_full, TOL64)
    gma_ref.assert_close(state[1], state_full[1], TOL64, "n")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_state_is_the_complete_memory(causal, rng, gma_ref):
    inputs = gma_ref.make_inputs(rng, 2, 19, 3, 4, 5, 6, mask=True)
    _, (s, n) = gma_ref.call(kernel(causal), inputs, return_state=True)
    s_ref, n_ref = gma_ref.ref_state(inputs["k"], inputs["v"], inputs["mean"],
                                     inputs["log_var"], inputs["logit"],
                                     key_mask=inputs["key_mask"])
    assert s.shape == (2, 3, 6, 5) and n.shape == (2, 3, 6)
    gma_ref.assert_close(s, s_ref, TOL64, "S")
    gma_ref.assert_close(n, n_ref, TOL64, "n")


def test_initial_state_adds_to_every_prefix(rng, gma_ref):
    """S(i) = S0 + sum_{j<=i} ...: a state from another sequence shifts every read."""
    a = gma_ref.make_inputs(rng, 1, 7, 2, 3, 4, 3)
    b = gma_ref.make_inputs(rng, 1, 9, 2, 3, 4, 3)
    for name in ("mean", "log_var", "logit"):
        b[name] = a[name]
    kern = kernel(True)
    _, state_a = gma_ref.call(kern, a, return_state=True)
    y_b, state_b = gma_ref.call(kern, b, initial_state=state_a, return_state=True)
    joined = {name: (np.concatenate([a[name], b[name]], axis=1) if name in TOKENS else a[name])
              for name in a}
    y_ref = gma_ref.quadratic_gma(**joined, causal=True, norm="row")[:, 7:]
    gma_ref.assert_close(y_b, y_ref, TOL64)
    _, state_joined = gma_ref.call(kern, joined, return_state=True)
    gma_ref.assert_close(state_b[0], state_joined[0], TOL64, "S")


def test_scan_split_bhnd(rng, gma_ref):
    """The state has no layout: pieces in "bhnd" continue like pieces in "bnhd"."""
    inputs = gma_ref.make_inputs(rng, 2, 16, 3, 4, 5, 3, mask=True)
    y_full, state_full = gma_ref.call(kernel(True), inputs, return_state=True)
    swapped = {n: (np.swapaxes(x, 1, 2) if n in TOKENS else x) for n, x in inputs.items()}
    first = {n: (x[:, :, :5] if n in TOKENS else x[:, :5] if n == "key_mask" else x)
             for n, x in swapped.items()}
    rest = {n: (x[:, :, 5:] if n in TOKENS else x[:, 5:] if n == "key_mask" else x)
            for n, x in swapped.items()}
    y1, state = gma_ref.call(kernel(True), first, layout="bhnd", return_state=True)
    y2, state = gma_ref.call(kernel(True), rest, layout="bhnd", initial_state=state,
                             return_state=True)
    y = np.swapaxes(np.concatenate([y1, y2], axis=2), 1, 2)
    gma_ref.assert_close(y, y_full, TOL64)
    gma_ref.assert_close(state[0], state_full[0], TOL64, "S")

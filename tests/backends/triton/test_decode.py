"""Causal GMA on the Triton backend's decoding kernel (gma_decode_fwd: calls with
N <= decode_max_n, 16 by default) against the numpy oracle and against the
chunked scan (decode_max_n=0), with and without a carried state."""

from __future__ import annotations

import pytest

import gmagen

_TRITON = gmagen.available_backends()["triton"]
if not _TRITON:
    pytest.skip(f"triton backend unavailable: {_TRITON.reason}", allow_module_level=True)

import torch  # noqa: E402  (after the backend's probe, see conftest)

BASE = (2, 9, 3, 20, 33, 5)  # hard cases of this module start from this shape
MAX_N = 16                    # ... and stay on the decoding path
CHUNKED = {"decode_max_n": 0}


def _names(launches) -> list[str]:
    return [name for name, _ in launches]


@pytest.mark.parametrize("init", [False, True], ids=["noinit", "init"])
def test_decode(variant, init, rng, gma_ref, tri, launches):
    norm, covariance, mask = variant
    B, N, H, D, Dv, K = BASE
    inputs = tri.make_case(rng, gma_ref, BASE, covariance, mask)
    extra = {"initial_state": tri.init_state(rng, B, H, K, Dv)} if init else {}
    tri.check(gma_ref, True, norm, covariance, inputs, **extra)
    assert launches == [("gma_decode_fwd", (B * H, 1, 1))]


@pytest.mark.parametrize("norm, covariance, init", [("row", "diag", False),
                                                    ("slot", "spherical", True)],
                         ids=["row-diag", "slot-spherical-init"])
def test_decode_hard(hard, norm, covariance, init, rng, gma_ref, tri, launches):
    B, N, H, D, Dv, K = hard.shape
    inputs = tri.hard_case(rng, gma_ref, hard, covariance)
    extra = {"initial_state": tri.init_state(rng, B, H, K, Dv)} if init else {}
    y, (S, n) = tri.check(gma_ref, True, norm, covariance, inputs, layout=hard.layout,
                          config=tri.scan_config(**hard.knobs) if hard.knobs else None,
                          **extra)
    assert set(_names(launches)) == {"gma_decode_fwd"}
    if hard.kind == "fully-masked" and not init:
        assert torch.all(S[0] == 0) and torch.all(n[0] == 0) and torch.all(y[0] == 0)


@pytest.mark.parametrize("N", [1, 7, 16])
@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_decode_matches_chunked(N, norm, mask, rng, gma_ref, tri, launches):
    """decode_max_n=0 (chunked scan) and the default (decoding kernel) agree,
    and both match the oracle."""
    B, _, H, D, Dv, K = BASE
    inputs = tri.make_case(rng, gma_ref, (B, N, H, D, Dv, K), "diag", mask)
    init = tri.init_state(rng, B, H, K, Dv)
    y_dec, (S_dec, n_dec) = tri.check(gma_ref, True, norm, "diag", inputs, initial_state=init)
    y_chk, (S_chk, n_chk) = tri.check(gma_ref, True, norm, "diag", inputs, initial_state=init,
                                      config=tri.scan_config(**CHUNKED))
    assert _names(launches) == ["gma_decode_fwd", "gma_scan_fwd"]
    gma_ref.assert_close(y_dec, y_chk, tri.TOL, "y decode vs chunked")
    gma_ref.assert_close(S_dec, S_chk, tri.TOL, "S decode vs chunked")
    gma_ref.assert_close(n_dec, n_chk, tri.TOL, "n decode vs chunked")


@pytest.mark.parametrize("N, kernel", [(16, "gma_decode_fwd"), (17, "gma_scan_fwd")])
def test_decode_max_n_boundary(N, kernel, rng, gma_ref, tri, launches):
    B, _, H, D, Dv, K = BASE
    inputs = tri.make_case(rng, gma_ref, (B, N, H, D, Dv, K), "spherical", True)
    tri.check(gma_ref, True, "row", "spherical", inputs)
    assert _names(launches)[-1] == kernel


def test_decode_max_n_config(rng, gma_ref, tri, launches):
    """decode_max_n=40 sends a 33-token call to the decoding kernel."""
    B, _, H, D, Dv, K = BASE
    inputs = tri.make_case(rng, gma_ref, (B, 33, H, D, Dv, K), "diag", True)
    tri.check(gma_ref, True, "slot", "diag", inputs, config=tri.scan_config(decode_max_n=40))
    assert _names(launches) == ["gma_decode_fwd"]


def _split(tri, kern, inputs: dict, bounds: list[int], state=None):
    ys = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        extra = {} if state is None else {"initial_state": state}
        y, state = tri.run(kern, tri.piece(inputs, lo, hi), **extra)
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("bounds", [[0, 16, 32, 40], [0, 0, 9, 16, 16, 30], list(range(13))],
                         ids=["pieces-16-16-8", "empty-pieces", "one-token-at-a-time"])
@pytest.mark.parametrize("norm", ["row", "slot"])
def test_decode_split(bounds, norm, rng, gma_ref, tri, launches):
    """Decoding piece by piece (every piece <= 16 tokens, empty ones pass the
    state through) equals one pass: y and final state."""
    B, _, H, D, Dv, K = BASE
    N = bounds[-1]
    inputs = tri.make_case(rng, gma_ref, (B, N, H, D, Dv, K), "diag", mask=True)
    init = tri.init_state(rng, B, H, K, Dv)
    y_full, (S_full, n_full) = tri.check(gma_ref, True, norm, "diag", inputs,
                                         initial_state=init)
    launches.clear()
    y, (S, n) = _split(tri, tri.kernel(True, norm, "diag"), inputs, bounds, state=init)
    assert set(_names(launches)) == {"gma_decode_fwd"}
    gma_ref.assert_close(y, y_full, tri.TOL, "y of the pieces")
    gma_ref.assert_close(S, S_full, tri.TOL, "final S of the pieces")
    gma_ref.assert_close(n, n_full, tri.TOL, "final n of the pieces")


def test_decode_deterministic(rng, gma_ref, tri):
    B, N, H, D, Dv, K = 2, 16, 2, 20, 100, 5
    inputs = tri.make_case(rng, gma_ref, (B, N, H, D, Dv, K), "diag", mask=True)
    kern = tri.kernel(True, "row", "diag")
    init = tri.init_state(rng, B, H, K, Dv)
    y1, (S1, n1) = tri.run(kern, inputs, initial_state=init)
    y2, (S2, n2) = tri.run(kern, inputs, initial_state=init)
    assert torch.equal(y1, y2) and torch.equal(S1, S2) and torch.equal(n1, n2)


@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_decode_qk_mixtures(norm, mask, rng, gma_ref, tri, launches):
    B, N, H, D, Dv, K = BASE
    inputs = tri.make_case(rng, gma_ref, BASE, "spherical", mask, qk=True)
    tri.check(gma_ref, True, norm, "spherical", inputs, qk=True,
              initial_state=tri.init_state(rng, B, H, K, Dv))
    assert _names(launches) == ["gma_decode_fwd"]

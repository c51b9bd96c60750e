"""Causal GMA on the Triton backend's chunked path (gma_write_fwd for the states
entering each segment, then gma_scan_fwd) against the numpy oracle: y and the
final state (S, n), float32 in the interpreter."""

from __future__ import annotations

import pytest

import gmagen
from gmagen import dsl

_TRITON = gmagen.available_backends()["triton"]
if not _TRITON:
    pytest.skip(f"triton backend unavailable: {_TRITON.reason}", allow_module_level=True)

import torch  # noqa: E402  (after the backend's probe, see conftest)

BASE = (2, 63, 3, 20, 33, 5)  # N > decode_max_n: the chunked scan runs
CHUNKED = {"decode_max_n": 0}  # the chunked scan even for N <= 16


@pytest.mark.parametrize("init", [False, True], ids=["noinit", "init"])
def test_scan(variant, init, rng, gma_ref, tri):
    norm, covariance, mask = variant
    B, N, H, D, Dv, K = BASE
    inputs = tri.make_case(rng, gma_ref, BASE, covariance, mask)
    extra = {"initial_state": tri.init_state(rng, B, H, K, Dv)} if init else {}
    tri.check(gma_ref, True, norm, covariance, inputs, **extra)


@pytest.mark.parametrize("norm", ["row", "slot"])
def test_scan_hard(hard, norm, rng, gma_ref, tri):
    inputs = tri.hard_case(rng, gma_ref, hard, "diag")
    y, (S, n) = tri.check(gma_ref, True, norm, "diag", inputs, layout=hard.layout,
                          config=tri.scan_config(**hard.knobs, **CHUNKED))
    if hard.kind == "fully-masked":  # nothing written: S = n = 0 and y = 0 / (0 + eps)
        assert torch.all(S[0] == 0) and torch.all(n[0] == 0) and torch.all(y[0] == 0)
        assert torch.any(y[1] != 0)


@pytest.mark.parametrize("covariance", ["spherical", "shared"])
def test_scan_hard_covariance(hard, covariance, rng, gma_ref, tri):
    norm = "row" if covariance == "spherical" else "slot"
    B, N, H, D, Dv, K = hard.shape
    inputs = tri.hard_case(rng, gma_ref, hard, covariance)
    tri.check(gma_ref, True, norm, covariance, inputs, layout=hard.layout,
              config=tri.scan_config(**hard.knobs, **CHUNKED),
              initial_state=tri.init_state(rng, B, H, K, Dv))


@pytest.mark.parametrize("N", [63, 130], ids=["N63", "N130"])
@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("init", [False, True], ids=["noinit", "init"])
def test_scan_segments(N, norm, init, rng, gma_ref, tri, launches):
    """Three segments of 16-token chunks: segments 1 and 2 start from the
    initial state plus gma_write_fwd partials of the earlier segments (with
    N = 63 the last segment is empty and only writes the final state)."""
    B, _, H, D, Dv, K = BASE
    inputs = tri.make_case(rng, gma_ref, (B, N, H, D, Dv, K), "diag", mask=True)
    extra = {"initial_state": tri.init_state(rng, B, H, K, Dv)} if init else {}
    config = tri.scan_config(block_n=16, segments=3)
    tri.check(gma_ref, True, norm, "diag", inputs, config=config, **extra)
    # partials of segments 0 and 1, then the scan
    assert launches == [("gma_write_fwd", (B * H, 2, 1)), ("gma_scan_fwd", (B * H, 3, 1))]
    assert tri.kernel(True, norm, "diag", config=config).config["segments"] == 3


def test_scan_one_segment(rng, gma_ref, tri, launches):
    B, N, H, D, Dv, K = BASE
    inputs = tri.make_case(rng, gma_ref, BASE, "diag", mask=True)
    tri.check(gma_ref, True, "row", "diag", inputs,
              config=tri.scan_config(block_n=16, segments=1))
    assert launches == [("gma_scan_fwd", (B * H, 1, 1))]


@pytest.mark.parametrize("norm", ["row", "slot"])
def test_scan_segments_dv_blocks(norm, rng, gma_ref, tri):
    """Segments x Dv blocks: every (segment, Dv block) program sums its own partials."""
    B, N, H, D, Dv, K = 1, 100, 3, 20, 100, 33
    inputs = tri.make_case(rng, gma_ref, (B, N, H, D, Dv, K), "spherical", mask=True)
    tri.check(gma_ref, True, norm, "spherical", inputs,
              config=tri.scan_config(block_n=16, block_dv=32, segments=3),
              initial_state=tri.init_state(rng, B, H, K, Dv))


@pytest.mark.parametrize("covariance", ["diag", "spherical"])
def test_scan_streamed(covariance, rng, gma_ref, tri):
    """D x BLOCK_K past 8192 floats: the logits loop over D chunks at run time
    (prelude's streamed path), through segment partials and the scan."""
    B, N, H, D, Dv, K = 2, 70, 3, 130, 20, 65
    inputs = tri.make_case(rng, gma_ref, (B, N, H, D, Dv, K), covariance, True)
    config = tri.scan_config(block_n=16, segments=3)
    tri.check(gma_ref, True, "slot", covariance, inputs, config=config,
              initial_state=tri.init_state(rng, B, H, K, Dv))
    assert "for d0 in range(0, D, BLOCK_D):" in tri.kernel(
        True, "slot", covariance, config=config).source


@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("N", [9, 63], ids=["decode-N9", "chunked-N63"])
def test_scan_eps(norm, N, rng, gma_ref, tri):
    """A non-default eps reaches both generated kernels (EPS is a constant of the source)."""
    B, _, H, D, Dv, K = BASE
    inputs = tri.make_case(rng, gma_ref, (B, N, H, D, Dv, K), "diag", True)
    tri.check(gma_ref, True, norm, "diag", inputs, eps=0.5)


def _split(tri, kern, inputs: dict, bounds: list[int], layout: str = "bnhd", state=None):
    """y of pieces [bounds[i], bounds[i+1]) run one after another, each from the
    state the previous one returned, and the last state."""
    ys = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        extra = {} if state is None else {"initial_state": state}
        y, state = tri.run(kern, tri.piece(inputs, lo, hi, layout), layout, **extra)
        ys.append(y)
    return torch.cat(ys, dim=1 if layout == "bnhd" else 2), state


@pytest.mark.parametrize("bounds, mask", [([0, 50, 97, 130], True), ([0, 70, 130], False),
                                          ([0, 12, 80, 96], True)],
                         ids=["chunked-3-mask", "chunked-2", "decode-chunked-decode-mask"])
@pytest.mark.parametrize("norm", ["row", "slot"])
def test_scan_split(bounds, mask, norm, rng, gma_ref, tri):
    """A sequence in pieces (pieces of > 16 tokens run the chunked scan, shorter
    ones the decoding kernel), each from the previous piece's state, equals one
    pass: y and final state."""
    B, _, H, D, Dv, K = BASE
    N = bounds[-1]
    inputs = tri.make_case(rng, gma_ref, (B, N, H, D, Dv, K), "diag", mask)
    y_full, (S_full, n_full) = tri.check(gma_ref, True, norm, "diag", inputs)
    kern = tri.kernel(True, norm, "diag")
    y, (S, n) = _split(tri, kern, inputs, bounds)
    gma_ref.assert_close(y, y_full, tri.TOL, "y of the pieces")
    gma_ref.assert_close(S, S_full, tri.TOL, "final S of the pieces")
    gma_ref.assert_close(n, n_full, tri.TOL, "final n of the pieces")


def test_scan_split_bhnd_from_state(rng, gma_ref, tri):
    """Pieces in layout bhnd, the first one also continuing a given state."""
    B, _, H, D, Dv, K = BASE
    N = 100
    inputs = tri.make_case(rng, gma_ref, (B, N, H, D, Dv, K), "shared", True, hard="bhnd")
    init = tri.init_state(rng, B, H, K, Dv)
    y_full, (S_full, n_full) = tri.check(gma_ref, True, "slot", "shared", inputs,
                                         layout="bhnd", initial_state=init)
    kern = tri.kernel(True, "slot", "shared", layout="bhnd")
    y, (S, n) = _split(tri, kern, inputs, [0, 40, 100], "bhnd", state=init)
    gma_ref.assert_close(y, y_full, tri.TOL, "y of the pieces")
    gma_ref.assert_close(S, S_full, tri.TOL, "final S of the pieces")
    gma_ref.assert_close(n, n_full, tri.TOL, "final n of the pieces")


@pytest.mark.parametrize("segments", [0, 3], ids=["segments-auto", "segments3"])
def test_scan_deterministic(segments, rng, gma_ref, tri):
    B, _, H, D, Dv, K = BASE
    inputs = tri.make_case(rng, gma_ref, (B, 130, H, D, Dv, K), "diag", mask=True)
    kern = tri.kernel(True, "slot", "diag", config=tri.scan_config(block_n=16,
                                                                   segments=segments))
    init = tri.init_state(rng, B, H, K, Dv)
    y1, (S1, n1) = tri.run(kern, inputs, initial_state=init)
    y2, (S2, n2) = tri.run(kern, inputs, initial_state=init)
    assert torch.equal(y1, y2) and torch.equal(S1, S2) and torch.equal(n1, n2)


@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_scan_qk_mixtures(norm, mask, rng, gma_ref, tri):
    B, N, H, D, Dv, K = BASE
    inputs = tri.make_case(rng, gma_ref, BASE, "diag", mask, qk=True)
    tri.check(gma_ref, True, norm, "diag", inputs, qk=True,
              initial_state=tri.init_state(rng, B, H, K, Dv))
    assert tri.kernel(True, norm, "diag", qk=True).program.name == \
        dsl.gma_qk_mixtures(True, norm).name


def test_scan_qk_mixtures_segments(rng, gma_ref, tri):
    """Separate mixtures through the segment partials (gma_write_fwd of the keys)."""
    B, _, H, D, Dv, K = BASE
    inputs = tri.make_case(rng, gma_ref, (B, 130, H, D, Dv, K), "spherical", True, qk=True)
    tri.check(gma_ref, True, "row", "spherical", inputs, qk=True,
              config=tri.scan_config(block_n=16, segments=3))

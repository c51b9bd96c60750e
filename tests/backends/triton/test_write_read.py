"""Bidirectional GMA on the Triton backend (gma_write_fwd, gma_reduce, gma_read_fwd)
against the numpy oracle: y and the complete state (S, n), float32 in the interpreter."""

from __future__ import annotations

import pytest

import gmagen
from gmagen import dsl

_TRITON = gmagen.available_backends()["triton"]
if not _TRITON:
    pytest.skip(f"triton backend unavailable: {_TRITON.reason}", allow_module_level=True)

import torch  # noqa: E402  (after the backend's probe, see conftest)


def test_write_read(variant, rng, gma_ref, tri):
    norm, covariance, mask = variant
    inputs = tri.make_case(rng, gma_ref, tri.BASE, covariance, mask)
    tri.check(gma_ref, False, norm, covariance, inputs)


@pytest.mark.parametrize("norm", ["row", "slot"])
def test_write_read_hard(hard, norm, rng, gma_ref, tri):
    inputs = tri.hard_case(rng, gma_ref, hard, "diag")
    y, (S, n) = tri.check(gma_ref, False, norm, "diag", inputs, layout=hard.layout,
                          config=tri.bidir_config(**hard.knobs) if hard.knobs else None)
    if hard.kind == "fully-masked":  # nothing written: S = n = 0 and y = 0 / (0 + eps)
        assert torch.all(S[0] == 0) and torch.all(n[0] == 0) and torch.all(y[0] == 0)
        assert torch.any(y[1] != 0)


@pytest.mark.parametrize("covariance", ["spherical", "shared"])
def test_write_read_hard_covariance(hard, covariance, rng, gma_ref, tri):
    norm = "slot" if covariance == "spherical" else "row"
    inputs = tri.hard_case(rng, gma_ref, hard, covariance)
    tri.check(gma_ref, False, norm, covariance, inputs, layout=hard.layout,
              config=tri.bidir_config(**hard.knobs) if hard.knobs else None)


@pytest.mark.parametrize("N", [63, 130], ids=["N63", "N130"])
@pytest.mark.parametrize("norm", ["row", "slot"])
def test_write_read_segments(N, norm, rng, gma_ref, tri, launches):
    """Three segments of 16-token tiles: gma_write_fwd partials summed by gma_reduce
    (with N = 63 the last segment is empty)."""
    B, _, H, D, Dv, K = tri.BASE
    inputs = tri.make_case(rng, gma_ref, (B, N, H, D, Dv, K), "diag", mask=True)
    config = tri.bidir_config(block_n=16, segments=3)
    tri.check(gma_ref, False, norm, "diag", inputs, config=config)
    assert launches == [("gma_write_fwd", (B * H, 3, 1)), ("gma_reduce", (B * H, 1, 1)),
                        ("gma_read_fwd", (B * H, 3, 1))]
    assert tri.kernel(False, norm, "diag", config=config).config["gma_write"]["segments"] == 3


def test_write_read_one_segment(rng, gma_ref, tri, launches):
    """segments=1: gma_write_fwd writes the memory directly, no reduce."""
    B, N, H, D, Dv, K = tri.BASE
    inputs = tri.make_case(rng, gma_ref, tri.BASE, "spherical", mask=True)
    tri.check(gma_ref, False, "slot", "spherical", inputs,
              config=tri.bidir_config(block_n=16, segments=1))
    assert [name for name, _ in launches] == ["gma_write_fwd", "gma_read_fwd"]


@pytest.mark.parametrize("segments", [0, 3], ids=["segments-auto", "segments3"])
def test_write_read_deterministic(segments, rng, gma_ref, tri):
    B, _, H, D, Dv, K = tri.BASE
    inputs = tri.make_case(rng, gma_ref, (B, 130, H, D, Dv, K), "diag", mask=True)
    kern = tri.kernel(False, "row", "diag", config=tri.bidir_config(block_n=16,
                                                                    segments=segments))
    y1, (S1, n1) = tri.run(kern, inputs)
    y2, (S2, n2) = tri.run(kern, inputs)
    assert torch.equal(y1, y2) and torch.equal(S1, S2) and torch.equal(n1, n2)


@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_write_read_qk_mixtures(norm, mask, rng, gma_ref, tri):
    inputs = tri.make_case(rng, gma_ref, tri.BASE, "diag", mask, qk=True)
    tri.check(gma_ref, False, norm, "diag", inputs, qk=True)
    assert tri.kernel(False, norm, "diag", qk=True).program.name == \
        dsl.gma_qk_mixtures(False, norm).name


def test_write_read_strided_qk_mixtures(rng, gma_ref, tri):
    inputs = tri.make_case(rng, gma_ref, tri.BASE, "spherical", True, hard="strided", qk=True)
    tri.check(gma_ref, False, "slot", "spherical", inputs, qk=True)


@pytest.mark.parametrize("covariance", ["diag", "spherical"])
def test_write_read_streamed(covariance, rng, gma_ref, tri):
    """D x BLOCK_K past 8192 floats: the logits loop over D chunks at run time,
    reloading each chunk's coefficients (prelude's streamed path)."""
    B, N, H, D, Dv, K = 2, 40, 3, 130, 20, 65
    inputs = tri.make_case(rng, gma_ref, (B, N, H, D, Dv, K), covariance, True)
    tri.check(gma_ref, False, "row", covariance, inputs,
              config=tri.bidir_config(block_n=16, segments=2))
    assert "for d0 in range(0, D, BLOCK_D):" in tri.kernel(
        False, "row", covariance, config=tri.bidir_config(block_n=16, segments=2)).source


@pytest.mark.parametrize("norm", ["row", "slot"])
def test_write_read_eps(norm, rng, gma_ref, tri):
    """A non-default eps reaches the generated kernel (EPS is a constant of the source)."""
    inputs = tri.make_case(rng, gma_ref, tri.BASE, "diag", True)
    tri.check(gma_ref, False, norm, "diag", inputs, eps=0.5)


def test_write_read_outputs_fresh(rng, gma_ref, tri):
    """Outputs are new tensors each call (never a previous call's buffer)."""
    inputs = tri.make_case(rng, gma_ref, tri.BASE, "diag", True)
    kern = tri.kernel(False, "row", "diag")
    y1, (S1, n1) = tri.run(kern, inputs)
    y2, (S2, n2) = tri.run(kern, inputs)
    assert y1.data_ptr() != y2.data_ptr() and S1.data_ptr() != S2.data_ptr()

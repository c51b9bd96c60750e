"""gmagen.responsibilities on the Triton backend (gma_responsibility_fwd) against
the numpy oracle, both layouts, every covariance and the hard cases."""

from __future__ import annotations

import pytest

import gmagen

_TRITON = gmagen.available_backends()["triton"]
if not _TRITON:
    pytest.skip(f"triton backend unavailable: {_TRITON.reason}", allow_module_level=True)

import torch  # noqa: E402  (after the backend's probe, see conftest)

BASE = (2, 63, 3, 20, 33, 5)
COVARIANCES = ("diag", "spherical", "shared")


def _mixture(inputs: dict) -> tuple:
    return inputs["mean"], inputs["log_var"], inputs["logit"]


def _oracle(inputs: dict, layout: str):
    f64 = [t.double().numpy() for t in (inputs["q"], *_mixture(inputs))]
    return gmagen.responsibilities(*f64, backend="numpy", layout=layout)


def _check(gma_ref, tri, r, inputs: dict, layout: str) -> None:
    B, N, H = (inputs["q"].shape[i] for i in ((0, 1, 2) if layout == "bnhd" else (0, 2, 1)))
    K = inputs["mean"].shape[1]
    assert tuple(r.shape) == ((B, N, H, K) if layout == "bnhd" else (B, H, N, K))
    assert r.dtype == torch.float32
    gma_ref.assert_close(r, _oracle(inputs, layout), tri.TOL, "R")
    assert torch.all(r >= 0)
    torch.testing.assert_close(r.sum(-1), torch.ones_like(r[..., 0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("covariance", COVARIANCES)
def test_responsibility(covariance, layout, rng, gma_ref, tri):
    inputs = tri.make_case(rng, gma_ref, BASE, covariance, hard=layout)
    r = gmagen.responsibilities(inputs["q"], *_mixture(inputs), backend="triton", layout=layout)
    _check(gma_ref, tri, r, inputs, layout)


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_responsibility_hard(hard, covariance, rng, gma_ref, tri):
    inputs = tri.hard_case(rng, gma_ref, hard, covariance, mask=False)
    # the program behind gmagen.responsibilities, compiled with the case's knobs
    # (block_dv is no knob of this kernel: values do not enter it)
    knobs = {k: v for k, v in hard.knobs.items() if k != "block_dv"}
    kern = tri.responsibility_kernel(covariance, hard.layout, **knobs)
    r = kern(inputs["q"], *_mixture(inputs), layout=hard.layout)
    _check(gma_ref, tri, r, inputs, hard.layout)
    if hard.kind == "sharp":  # tiny variances: nearly one-hot rows
        assert r.max(-1).values.median() > 0.99


@pytest.mark.parametrize("block_n", [16, 128])
def test_responsibility_block_n(block_n, rng, gma_ref, tri, launches):
    B, N, H, D, Dv, K = BASE
    inputs = tri.make_case(rng, gma_ref, (B, 130, H, D, Dv, K), "diag")
    kern = tri.responsibility_kernel("diag", "bnhd", block_n=block_n)
    _check(gma_ref, tri, kern(inputs["q"], *_mixture(inputs)), inputs, "bnhd")
    assert launches == [("gma_responsibility_fwd", (B * H, -(-130 // block_n)))]


def test_responsibility_deterministic(rng, gma_ref, tri):
    inputs = tri.make_case(rng, gma_ref, BASE, "diag")
    r1 = gmagen.responsibilities(inputs["q"], *_mixture(inputs), backend="triton")
    r2 = gmagen.responsibilities(inputs["q"], *_mixture(inputs), backend="triton")
    assert torch.equal(r1, r2)

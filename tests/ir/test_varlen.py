"""Packed variable-length input (cu_seqlens, B = 1) equals each sequence run alone."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

import gmagen
from gmagen.errors import DTypeError, ShapeError

TOL64 = 1e-10
TOKENS = ("q", "k", "v")
H, D, DV, K = 2, 3, 4, 5


@functools.lru_cache(maxsize=None)
def kernel(causal: bool, norm: str = "row"):
    return gmagen.compile(gmagen.gma(causal, norm), backend="numpy")


def _packed(gma_ref, rng, lengths, mask: bool):
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    inputs = gma_ref.make_inputs(rng, 1, int(cu[-1]), H, D, DV, K, mask=mask)
    inputs["cu_seqlens"] = cu
    return inputs, cu


def _one(inputs: dict, lo: int, hi: int) -> dict:
    out = {name: x for name, x in inputs.items() if name != "cu_seqlens"}
    for name in TOKENS:
        out[name] = inputs[name][:, lo:hi]
    if "key_mask" in inputs:
        out["key_mask"] = inputs["key_mask"][:, lo:hi]
    return out


# zero-length sequences first, inside, and last
LENGTHS = [pytest.param([0, 5, 0, 17, 1, 0, 70, 9, 0], id="S9-N102-zero-len"),
           pytest.param([13], id="S1-N13")]


# bidirectional programs take no initial_state
VARIANTS = [pytest.param(causal, norm, mask, state,
                         id=f"{'causal' if causal else 'bidir'}-{norm}{'-mask' if mask else ''}"
                            f"{'-initial-state' if state else ''}")
            for causal, norm, mask, state in itertools.product((False, True), ("row", "slot"),
                                                               (False, True), (False, True))
            if causal or not state]


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("causal, norm, mask, with_state", VARIANTS)
def test_varlen_matches_one_by_one(lengths, causal, norm, mask, with_state, rng, gma_ref):
    inputs, cu = _packed(gma_ref, rng, lengths, mask)
    s = len(lengths)
    extra = {}
    if with_state:
        extra["initial_state"] = (rng.normal(size=(s, H, K, DV)), rng.random((s, H, K)))
    kern = kernel(causal, norm)
    y, (s_mem, n_mem) = gma_ref.call(kern, inputs, **extra, return_state=True)
    assert y.shape == (1, cu[-1], H, DV)
    assert s_mem.shape == (s, H, K, DV) and n_mem.shape == (s, H, K)
    for i, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
        one = {}
        if with_state:
            one["initial_state"] = (extra["initial_state"][0][i:i + 1],
                                    extra["initial_state"][1][i:i + 1])
        if hi == lo:  # nothing to read or write: the state passes through unchanged
            s_ref = one["initial_state"][0] if with_state else np.zeros((1, H, K, DV))
            n_ref = one["initial_state"][1] if with_state else np.zeros((1, H, K))
        else:
            y_ref, (s_ref, n_ref) = gma_ref.call(kern, _one(inputs, lo, hi), **one,
                                                 return_state=True)
            gma_ref.assert_close(y[:, lo:hi], y_ref, TOL64, f"y of sequence {i}")
        np.testing.assert_allclose(s_mem[i:i + 1], s_ref, rtol=1e-12, atol=1e-12,
                                   err_msg=f"S of sequence {i}")
        np.testing.assert_allclose(n_mem[i:i + 1], n_ref, rtol=1e-12, atol=1e-12,
                                   err_msg=f"n of sequence {i}")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_varlen_against_quadratic(causal, rng, gma_ref):
    """Independent of the one-by-one path: the quadratic form per sequence."""
    inputs, cu = _packed(gma_ref, rng, [6, 0, 11, 3], mask=True)
    y = gma_ref.call(kernel(causal), inputs)
    for lo, hi in zip(cu[:-1], cu[1:]):
        if hi > lo:
            ref = gma_ref.quadratic_gma(**_one(inputs, lo, hi), causal=causal, norm="row")
            gma_ref.assert_close(y[:, lo:hi], ref, TOL64)


BAD_CU = [
    pytest.param([1, 4, 10], id="not-starting-at-0"),
    pytest.param([0, 6, 4, 10], id="decreasing"),
    pytest.param([0, 4, 9], id="not-ending-at-N"),
    pytest.param([0, 4, 11], id="past-N"),
    pytest.param([], id="empty"),
]


@pytest.mark.parametrize("cu", BAD_CU)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_bad_cu_seqlens(cu, causal, rng, gma_ref):
    inputs = gma_ref.make_inputs(rng, 1, 10, H, D, DV, K)
    with pytest.raises(ShapeError, match="cu_seqlens") as info:
        gma_ref.call(kernel(causal), inputs, cu_seqlens=np.array(cu, dtype=np.int32))
    assert isinstance(info.value, ValueError)
    assert "N=10" in str(info.value)


def test_cu_seqlens_needs_batch_one(rng, gma_ref):
    inputs = gma_ref.make_inputs(rng, 2, 10, H, D, DV, K)
    with pytest.raises(ShapeError, match=r"cu_seqlens.*B=2"):
        gma_ref.call(kernel(True), inputs, cu_seqlens=np.array([0, 4, 10], dtype=np.int32))


def test_cu_seqlens_dtype_and_rank(rng, gma_ref):
    inputs = gma_ref.make_inputs(rng, 1, 10, H, D, DV, K)
    with pytest.raises(DTypeError, match=r"cu_seqlens.*float32"):
        gma_ref.call(kernel(False), inputs, cu_seqlens=np.array([0, 4, 10], dtype=np.float32))
    with pytest.raises(ShapeError, match="cu_seqlens"):
        gma_ref.call(kernel(False), inputs, cu_seqlens=np.array([[0, 4, 10]], dtype=np.int32))


def test_varlen_initial_state_needs_one_row_per_sequence(rng, gma_ref):
    inputs, _ = _packed(gma_ref, rng, [4, 6], mask=False)
    bad = (np.zeros((1, H, K, DV)), np.zeros((1, H, K)))  # B rows, not S = 2
    with pytest.raises(ShapeError, match=r"initial_state.*cu_seqlens"):
        gma_ref.call(kernel(True), inputs, initial_state=bad)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_varlen_bhnd(causal, rng, gma_ref):
    inputs, cu = _packed(gma_ref, rng, [7, 0, 12], mask=True)
    y_ref, state_ref = gma_ref.call(kernel(causal), inputs, return_state=True)
    swapped = {n: (np.swapaxes(x, 1, 2) if n in TOKENS else x) for n, x in inputs.items()}
    y, state = gma_ref.call(kernel(causal), swapped, layout="bhnd", return_state=True)
    gma_ref.assert_close(np.swapaxes(y, 1, 2), y_ref, TOL64)
    gma_ref.assert_close(state[0], state_ref[0], TOL64, "S")

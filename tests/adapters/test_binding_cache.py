"""A kernel remembers the Binding of each call signature (checks.signature), so
that repeated calls (a decode loop) skip the argument checks: the remembered
Binding must be exactly what ``bind`` gives, and any argument that differs in
dtype, shape, strides, device or presence must be checked again (and get its
error)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gmagen
from gmagen import errors
from gmagen.adapters import checks

B, N, H, D, DV, K = 2, 9, 3, 8, 5, 4


def _args(rng, n: int = N, dtype=np.float32) -> list:
    shapes = [(B, n, H, D), (B, n, H, D), (B, n, H, DV), (H, K, D), (H, K, D), (H, K)]
    return [rng.normal(size=s).astype(dtype) for s in shapes]


def _counting(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    real = checks.bind

    def bind(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(checks, "bind", bind)
    return calls


def test_repeated_calls_are_checked_once_and_stay_right(rng, monkeypatch):
    calls = _counting(monkeypatch)
    kern = gmagen.compile(gmagen.gma(causal=True), backend="numpy")
    for _ in range(3):  # fresh values, one signature
        args = _args(rng)
        y = kern(*args)
        want = gmagen.compile(gmagen.gma(causal=True), backend="numpy", autotune="off")(*args)
        np.testing.assert_array_equal(y, want)
    assert len(calls) == 1 + 3  # the kernel once; the fresh reference kernels once each


def test_a_different_argument_is_checked_again(rng, monkeypatch):
    kern = gmagen.compile(gmagen.gma(), backend="numpy")
    kern(*_args(rng))
    calls = _counting(monkeypatch)
    kern(*_args(rng, n=N + 1))                               # new N
    kern(*_args(rng, dtype=np.float64))                       # new dtype
    args = _args(rng)
    kern(*args[:3], *(np.asfortranarray(a) for a in args[3:]))  # new strides
    kern(*args, key_mask=np.ones((B, N), dtype=bool))          # an optional input
    assert len(calls) == 4
    bad = _args(rng)
    bad[4] = bad[4][:, :, :-1]                                # log_var [H, K, D - 1]
    with pytest.raises(errors.ShapeError, match="log_var"):
        kern(*bad)
    flipped = _args(rng)
    flipped[0] = flipped[0][:, ::-1]                          # negative strides
    with pytest.raises(errors.LayoutError, match="negative strides"):
        kern(*flipped)
    with pytest.raises(errors.LayoutError, match="negative strides"):
        kern(*flipped)                                        # an error is never remembered


def test_packed_sequences_are_always_checked(rng):
    """cu_seqlens on the CPU is read (its values must match N): no signature."""
    program = gmagen.gma(causal=True)
    args = dict(zip(("q", "k", "v", "mean", "log_var", "logit"), _args(rng)))
    args["cu_seqlens"] = np.array([0, 4, N], dtype=np.int32)
    assert checks.signature(program, args) is None


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), layout=st.sampled_from(["bnhd", "bhnd"]),
       dtype=st.sampled_from([np.float32, np.float64]), mask=st.booleans(),
       transpose_mean=st.booleans())
def test_equal_signatures_bind_equally(n, layout, dtype, mask, transpose_mean):
    """Two calls with one signature but different values bind to the same Binding
    (the property the cache relies on)."""
    program = gmagen.gma(causal=True)
    rng = np.random.default_rng(n)

    def args() -> dict:
        tok = (B, n, H, D) if layout == "bnhd" else (B, H, n, D)
        tokv = tok[:3] + (DV,)
        mean = rng.normal(size=(H, D, K)).astype(np.float32).transpose(0, 2, 1) \
            if transpose_mean else rng.normal(size=(H, K, D)).astype(np.float32)
        out = {"q": rng.normal(size=tok).astype(dtype), "k": rng.normal(size=tok).astype(dtype),
               "v": rng.normal(size=tokv).astype(dtype), "mean": mean,
               "log_var": rng.normal(size=(H, K, D)).astype(np.float32),
               "logit": rng.normal(size=(H, K)).astype(np.float32)}
        if mask:
            out["key_mask"] = rng.random((B, n)) < .5
        return out
    a, b = args(), args()
    assert checks.signature(program, a) == checks.signature(program, b) is not None
    bind = [checks.bind(program, x, layout, ("f32", "f64"), ("cpu",), "numpy") for x in (a, b)]
    assert bind[0] == bind[1] and bind[0].key == bind[1].key


def test_torch_calls_are_remembered_by_dtype_shape_stride_and_device(rng, monkeypatch):
    torch = pytest.importorskip("torch")
    kern = gmagen.compile(gmagen.gma(causal=True), backend="torch")
    calls = _counting(monkeypatch)
    for _ in range(2):
        kern(*(torch.from_numpy(a) for a in _args(rng)))
    kern(*(torch.from_numpy(a).double() for a in _args(rng)))              # new dtype
    args = [torch.from_numpy(a) for a in _args(rng)]
    args[3] = torch.from_numpy(rng.normal(size=(H, D, K)).astype(np.float32)).permute(0, 2, 1)
    kern(*args)                                                             # new strides
    kern(*args)
    assert len(calls) == 3

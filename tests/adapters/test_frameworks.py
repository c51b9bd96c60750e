"""NumPy, torch and JAX arrays in, the same framework out (DLPack adapters)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import gmagen
from gmagen.ir import oracle

try:  # each framework is optional; its cases skip without it
    import torch
except ImportError:
    torch = None
try:
    import jax
    import jax.numpy as jnp
except ImportError:
    jax = jnp = None
try:
    import ml_dtypes  # NumPy's bfloat16
except ImportError:
    ml_dtypes = None

TOKENS = ("q", "k", "v")
B, N, H, D, DV, K = 2, 37, 3, 8, 5, 4


@functools.lru_cache(maxsize=None)
def kernel(causal: bool, layout: str = "bnhd"):
    return gmagen.compile(gmagen.gma(causal, layout=layout), backend="numpy")


def _np_dtype(dtype: str):
    return ml_dtypes.bfloat16 if dtype == "bf16" else {"f16": np.float16, "f32": np.float32,
                                                         "f64": np.float64}[dtype]


def need(framework: str, dtype: str = "f64") -> None:
    if framework in ("torch", "jax") and {"torch": torch, "jax": jax}[framework] is None:
        pytest.skip(f"{framework} is not installed")
    if framework == "numpy" and dtype == "bf16" and ml_dtypes is None:
        pytest.skip("ml_dtypes is not installed")


def convert(x, framework: str, dtype: str):
    """One array in ``framework`` and IR ``dtype`` (bool arrays keep their dtype)."""
    need(framework, dtype)
    if framework == "numpy":
        return x if x.dtype == bool else x.astype(_np_dtype(dtype))
    if framework == "torch":
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t if x.dtype == bool else t.to({"bf16": torch.bfloat16, "f16": torch.float16,
                                                "f32": torch.float32, "f64": torch.float64}[dtype])
    dt = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}[dtype]
    return jnp.asarray(x) if x.dtype == bool else jnp.asarray(x.astype(np.float32), dtype=dt)


def _is_framework(y, framework: str) -> bool:
    if framework == "numpy":
        return type(y) is np.ndarray
    if framework == "torch":
        return isinstance(y, torch.Tensor) and y.device.type == "cpu"
    return isinstance(y, jax.Array) and {d.platform for d in y.devices()} == {"cpu"}


def _dtype_name(y) -> str:
    return {"float64": "f64", "float32": "f32", "float16": "f16",
            "bfloat16": "bf16"}[str(y.dtype).removeprefix("torch.")]


CASES = [("numpy", "f64"), ("numpy", "f32"), ("numpy", "f16"), ("numpy", "bf16"),
         ("torch", "f64"), ("torch", "f32"), ("torch", "f16"), ("torch", "bf16"),
         ("jax", "f32"), ("jax", "f16"), ("jax", "bf16")]


@pytest.mark.parametrize("framework, dtype", [
    pytest.param(fw, dt, id=f"B{B}-N{N}-K{K}-{dt}-{fw}") for fw, dt in CASES])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_framework_round_trip(framework, dtype, causal, rng, gma_ref):
    host = gma_ref.make_inputs(rng, B, N, H, D, DV, K, mask=True)
    inputs = {name: convert(x, framework, dtype) for name, x in host.items()}
    y, (s, n) = gma_ref.call(kernel(causal), inputs, return_state=True)
    assert _is_framework(y, framework) and _is_framework(s, framework)
    assert _dtype_name(y) == dtype, "y comes back in the dtype of v"
    assert tuple(y.shape) == (B, N, H, DV)
    # the oracle on the values actually passed (low precision upcasts exactly)
    exact = {name: gma_ref.to_f64(x) if x.dtype != bool else np.asarray(x)
             for name, x in inputs.items()}
    ref = oracle.run(kernel(causal).program, exact)
    gma_ref.assert_close(y, ref["y"], gma_ref.TOL[dtype], f"{framework} {dtype}")
    # the state is accumulated in at least float32 whatever the token dtype
    gma_ref.assert_close(s, ref[kernel(causal).program.state][0], 1e-6, "S")


def test_mixture_dtype_may_differ_from_tokens(rng, gma_ref):
    need("torch")
    host = gma_ref.make_inputs(rng, B, N, H, D, DV, K)
    inputs = {n: torch.from_numpy(x).to(torch.bfloat16 if n in TOKENS else torch.float32)
              for n, x in host.items()}
    y = gma_ref.call(kernel(True), inputs)
    assert y.dtype == torch.bfloat16
    exact = {n: gma_ref.to_f64(x) for n, x in inputs.items()}
    gma_ref.assert_close(y, oracle.run(kernel(True).program, exact)["y"], gma_ref.TOL["bf16"])


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_bhnd_layout(framework, causal, rng, gma_ref):
    host = gma_ref.make_inputs(rng, B, N, H, D, DV, K, mask=True)
    dtype = "f32" if framework == "jax" else "f64"
    tol = gma_ref.TOL[dtype]
    ref = gma_ref.call(kernel(causal), {n: convert(x, framework, dtype) for n, x in host.items()})
    bhnd = {n: convert(np.ascontiguousarray(np.swapaxes(x, 1, 2)) if n in TOKENS else x,
                       framework, dtype) for n, x in host.items()}
    # the layout given per call, and the layout built into the program
    for y in (gma_ref.call(kernel(causal), bhnd, layout="bhnd"),
              gma_ref.call(kernel(causal, "bhnd"), bhnd)):
        assert _is_framework(y, framework)
        assert tuple(y.shape) == (B, H, N, DV)
        gma_ref.assert_close(np.swapaxes(gma_ref.to_f64(y), 1, 2), ref, tol)


def _torch_views(host: dict) -> dict:
    """Non-contiguous torch views with the logical shapes of ``host``."""
    out = {}
    for name, x in host.items():
        t = torch.from_numpy(x)
        if name in ("q", "v"):  # stored [B, H, N, X], viewed [B, N, H, X]
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        elif name == "k":       # every other element of a bigger tensor
            big = torch.zeros((B, 2 * N, H, 2 * D), dtype=t.dtype)
            big[:, ::2, :, ::2] = t
            t = big[:, ::2, :, ::2]
        elif name == "mean":
            t = t.permute(2, 1, 0).contiguous().permute(2, 1, 0)
        assert name not in ("q", "k", "v", "mean") or not t.is_contiguous()
        out[name] = t
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_noncontiguous_torch(causal, rng, gma_ref):
    need("torch")
    host = gma_ref.make_inputs(rng, B, N, H, D, DV, K, mask=True)
    y = gma_ref.call(kernel(causal), _torch_views(host))
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    ref = gma_ref.quadratic_gma(**host, causal=causal, norm="row")
    gma_ref.assert_close(y, ref, gma_ref.TOL["f64"])


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_noncontiguous_numpy(causal, rng, gma_ref):
    host = gma_ref.make_inputs(rng, B, N, H, D, DV, K, mask=True)
    views = dict(host)
    views["q"] = np.swapaxes(np.ascontiguousarray(np.swapaxes(host["q"], 1, 2)), 1, 2)
    big = np.zeros((B, N, H, 3 * DV))
    big[..., 1::3] = host["v"]
    views["v"] = big[..., 1::3]
    views["mean"] = np.asfortranarray(host["mean"])
    assert not (views["q"].flags.c_contiguous or views["v"].flags.c_contiguous)
    y = gma_ref.call(kernel(causal), views)
    gma_ref.assert_close(y, gma_ref.quadratic_gma(**host, causal=causal, norm="row"),
                         gma_ref.TOL["f64"])


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_state_round_trip_in_framework(framework, rng, gma_ref):
    """The state a call returns is accepted back as initial_state."""
    host = gma_ref.make_inputs(rng, 1, 24, H, D, DV, K)
    dtype = "f32"
    inputs = {n: convert(x, framework, dtype) for n, x in host.items()}
    kern = kernel(True)
    y_full = gma_ref.call(kern, inputs)
    first = {n: (x[:, :10] if n in TOKENS else x) for n, x in inputs.items()}
    rest = {n: (x[:, 10:] if n in TOKENS else x) for n, x in inputs.items()}
    y1, state = gma_ref.call(kern, first, return_state=True)
    assert all(_is_framework(a, framework) for a in state)
    y2 = gma_ref.call(kern, rest, initial_state=state)
    y = np.concatenate([gma_ref.to_f64(y1), gma_ref.to_f64(y2)], axis=1)
    gma_ref.assert_close(y, y_full, gma_ref.TOL[dtype])


def test_torch_inputs_are_not_modified(rng, gma_ref):
    need("torch")
    host = gma_ref.make_inputs(rng, B, N, H, D, DV, K, mask=True)
    inputs = {n: torch.from_numpy(x.copy()) for n, x in host.items()}
    gma_ref.call(kernel(True), inputs, return_state=True)
    for n, x in host.items():
        assert np.array_equal(inputs[n].numpy(), x), n

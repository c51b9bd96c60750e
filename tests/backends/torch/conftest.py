"""Helpers of the torch backend's tests: torch inputs in any float dtype, cached
kernels, and the comparison with the float64 numpy oracle on the same values.

Test modules reach the helpers through the session fixture ``tb`` (conftests
are not imported by name, see tests/conftest.py).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import pytest

import gmagen
from gmagen import dsl

TORCH = gmagen.available_backends()["torch"]
# GMA_SPEC precision contract: forward and gradient columns
TOL = {"f64": 1e-10, "f32": 1e-4, "f16": 1e-2, "bf16": 2e-2}
GRAD_TOL = {"f64": 1e-8, "f32": 5e-4, "f16": 2e-2, "bf16": 4e-2}
TOKENS = ("q", "k", "v")


def torch_dtype(name: str) -> Any:
    import torch

    return {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32,
            "f64": torch.float64}[name]


# -- kernels ---------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def kernel(causal: bool = False, norm: str = "row", covariance: str = "diag", *,
           layout: str = "bnhd", backend: str = "torch", chunk: Optional[int] = None,
           qk: bool = False, eps: float = 1e-6):
    """A compiled canonical GMA program (``qk``: gma_qk_mixtures), cached."""
    build = dsl.gma_qk_mixtures if qk else gmagen.gma
    program = build(causal, norm, covariance, eps, layout=layout)
    return gmagen.compile(program, backend=backend,
                          config=None if chunk is None else {"chunk": chunk})


# -- inputs ----------------------------------------------------------------------

def to_torch(raw: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Torch copies of float64 NumPy inputs in ``dtype`` (the bool key mask stays bool)."""
    import torch

    out: dict[str, Any] = {}
    for name, x in raw.items():
        if isinstance(x, tuple):
            out[name] = tuple(torch.tensor(a, dtype=torch.float32) for a in x)
        elif name == "key_mask":
            out[name] = torch.tensor(np.asarray(x, dtype=bool))
        else:
            out[name] = torch.tensor(x, dtype=torch.float64).to(torch_dtype(dtype))
    return out


def oracle_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The exact values given to the torch backend, as float64 NumPy (bool mask,
    integer offsets unchanged)."""
    import torch

    def conv(x: Any) -> Any:
        if isinstance(x, tuple):
            return tuple(conv(a) for a in x)
        if x.dtype == torch.bool or not x.is_floating_point():
            return x.numpy().copy()
        return x.detach().double().numpy()

    return {name: conv(x) for name, x in inputs.items()}


def strided(shape: tuple, how: str, gen: Any, dtype: Any) -> Any:
    """A non-contiguous view with logical ``shape``: every other element of a
    bigger tensor ("slice"), or a tensor stored in reversed axis order ("transpose")."""
    import torch

    if how == "slice":
        big = torch.randn(tuple(2 * s + 1 for s in shape), generator=gen, dtype=dtype)
        view = big[tuple(slice(1, None, 2) for _ in shape)]
    else:
        view = torch.randn(shape[::-1], generator=gen, dtype=dtype).permute(
            *reversed(range(len(shape))))
    assert tuple(view.shape) == tuple(shape)
    assert len(shape) == 1 or not view.is_contiguous()
    return view


def make_case(rng: np.random.Generator, gma_ref: Any, shape: tuple, covariance: str = "diag",
              mask: bool = False, *, hard: str = "", dtype: str = "f32",
              qk: bool = False) -> dict[str, Any]:
    """Torch inputs of one case (``hard``: sharp | large | fully-masked | strided |
    bhnd, else plain GMA_SPEC draws); tokens and mixture in ``dtype``."""
    import torch

    B, N, H, D, Dv, K = shape
    opts: dict = {}
    if hard == "sharp":
        opts["log_var_mean"] = -8.0   # tiny variances: near one-hot responsibilities
    elif hard == "large":
        opts["scale"] = 20.0          # large-magnitude q and k
    raw = gma_ref.make_inputs(rng, B, N, H, D, Dv, K, covariance,
                              mask or hard == "fully-masked", **opts)
    if qk:  # a second mixture for the keys: gma_qk_mixtures
        mix = {f"q_{n}": raw.pop(n) for n in ("mean", "log_var", "logit")}
        mix.update(gma_ref.make_mixture(rng, H, K, D, covariance, prefix="k_"))
        raw.update(mix)
    if hard == "fully-masked":
        raw["key_mask"][0] = False     # batch row 0 has no key at all
        raw["key_mask"][1, 0] = True   # the other keeps at least one
    inputs = to_torch(raw, dtype)
    if hard == "strided":
        dt = torch_dtype(dtype)
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        inputs["q"] = strided((B, N, H, D), "slice", gen, dt)
        inputs["k"] = strided((B, N, H, D), "transpose", gen, dt)
        inputs["v"] = torch.randn((B, H, N, Dv), generator=gen, dtype=dt).transpose(1, 2)
        inputs["mean"] = 0.5 * strided((H, K, D), "transpose", gen, dt)
        inputs["log_var"] = 0.1 * strided(tuple(inputs["log_var"].shape), "slice", gen, dt)
        inputs["logit"] = 0.1 * strided((H, K), "transpose", gen, dt)
        if "key_mask" in inputs:
            inputs["key_mask"] = torch.tensor(rng.random((B, 2 * N)) < 0.75)[:, ::2]
    if hard == "bhnd":
        inputs = {n: (x.transpose(1, 2).contiguous() if n in TOKENS else x)
                  for n, x in inputs.items()}
    return inputs


def init_state(rng: np.random.Generator, rows: int, H: int, K: int, Dv: int,
               dtype: str = "f32") -> tuple:
    """A plausible carried state: n > 0 (a sum of responsibilities), S ~ n * v."""
    import torch

    n = rng.uniform(0.5, 8.0, size=(rows, H, K))
    S = n[..., None] * rng.normal(size=(rows, H, K, Dv)) / 2
    dt = torch.float64 if dtype == "f64" else torch.float32
    return torch.tensor(S, dtype=dt), torch.tensor(n, dtype=dt)


def piece(inputs: dict, lo: int, hi: int, layout: str = "bnhd") -> dict:
    """Tokens [lo, hi) of a case (views); mixtures unchanged."""
    out = dict(inputs)
    axis = 1 if layout == "bnhd" else 2
    for name in TOKENS:
        out[name] = inputs[name].narrow(axis, lo, hi - lo)
    if "key_mask" in inputs:
        out["key_mask"] = inputs["key_mask"][:, lo:hi]
    return out


# -- running and comparing ---------------------------------------------------------

def run(kern: Any, inputs: dict, layout: str = "bnhd", **extra: Any):
    """(y, (S, n)) of a call with the state returned."""
    positional = [i.name for i in kern.program.inputs if not i.optional]
    optional = {n: x for n, x in inputs.items() if n not in positional}
    optional.update(extra)
    return kern(*(inputs[n] for n in positional), **optional, return_state=True, layout=layout)


def check(gma_ref: Any, causal: bool, norm: str, covariance: str, inputs: dict, *,
          layout: str = "bnhd", chunk: Optional[int] = None, qk: bool = False,
          eps: float = 1e-6, tol: Optional[float] = None, **extra: Any):
    """torch backend vs the numpy oracle on the same values: y (in v's dtype),
    and the state (S, n) (float32, float64 for float64 inputs)."""
    import torch

    dtype = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32",
             torch.float64: "f64"}[inputs["v"].dtype]
    tol = TOL[dtype] if tol is None else tol
    kern = kernel(causal, norm, covariance, layout=layout, chunk=chunk, qk=qk, eps=eps)
    ref = kernel(causal, norm, covariance, layout=layout, backend="numpy", qk=qk, eps=eps)
    y, (S, n) = run(kern, inputs, layout, **extra)
    y_ref, (S_ref, n_ref) = run(ref, oracle_inputs(inputs), layout, **oracle_inputs(extra))
    assert y.dtype == inputs["v"].dtype, f"y has dtype {y.dtype}, expected v's {inputs['v'].dtype}"
    acc = torch.float64 if dtype == "f64" else torch.float32
    assert S.dtype == acc and n.dtype == acc, (S.dtype, n.dtype)
    assert tuple(y.shape) == tuple(y_ref.shape)
    gma_ref.assert_close(y, y_ref, tol, "y")
    gma_ref.assert_close(S, S_ref, tol, "state S")
    gma_ref.assert_close(n, n_ref, tol, "state n")
    return y, (S, n)


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """Shapes here are tiny: torch's intra-op threads only add synchronization,
    which costs ~10x per call when other processes share the cores."""
    if not TORCH:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tb() -> SimpleNamespace:
    return SimpleNamespace(TORCH=TORCH, TOL=TOL, GRAD_TOL=GRAD_TOL, kernel=kernel,
                           make_case=make_case, init_state=init_state, piece=piece, run=run,
                           check=check, oracle_inputs=oracle_inputs, to_torch=to_torch,
                           torch_dtype=torch_dtype)

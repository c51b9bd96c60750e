"""Helpers of the Triton backend's CPU tests: float32 torch inputs, kernels, and
the comparison with the float64 numpy oracle on the same values.

The backend is probed here, at import, before any test module can import
torch's or anyone's copy of triton: the probe sets TRITON_INTERPRET, which
Triton reads once, when it is first imported (see the backend's ``_probe``).
Test modules skip themselves with the probe's reason; they reach the helpers
through the session fixture ``tri`` (conftests are not imported by name).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import pytest

import gmagen
from gmagen import dsl

TRITON = gmagen.available_backends()["triton"]  # probe first: sets TRITON_INTERPRET
TOL = 1e-4  # GMA_SPEC precision contract, float32 forward
TOKENS = ("q", "k", "v")

DIMS = ("B", "N", "H", "D", "Dv", "K")
# Shape of a case, (B, N, H, D, Dv, K): B != H (catches b, h mix-ups), N = 63 is
# not a multiple of any block_n, D = 20 and Dv = 33 are not powers of two.  A
# test module may set its own module-level BASE (and MAX_N, the longest
# sequence it wants).
BASE = (2, 63, 3, 20, 33, 5)

# GMA_SPEC's hard cases: name -> (dims replacing the module's BASE, kind of
# input, config knobs).
HARD: dict[str, tuple[dict, str, dict]] = {
    "N1": ({"N": 1}, "", {}),
    "N65": ({"N": 65}, "", {}),
    "N130": ({"N": 130}, "", {}),                 # several tiles and segments
    "K1": ({"K": 1}, "", {}),
    "K33": ({"K": 33}, "", {}),                   # BLOCK_K = 64, 31 masked slots
    "D70": ({"D": 70}, "", {}),                   # two block_d chunks, the last masked
    "D70-block_d16": ({"D": 70}, "", {"block_d": 16}),         # five chunks
    # D x BLOCK_K > 8192: coefficients reloaded per D chunk (Shape.streamed)
    "D130-K33-streamed": ({"D": 130, "K": 33}, "", {}),
    "Dv100": ({"Dv": 100}, "", {}),               # two block_dv programs
    "Dv100-block_dv32": ({"Dv": 100}, "", {"block_dv": 32}),   # four, the last masked
    # Dv a multiple of block_dv: two full blocks, no Dv mask (the second block
    # was dropped on an H100 before the fix of dv_range)
    "Dv64-block_dv32": ({"Dv": 64}, "", {"block_dv": 32}),
    # log_var ~ -8 (near one-hot) and q, k scaled by 20: the logits reach
    # ~ D * |x - mu|^2 / var / 2, ~4e4 at D = 20, and float32 resolves their
    # differences only to ~1e-3 there; near ties between two components then
    # put ~2% of draws past 1e-4, for any float32 evaluation (a NumPy float32
    # one of the direct formula as well).  At D = 4 the tail stays below 1e-4.
    "sharp": ({"D": 4}, "sharp", {}),
    "large": ({"D": 4}, "large", {}),
    # at D = 64 large inputs pass only because the coefficients are centred over k
    # (1.7e-4 without, 1.4e-5 with, measured here), and the centring is done in
    # float64 (spherical: worst y error 1.0e-4 in 400 draws with float32 centring,
    # 6.2e-6 in 100 with float64; diag 2.2e-5 -> 6.9e-6 in 60)
    "large-D64": ({"D": 64}, "large", {}),
    "fully-masked": ({}, "fully-masked", {}),     # batch row 0 has no key
    "strided": ({}, "strided", {}),               # slices and transposed views
    "bhnd": ({}, "bhnd", {}),                     # layout "bhnd"
}


@dataclass(frozen=True)
class Hard:
    """One hard case at one base shape (the value of a test's ``hard`` argument)."""

    name: str
    shape: tuple
    kind: str
    knobs: dict

    @property
    def layout(self) -> str:
        return "bhnd" if self.kind == "bhnd" else "bnhd"


def case_id(shape: tuple, *tags: str) -> str:
    """``B2-N63-H3-D20-Dv33-K5-f32`` plus tags."""
    B, N, H, D, Dv, K = shape
    return "-".join([f"B{B}-N{N}-H{H}-D{D}-Dv{Dv}-K{K}-f32", *[t for t in tags if t]])


def hard_cases(base: tuple = BASE, max_n: int = 1 << 30) -> list[Hard]:
    out = []
    for name, (dims, kind, knobs) in HARD.items():
        if dims.get("N", 0) > max_n:
            continue
        shape = tuple(dims.get(d, b) for d, b in zip(DIMS, base))
        out.append(Hard(name, shape, kind, knobs))
    return out


def hard_id(h: Hard) -> str:
    return case_id(h.shape, h.kind, *(f"{k}{v}" for k, v in h.knobs.items()))


NORMS = ("row", "slot")
COVARIANCES = ("diag", "spherical", "shared")
# every variant but causality: norm x covariance x key mask
VARIANTS = [(norm, cov, mask) for norm in NORMS for cov in COVARIANCES for mask in (False, True)]


def variant_id(norm: str, covariance: str, mask: bool) -> str:
    return f"{norm}-{covariance}" + ("-mask" if mask else "")


def pytest_generate_tests(metafunc) -> None:
    """Arguments ``variant`` ((norm, covariance, mask) at the module's BASE) and
    ``hard`` (a :class:`Hard`) run over every entry."""
    base = getattr(metafunc.module, "BASE", BASE)
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", VARIANTS,
                             ids=[case_id(base, variant_id(*v)) for v in VARIANTS])
    if "hard" in metafunc.fixturenames:
        cases = hard_cases(base, getattr(metafunc.module, "MAX_N", 1 << 30))
        metafunc.parametrize("hard", cases, ids=[hard_id(h) for h in cases])


@pytest.fixture(scope="session", autouse=True)
def _triton_source_cache(tmp_path_factory):
    """Generated sources go to a fresh cache dir, not the user's (the knob is
    read on each access, see gmagen.knobs.cache_dir)."""
    old = os.environ.get("GMAGEN_CACHE_DIR")
    os.environ["GMAGEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("gmagen_cache"))
    yield
    if old is None:
        os.environ.pop("GMAGEN_CACHE_DIR", None)
    else:
        os.environ["GMAGEN_CACHE_DIR"] = old


# -- kernels ---------------------------------------------------------------------

def _freeze(config: Any) -> Any:
    if isinstance(config, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in config.items()))
    return config


def _thaw(frozen: Any) -> Any:
    if isinstance(frozen, tuple):
        return {k: _thaw(v) for k, v in frozen}
    return frozen


@functools.lru_cache(maxsize=None)
def _kernel(causal: bool, norm: str, covariance: str, eps: float, layout: str, qk: bool,
            backend: str, config: Any) -> Any:
    build = dsl.gma_qk_mixtures if qk else gmagen.gma
    program = build(causal, norm, covariance, eps, layout=layout)
    return gmagen.compile(program, backend=backend, config=_thaw(config))


def kernel(causal: bool = False, norm: str = "row", covariance: str = "diag", *,
           eps: float = 1e-6, layout: str = "bnhd", qk: bool = False, backend: str = "triton",
           config: Optional[dict] = None):
    """A compiled canonical GMA program (``qk``: gma_qk_mixtures), cached."""
    return _kernel(causal, norm, covariance, eps, layout, qk, backend, _freeze(config))


@functools.lru_cache(maxsize=None)
def _responsibility_kernel(covariance: str, layout: str, config: Any) -> Any:
    program = dsl.responsibilities_program(covariance, layout)
    return gmagen.compile(program, backend="triton", config=_thaw(config))


def responsibility_kernel(covariance: str = "diag", layout: str = "bnhd", **knobs: int):
    """The program behind ``gmagen.responsibilities``, with tile knobs."""
    return _responsibility_kernel(covariance, layout, _freeze(knobs or None))


def scan_config(**knobs: int) -> dict:
    return {"gma_scan": dict(knobs)}


def bidir_config(**knobs: int) -> dict:
    return {"gma_write": dict(knobs), "gma_read": dict(knobs)}


# -- inputs ----------------------------------------------------------------------

def torch_inputs(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """float32 torch copies (bool key mask); the oracle then gets these values."""
    import torch

    out: dict[str, Any] = {}
    for name, x in inputs.items():
        if isinstance(x, tuple):
            out[name] = tuple(torch.tensor(a, dtype=torch.float32) for a in x)
        elif name == "key_mask":
            out[name] = torch.tensor(np.asarray(x, dtype=bool))
        else:
            out[name] = torch.tensor(x, dtype=torch.float32)
    return out


def oracle_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The exact values given to the Triton kernel, as float64 NumPy (bool mask)."""
    import torch

    def conv(x):
        if isinstance(x, tuple):
            return tuple(conv(a) for a in x)
        if x.dtype == torch.bool:
            return x.numpy().copy()
        return x.detach().double().numpy()

    return {name: conv(x) for name, x in inputs.items()}


def strided(shape: tuple, how: str, gen) -> Any:
    """A non-contiguous float32 view with logical ``shape``: every other element
    of a bigger tensor ("slice") or a tensor stored in reversed axis order
    ("transpose")."""
    import torch

    if how == "slice":
        big = torch.randn(tuple(2 * s + 1 for s in shape), generator=gen)
        view = big[tuple(slice(1, None, 2) for _ in shape)]
    else:
        view = torch.randn(shape[::-1], generator=gen).permute(*reversed(range(len(shape))))
    assert tuple(view.shape) == tuple(shape)
    assert len(shape) == 1 or not view.is_contiguous()
    return view


def make_case(rng: np.random.Generator, gma_ref, shape: tuple, covariance: str = "diag",
              mask: bool = False, *, hard: str = "", qk: bool = False) -> dict[str, Any]:
    """Torch float32 inputs of one case (``hard``: sharp | large | fully-masked |
    strided | bhnd, else plain GMA_SPEC draws)."""
    import torch

    B, N, H, D, Dv, K = shape
    opts: dict = {}
    if hard == "sharp":
        opts["log_var_mean"] = -8.0   # tiny variances: near one-hot responsibilities
    elif hard == "large":
        opts["scale"] = 20.0          # large-magnitude q and k
    raw = gma_ref.make_inputs(rng, B, N, H, D, Dv, K, covariance, mask or hard == "fully-masked",
                              **opts)
    if qk:  # second mixture for the keys: gma_qk_mixtures
        mix = {f"q_{n}": raw.pop(n) for n in ("mean", "log_var", "logit")}
        mix.update(gma_ref.make_mixture(rng, H, K, D, covariance, prefix="k_", **(
            {"log_var_mean": opts["log_var_mean"]} if "log_var_mean" in opts else {})))
        raw.update(mix)
    if hard == "fully-masked":
        raw["key_mask"][0] = False     # batch row 0 has no key at all
        raw["key_mask"][1, 0] = True   # the other keeps at least one
    inputs = torch_inputs(raw)
    if hard == "strided":
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        inputs["q"] = strided((B, N, H, D), "slice", gen)
        inputs["k"] = strided((B, N, H, D), "transpose", gen)
        inputs["v"] = torch.randn((B, H, N, Dv), generator=gen).transpose(1, 2)
        for pre in (("q_", "k_") if qk else ("",)):
            inputs[f"{pre}mean"] = 0.5 * strided((H, K, D), "transpose", gen)
            lv = inputs[f"{pre}log_var"]
            inputs[f"{pre}log_var"] = 0.1 * strided(tuple(lv.shape), "slice", gen)
            inputs[f"{pre}logit"] = 0.1 * strided((H, K), "transpose", gen)
        if "key_mask" in inputs:
            inputs["key_mask"] = torch.tensor(rng.random((B, 2 * N)) < 0.75)[:, ::2]
    if hard == "bhnd":
        inputs = {n: (x.transpose(1, 2).contiguous() if n in TOKENS else x)
                  for n, x in inputs.items()}
    return inputs


def hard_case(rng: np.random.Generator, gma_ref, hard: Hard, covariance: str = "diag",
              mask: bool = True, qk: bool = False) -> dict:
    """Torch inputs of a hard case (its layout: ``hard.layout``)."""
    return make_case(rng, gma_ref, hard.shape, covariance, mask, hard=hard.kind, qk=qk)


def init_state(rng: np.random.Generator, B: int, H: int, K: int, Dv: int) -> tuple:
    """A plausible carried state: n > 0 (a sum of responsibilities), S ~ n * v."""
    import torch

    n = rng.uniform(0.5, 8.0, size=(B, H, K))
    S = n[..., None] * rng.normal(size=(B, H, K, Dv)) / 2
    return torch.tensor(S, dtype=torch.float32), torch.tensor(n, dtype=torch.float32)


def piece(inputs: dict, lo: int, hi: int, layout: str = "bnhd") -> dict:
    """Tokens [lo, hi) of a bnhd (or bhnd) case; mixtures unchanged."""
    out = dict(inputs)
    axis = 1 if layout == "bnhd" else 2
    for name in TOKENS:
        out[name] = inputs[name].narrow(axis, lo, hi - lo)
    if "key_mask" in inputs:
        out["key_mask"] = inputs["key_mask"][:, lo:hi]
    return out


# -- running and comparing ---------------------------------------------------------

def run(kern, inputs: dict, layout: str = "bnhd", **extra: Any):
    """(y, (S, n)) of a call with the state returned."""
    positional = [i.name for i in kern.program.inputs if not i.optional]
    optional = {n: x for n, x in inputs.items() if n not in positional}
    optional.update(extra)
    return kern(*(inputs[n] for n in positional), **optional, return_state=True, layout=layout)


def check(gma_ref, causal: bool, norm: str, covariance: str, inputs: dict, *,
          eps: float = 1e-6, layout: str = "bnhd", qk: bool = False,
          config: Optional[dict] = None, tol: float = TOL, **extra: Any):
    """Triton vs the numpy oracle on the same float32 values: y, S and n."""
    tri = kernel(causal, norm, covariance, eps=eps, layout=layout, qk=qk, config=config)
    ref = kernel(causal, norm, covariance, eps=eps, layout=layout, qk=qk, backend="numpy")
    y, (S, n) = run(tri, inputs, layout, **extra)
    y_ref, (S_ref, n_ref) = run(ref, oracle_inputs(inputs), layout, **oracle_inputs(extra))
    assert y.dtype == inputs["v"].dtype and tuple(y.shape) == tuple(y_ref.shape)
    gma_ref.assert_close(y, y_ref, tol, "y")
    gma_ref.assert_close(S, S_ref, tol, "state S")
    gma_ref.assert_close(n, n_ref, tol, "state n")
    return y, (S, n)


@pytest.fixture
def launches(monkeypatch) -> list[tuple[str, tuple]]:
    """(kernel name, grid) of every Triton launch the test makes, in order."""
    from gmagen.backends.triton import launch

    seen: list[tuple[str, tuple]] = []
    real = launch.launch

    def spy(fn, grid, *args, **kwargs):
        seen.append((fn.__name__, tuple(grid)))
        return real(fn, grid, *args, **kwargs)

    monkeypatch.setattr(launch, "launch", spy)
    return seen


@pytest.fixture(autouse=True)
def _interpreter_only() -> None:
    """This suite passes CPU tensors: with a CUDA device Triton compiles instead."""
    if TRITON:
        from gmagen.backends.registry import get_backend

        if not get_backend("triton").interpreted:
            pytest.skip("triton compiles for CUDA in this process, so CPU tensors are not "
                        "taken; GMAGEN_TRITON_INTERPRET=1 runs this CPU suite")


@pytest.fixture(autouse=True)
def _nan_filled_buffers(monkeypatch) -> None:
    """Every buffer the backend allocates (y, S, n, segment partials) starts
    NaN-filled, so an element a kernel forgets to write, or reads before it was
    written, fails the comparison instead of passing on lucky zeros."""
    if not TRITON:
        return
    import torch

    real_empty = torch.empty

    def nan_empty(*args: Any, **kwargs: Any):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.fixture(scope="session")
def tri() -> SimpleNamespace:
    return SimpleNamespace(TRITON=TRITON, TOL=TOL, BASE=BASE, HARD=HARD, kernel=kernel,
                           responsibility_kernel=responsibility_kernel,
                           scan_config=scan_config, bidir_config=bidir_config,
                           torch_inputs=torch_inputs, oracle_inputs=oracle_inputs,
                           make_case=make_case, hard_case=hard_case, init_state=init_state,
                           strided=strided, piece=piece, run=run, check=check, case_id=case_id)

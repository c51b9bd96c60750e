"""Check cases: every GMA variant plus the hard cases of GMA_SPEC, run against the oracle.

Shared by ``gmagen check``, the GPU test script and the autotuner: a :class:`Case`
names one program + shape + dtype, :func:`make_inputs` draws its inputs (already
rounded to the case's dtype, so the float64 oracle sees exactly the values the
backend gets), and :func:`run_case` runs one backend on it and reports, never
raises.  Shapes are small on purpose: the Triton backend runs them in the CPU
interpreter when there is no GPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from gmagen.adapters.dlpack import IR_TO_NAME, dtype_of
from gmagen.backends.registry import BACKENDS, backend_availability, get_backend
from gmagen.compile import compile as compile_program
from gmagen.dsl import gma, gma_qk_mixtures
from gmagen.errors import DTypeError, FrameworkError, ShapeError, UnknownBackend
from gmagen.ir import oracle
from gmagen.ir.ops import COVARIANCES, NORMS
from gmagen.ir.program import Program

# GMA_SPEC "Precision contract", forward column.
TOLERANCES = {"f64": 1e-10, "f32": 1e-4, "f16": 1e-2, "bf16": 2e-2}
DTYPES = tuple(TOLERANCES)
HARD_CASES = ("N1", "ragged_N", "K1", "sharp", "large", "all_masked", "strided",
              "state_split", "qk_mixtures")
BASE_SHAPE = {"B": 2, "N": 63, "H": 3, "D": 8, "Dv": 5, "K": 4}
QUADRATIC_MAX_N = 512  # the N x N reference is cheap up to here


@dataclass(frozen=True)
class Case:
    causal: bool
    norm: str
    covariance: str
    mask: bool
    B: int
    N: int
    H: int
    D: int
    Dv: int
    K: int
    dtype: str
    layout: str = "bnhd"
    hard: str = ""

    @property
    def id(self) -> str:
        """``causal-slot-spherical-mask-B2-N63-H3-D8-Dv5-K4-f32[-bhnd][-sharp]``."""
        parts = ["causal" if self.causal else "bidir", self.norm, self.covariance,
                 "mask" if self.mask else "nomask",
                 f"B{self.B}-N{self.N}-H{self.H}-D{self.D}-Dv{self.Dv}-K{self.K}", self.dtype]
        if self.layout != "bnhd":
            parts.append(self.layout)
        if self.hard:
            parts.append(self.hard)
        return "-".join(parts)

    def program(self) -> Program:
        if self.hard == "qk_mixtures":
            return gma_qk_mixtures(self.causal, self.norm, self.covariance, layout=self.layout)
        return gma(self.causal, self.norm, self.covariance, layout=self.layout)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, **asdict(self)}


@dataclass(frozen=True)
class CaseResult:
    case: Case
    backend: str
    error: float      # worst relative Frobenius error (NaN: failed before or while comparing)
    tol: float
    passed: bool
    seconds: float
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"case": self.case.id, "backend": self.backend,
                "error": None if math.isnan(self.error) else self.error, "tol": self.tol,
                "passed": self.passed, "seconds": self.seconds, "detail": self.detail,
                "spec": asdict(self.case)}


# -- inputs -------------------------------------------------------------------

def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 array of the values ``x`` takes in ``dtype`` (round to nearest even).

    bf16 is done on the float32 bit pattern so it needs nothing beyond NumPy."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == "f64":
        return x.copy()
    if dtype == "f32":
        return x.astype(np.float32).astype(np.float64)
    if dtype == "f16":
        return x.astype(np.float16).astype(np.float64)
    if dtype == "bf16":
        bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        lsb = (bits >> 16) & 1  # ties go to the even bf16 mantissa
        rounded = ((bits + 0x7FFF + lsb) & 0xFFFF0000).astype(np.uint32)
        nan = np.isnan(x)
        out = rounded.view(np.float32).astype(np.float64)
        out[nan] = np.nan  # the carry could turn a NaN pattern into inf
        return out
    raise DTypeError(f"round_to: dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def _mixture(case: Case, rng: np.random.Generator, prefix: str = "") -> dict[str, np.ndarray]:
    H, K, D = case.H, case.K, case.D
    lv_shape = {"diag": (H, K, D), "spherical": (H, K), "shared": (H,)}[case.covariance]
    lv_mean = -8.0 if case.hard == "sharp" else 0.0  # sharp: variance e^-8, near one-hot r
    return {f"{prefix}mean": rng.normal(0.0, 0.5, (H, K, D)),
            f"{prefix}log_var": rng.normal(lv_mean, 0.1, lv_shape),
            f"{prefix}logit": rng.normal(0.0, 0.1, (H, K))}


def _tokens(case: Case, rng: np.random.Generator, dim: int) -> np.ndarray:
    x = rng.normal(0.0, 1.0, (case.B, case.N, case.H, dim))  # logical [B, N, H, X]
    return x if case.layout == "bnhd" else np.ascontiguousarray(x.swapaxes(1, 2))


def make_inputs(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs by program input name, float64 values representable in ``case.dtype``,
    tokens in ``case.layout`` (GMA_SPEC distributions plus the case's hard twist)."""
    scale = 20.0 if case.hard == "large" else 1.0
    inputs = {"q": scale * _tokens(case, rng, case.D), "k": scale * _tokens(case, rng, case.D),
              "v": _tokens(case, rng, case.Dv)}
    if case.hard == "qk_mixtures":
        inputs.update(_mixture(case, rng, "q_"))
        inputs.update(_mixture(case, rng, "k_"))
    else:
        inputs.update(_mixture(case, rng))
    inputs = {name: round_to(x, case.dtype) for name, x in inputs.items()}
    if case.mask:
        mask = rng.random((case.B, case.N)) < 0.8
        # every sequence keeps a real key (N = 1 could draw none, and an all-zero y
        # would hide any scaling error); all_masked then empties one on purpose
        empty = ~mask.any(axis=1)
        mask[empty, rng.integers(0, case.N, int(empty.sum()))] = True
        if case.hard == "all_masked":
            mask[-1] = False  # one sequence writes nothing at all
        inputs["key_mask"] = mask
    return inputs


# -- the case list ------------------------------------------------------------

def _variant(causal: bool, norm: str, cov: str, mask: bool, dtype: str, hard: str = "",
             layout: str = "bnhd", **shape: int) -> Case:
    return Case(causal, norm, cov, mask, **{**BASE_SHAPE, **shape}, dtype=dtype,
                layout=layout, hard=hard)


def _special_cases(causal: bool, dtype: str) -> list[Case]:
    """The hard cases of GMA_SPEC, a bhnd case and a non-canonical program."""
    v = lambda **kw: _variant(causal, "row", "diag", True, dtype, **kw)  # noqa: E731
    return [v(hard="N1", N=1), v(hard="ragged_N", N=130), v(hard="K1", K=1),
            v(hard="sharp"), v(hard="large"), v(hard="all_masked"),
            _variant(causal, "slot", "spherical", True, dtype, layout="bhnd"),
            v(hard="strided"), v(hard="qk_mixtures")]


def cases_for(dtypes: "list[str] | tuple[str, ...]", quick: bool = False) -> list[Case]:
    """Per dtype: every variant (causal x norm x covariance x mask), the special
    cases for both causal flags, and a causal state_split per norm.

    ``quick`` keeps every value of every flag at least once per dtype, and each
    special case once (alternating the causal flag)."""
    cases: list[Case] = []
    for dtype in dtypes:
        bidir, causal = _special_cases(False, dtype), _special_cases(True, dtype)
        if quick:
            for i, (c, cov) in enumerate((c, cov) for c in (False, True) for cov in COVARIANCES):
                cases.append(_variant(c, NORMS[i % 2], cov, (i // 2) % 2 == 0, dtype))
            cases += [(causal if i % 2 else bidir)[i] for i in range(len(bidir))]
            cases.append(_variant(True, "slot", "diag", True, dtype, hard="state_split"))
            continue
        cases += [_variant(c, n, cov, m, dtype) for c in (False, True) for n in NORMS
                  for cov in COVARIANCES for m in (True, False)]
        cases += bidir + causal
        cases += [_variant(True, norm, "diag", True, dtype, hard="state_split") for norm in NORMS]
    return cases


# -- the independent N x N reference -------------------------------------------

def _r_expanded(x: np.ndarray, mean: np.ndarray, log_var: np.ndarray, logit: np.ndarray,
                covariance: str) -> np.ndarray:
    """softmax of the expanded logits (x*x) @ A^T + x @ Bm^T + c (GMA_SPEC), unlike
    the oracle's (x - mu)^2 form; x [B, N, H, D] -> [B, N, H, K]."""
    H, K, D = mean.shape
    if covariance == "diag":
        rho = log_var
    elif covariance == "spherical":
        rho = np.broadcast_to(log_var[:, :, None], (H, K, D))
    else:  # shared
        rho = np.broadcast_to(log_var[:, None, None], (H, K, D))
    prec = np.exp(-rho)
    a, bm = -0.5 * prec, mean * prec
    c = logit - 0.5 * (mean * mean * prec + rho).sum(-1)
    logits = (np.einsum("bnhd,hkd->bnhk", x * x, a) + np.einsum("bnhd,hkd->bnhk", x, bm)
              + c[None, None])
    logits -= logits.max(-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(-1, keepdims=True)


def quadratic_reference(case: Case, inputs: dict[str, np.ndarray],
                        eps: float = 1e-6) -> np.ndarray:
    """y from the N x N affinity matrix of GMA_SPEC in float64 (small N only), in
    ``case.layout``: an oracle-independent check of the associative form."""
    logical = {n: (x if case.layout == "bnhd" or x.ndim != 4 else x.swapaxes(1, 2))
               for n, x in inputs.items()}
    qp, kp = ("q_", "k_") if case.hard == "qk_mixtures" else ("", "")
    rq = _r_expanded(logical["q"], *(logical[qp + p] for p in ("mean", "log_var", "logit")),
                     case.covariance)
    rk = _r_expanded(logical["k"], *(logical[kp + p] for p in ("mean", "log_var", "logit")),
                     case.covariance)
    v = logical["v"]
    B, N = v.shape[:2]
    m = logical.get("key_mask", np.ones((B, N), dtype=bool)).astype(np.float64)
    rk = rk * m[:, :, None, None]  # masked keys write nothing
    causal = np.tril(np.ones((N, N))) if case.causal else np.ones((N, N))
    if case.norm == "row":
        a = np.einsum("bihk,bjhk->bhij", rq, rk) * causal
        y = np.einsum("bhij,bjhd->bihd", a, v) / (a.sum(-1).transpose(0, 2, 1)[..., None] + eps)
    else:
        # n_k(i): what query i's slot k has accumulated (all keys, or keys j <= i)
        n_i = np.einsum("ij,bjhk->bihk", causal, rk)
        a = np.einsum("bihk,bjhk->bhij", rq / (n_i + eps), rk) * causal
        y = np.einsum("bhij,bjhd->bihd", a, v)
    return y if case.layout == "bnhd" else y.swapaxes(1, 2)




# -- running a case -------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """Where ``gmagen check`` feeds a backend: array framework, device, dtypes."""

    framework: str
    device: str
    dtypes: tuple[str, ...]
    note: str = ""


def _has_ml_dtypes() -> bool:
    try:
        import ml_dtypes  # noqa: F401  (NumPy's bfloat16; comes with JAX)
    except ImportError:
        return False
    return True


def backend_targets(name: str) -> tuple[Optional[Target], str]:
    """(Target, "") for a backend that can be checked here, else (None, why not)."""
    if name not in BACKENDS:
        raise UnknownBackend(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    try:
        avail = backend_availability(name)
        be = get_backend(name) if avail else None
    except Exception as exc:  # a half-installed backend is reported, not fatal to a check
        return None, f"backend {name!r} failed to load: {type(exc).__name__}: {exc}"
    if be is None:
        return None, avail.reason
    native = be.native
    if native == "numpy":
        if "cpu" not in be.devices:
            return None, f"backend {name!r} takes NumPy arrays but does not run on the CPU"
        dtypes = tuple(d for d in be.dtypes if d != "bf16" or _has_ml_dtypes())
        note = "" if dtypes == tuple(be.dtypes) else "bf16 skipped: ml_dtypes is not installed"
        return Target("numpy", "cpu", dtypes, note), ""
    if native == "torch":
        import torch

        if torch.cuda.is_available() and "cuda" in be.devices:
            return Target("torch", "cuda", tuple(be.dtypes)), ""
        if "cpu" in be.devices:
            # Triton's CPU interpreter does not do f16/bf16 arithmetic faithfully,
            # so a backend may declare fewer dtypes on the CPU.
            dtypes = tuple(getattr(be, "cpu_dtypes", be.dtypes))
            note = "" if dtypes == tuple(be.dtypes) else "CPU: " + ", ".join(dtypes) + " only"
            return Target("torch", "cpu", dtypes, note), ""
        return None, f"backend {name!r} needs a CUDA device; torch.cuda.is_available() is False"
    if native == "cupy":
        return Target("cupy", "cuda", tuple(d for d in be.dtypes if d != "bf16")), ""
    if native == "jax":
        import jax

        # without jax_enable_x64, JAX silently computes f64 inputs in f32
        x64 = bool(jax.config.read("jax_enable_x64"))
        dtypes = tuple(d for d in be.dtypes if d != "f64" or x64)
        return Target("jax", jax.default_backend(), dtypes), ""
    return None, f"gmagen check cannot make {native!r} arrays for backend {name!r}"


def _convert(x: np.ndarray, framework: str, device: str, dtype: str) -> Any:
    """Host float64 (or bool) -> the framework's array in ``dtype`` (exact: the
    values are already representable)."""
    name = "bool" if x.dtype == np.bool_ else IR_TO_NAME[dtype]
    if framework == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).to(device=device,
                                                            dtype=getattr(torch, name))
    if name == "bfloat16":
        import ml_dtypes

        host = x.astype(ml_dtypes.bfloat16)
    else:
        host = x.astype(name)
    if framework == "numpy":
        return host
    if framework == "cupy":
        import cupy

        return cupy.asarray(host)
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(host)
    raise FrameworkError(f"gmagen.cases cannot make {framework!r} arrays")


def _strided(name: str, x: np.ndarray, convert: Any) -> Any:
    """Non-contiguous views with the values of ``x``: q and mean are slices of a
    wider last dim, k is a transposed contiguous tensor, v takes every other column."""
    if name in ("q", "mean"):
        wide = np.zeros(x.shape[:-1] + (x.shape[-1] + 3,))
        wide[..., : x.shape[-1]] = x
        return convert(wide)[..., : x.shape[-1]]
    if name == "k":
        return convert(np.ascontiguousarray(x.swapaxes(1, 2))).swapaxes(1, 2)
    if name == "v":
        wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],))
        wide[..., ::2] = x
        return convert(wide)[..., ::2]
    return convert(x)


def _framework_inputs(case: Case, inputs: dict[str, np.ndarray], framework: str,
                      device: str) -> dict[str, Any]:
    def convert(x: np.ndarray) -> Any:
        return _convert(x, framework, device, case.dtype)

    if case.hard == "strided":
        return {name: _strided(name, x, convert) for name, x in inputs.items()}
    return {name: convert(x) for name, x in inputs.items()}


def to_host(x: Any) -> np.ndarray:
    """Any framework's array -> float64 NumPy (upcast is exact)."""
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        return x.detach().to("cpu", torch.float64).numpy()
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy.asnumpy(x).astype(np.float64)
    return np.asarray(x).astype(np.float64)


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    """||got - ref|| / ||ref|| (Frobenius; absolute when ref is all zeros); NaN if
    ``got`` has a NaN or inf."""
    if got.shape != ref.shape:
        raise ShapeError(f"output has shape {list(got.shape)}, expected {list(ref.shape)}")
    if not np.all(np.isfinite(got)):
        return math.nan
    diff = float(np.linalg.norm(got - ref))
    scale = float(np.linalg.norm(ref))
    return diff / scale if scale > 0 else diff


_KERNELS: dict[tuple, Any] = {}


def _kernel(program: Program, backend: str) -> Any:
    """Compiled kernels are reused across cases (each caches its specializations)."""
    key = (program.hash(), backend, id(get_backend(backend)))
    if key not in _KERNELS:
        _KERNELS[key] = compile_program(program, backend)
    return _KERNELS[key]


def split_point(n: int) -> int:
    """Where state_split cuts the sequence: past the middle, on no tile boundary."""
    return min(n, n // 2 + 5)


def _run_split(kernel: Any, args: dict[str, Any], case: Case) -> tuple[Any, np.ndarray, tuple]:
    """Two calls, the second continuing from the state the first returned."""
    axis = 1 if case.layout == "bnhd" else 2
    cut = split_point(case.N)

    def piece(x: Any, lo: int, hi: int, name: str) -> Any:
        ax = 1 if name == "key_mask" else axis
        return x[(slice(None),) * ax + (slice(lo, hi),)] if name in _SEQ_INPUTS else x

    first = {n: piece(x, 0, cut, n) for n, x in args.items()}
    second = {n: piece(x, cut, case.N, n) for n, x in args.items()}
    y1, state1 = kernel(**first, return_state=True)
    y2, state2 = kernel(**second, initial_state=state1, return_state=True)
    y = np.concatenate([to_host(y1), to_host(y2)], axis=axis)
    return y1, y, state2


_SEQ_INPUTS = ("q", "k", "v", "key_mask")


def run_case(case: Case, backend: str, framework: str, device: str,
             rng: np.random.Generator, *, quadratic: bool = True) -> CaseResult:
    """Run ``backend`` on ``case`` and compare with the oracle (and, for small N,
    the N x N form). Never raises: an exception is a failed result saying why."""
    tol = TOLERANCES.get(case.dtype, math.nan)
    seconds = 0.0
    try:
        program = case.program()
        kernel = _kernel(program, backend)
        inputs = make_inputs(case, rng)
        ref = oracle.run(program, inputs)
        args = _framework_inputs(case, inputs, framework, device)
        start = time.perf_counter()
        if case.hard == "state_split":
            y_raw, y, state = _run_split(kernel, args, case)
        else:
            y_raw, state = kernel(**args, return_state=True)
            y = to_host(y_raw)
        seconds = time.perf_counter() - start  # to_host above waited for the device
        ref_s, ref_n = ref[program.state]  # type: ignore[misc]
        errors = {"y": rel_error(y, ref[program.outputs[0]]),  # type: ignore[arg-type]
                  "state S": rel_error(to_host(state[0]), ref_s),
                  "state n": rel_error(to_host(state[1]), ref_n)}
        if quadratic and case.N <= QUADRATIC_MAX_N:
            errors["y vs NxN"] = rel_error(y, quadratic_reference(case, inputs))
    except Exception as exc:  # a check reports, it does not crash
        return CaseResult(case, backend, math.nan, tol, False, seconds,
                          f"{type(exc).__name__}: {exc}")
    worst = max(errors.values(), key=lambda e: math.inf if math.isnan(e) else e)
    problems = [f"{name} error {err:.2e} > tol {tol:.0e}" if not math.isnan(err)
                else f"{name} has NaN or inf" for name, err in errors.items() if not err <= tol]
    if dtype_of(y_raw) != case.dtype:
        problems.append(f"y has dtype {dtype_of(y_raw)}, expected {case.dtype} (v's dtype)")
    return CaseResult(case, backend, worst, tol, not problems, seconds, "; ".join(problems))

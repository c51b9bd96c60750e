"""Shared test helpers: error metric, GMA_SPEC random inputs, and an independent
quadratic (N x N) reference of GMA.

Test modules get the helpers through the session fixture ``gma_ref`` at the
bottom: pytest imports every conftest.py as a module named ``conftest``, so
``from conftest import ...`` would get whichever one it loaded last.  Session
scope keeps the fixture usable inside hypothesis tests.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest

# GMA_SPEC "Precision contract", forward column.
TOL = {"f64": 1e-10, "f32": 1e-4, "f16": 1e-2, "bf16": 2e-2}


def to_f64(x) -> np.ndarray:
    """Any framework's array (or a (S, n) pair) as float64 NumPy, for comparison."""
    if isinstance(x, (tuple, list)):
        return tuple(to_f64(a) for a in x)  # type: ignore[return-value]
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        return x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_err(y, ref) -> float:
    """||y - ref||_F / ||ref||_F (absolute error when ref is all zeros)."""
    y, ref = to_f64(y), to_f64(ref)
    num = float(np.linalg.norm((y - ref).ravel()))
    den = float(np.linalg.norm(ref.ravel()))
    return num / den if den > 0 else num


def assert_close(y, ref, tol: float, what: str = "y") -> None:
    y64, ref64 = to_f64(y), to_f64(ref)
    assert y64.shape == ref64.shape, f"{what}: shape {y64.shape}, expected {ref64.shape}"
    # NaN never passes (GMA_SPEC), also not when the reference has the same NaN.
    assert not np.isnan(y64).any(), f"{what}: {int(np.isnan(y64).sum())} NaN of {y64.size}"
    assert not np.isnan(ref64).any(), f"{what}: the reference has NaN"
    err = rel_err(y64, ref64)
    assert err <= tol, f"{what}: relative Frobenius error {err:.3e} > {tol:.0e}"


def make_inputs(rng: np.random.Generator, B: int, N: int, H: int, D: int, Dv: int, K: int,
                covariance: str = "diag", mask: bool = False, *, prefix: str = "",
                log_var_mean: float = 0.0, scale: float = 1.0) -> dict[str, np.ndarray]:
    """GMA_SPEC inputs: q/k/v ~ N(0, 1), mean ~ N(0, .5), log_var ~ N(0, .1),
    logit ~ N(0, .1); ``scale`` multiplies q and k, ``log_var_mean`` shifts rho
    (-8: sharp, near one-hot responsibilities); the mask keeps ~3/4 of keys."""
    out = {
        "q": scale * rng.normal(size=(B, N, H, D)),
        "k": scale * rng.normal(size=(B, N, H, D)),
        "v": rng.normal(size=(B, N, H, Dv)),
    }
    out.update(make_mixture(rng, H, K, D, covariance, prefix=prefix, log_var_mean=log_var_mean))
    if mask:
        out["key_mask"] = rng.random((B, N)) < 0.75
    return out


def log_var_shape(covariance: str, H: int, K: int, D: int) -> tuple[int, ...]:
    """[H, K, D] diag, [H, K] spherical, [H] shared (GMA_SPEC "Shapes and names")."""
    return {"diag": (H, K, D), "spherical": (H, K), "shared": (H,)}[covariance]


def make_mixture(rng: np.random.Generator, H: int, K: int, D: int, covariance: str = "diag", *,
                 prefix: str = "", log_var_mean: float = 0.0) -> dict[str, np.ndarray]:
    return {
        f"{prefix}mean": rng.normal(0.0, 0.5, size=(H, K, D)),
        f"{prefix}log_var": rng.normal(log_var_mean, 0.1, size=log_var_shape(covariance, H, K, D)),
        f"{prefix}logit": rng.normal(0.0, 0.1, size=(H, K)),
    }


# -- the quadratic form, straight from GMA_SPEC ---------------------------------
# Deliberately shares no code with gmagen.ir.oracle: logits are one broadcast over
# [B, N, H, K, D] (the oracle loops over D), the softmax is written out, and the
# mixing is an explicit N x N affinity per (batch, head).

def ref_logits(x, mean, log_var, logit, covariance: str = "diag") -> np.ndarray:
    """l_k(x) = alpha_k - 1/2 sum_d [(x_d - mu_kd)^2 exp(-rho_kd) + rho_kd]."""
    x, mean, log_var, logit = (np.asarray(a, dtype=np.float64) for a in (x, mean, log_var, logit))
    h, k, d = mean.shape
    if covariance == "spherical":
        log_var = np.repeat(log_var[:, :, None], d, axis=2)
    elif covariance == "shared":
        log_var = np.tile(log_var[:, None, None], (1, k, d))
    terms = (x[..., None, :] - mean) ** 2 * np.exp(-log_var) + log_var  # [B, N, H, K, D]
    return logit - 0.5 * terms.sum(-1)


def ref_responsibility(x, mean, log_var, logit, covariance: str = "diag") -> np.ndarray:
    logits = ref_logits(x, mean, log_var, logit, covariance)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def quadratic_gma(q, k, v, mean, log_var, logit, *, causal: bool, norm: str,
                  covariance: str = "diag", key_mask: Optional[np.ndarray] = None,
                  eps: float = 1e-6, k_mixture: Optional[tuple] = None) -> np.ndarray:
    """y [B, N, H, Dv] from the N x N affinity (GMA_SPEC "The same thing as an
    N x N matrix"). ``k_mixture`` = (mean, log_var, logit) routes keys through a
    second mixture (gma_qk_mixtures)."""
    rq = ref_responsibility(q, mean, log_var, logit, covariance)
    rk = ref_responsibility(k, *(k_mixture or (mean, log_var, logit)), covariance)
    v = np.asarray(v, dtype=np.float64)
    b, n, h, _ = rq.shape
    m = np.ones((b, n)) if key_mask is None else np.asarray(key_mask, dtype=np.float64)
    y = np.zeros(v.shape[:3] + (v.shape[-1],))
    tril = np.tril(np.ones((n, n)))
    for bi in range(b):
        for hi in range(h):
            r_i, r_j, vv = rq[bi, :, hi], rk[bi, :, hi] * m[bi][:, None], v[bi, :, hi]
            if norm == "row":
                a = r_i @ r_j.T                       # A_ij = m_j sum_k rq_ik rk_jk
                if causal:
                    a = a * tril
                y[bi, :, hi] = (a @ vv) / (a.sum(1, keepdims=True) + eps)
            elif causal:                               # n_k(i) = sum_{j<=i} m_j rk_jk
                n_i = np.cumsum(r_j, axis=0)           # [N, K]
                a = np.einsum("ik,jk,ik->ij", r_i, r_j, 1.0 / (n_i + eps)) * tril
                y[bi, :, hi] = a @ vv
            else:
                n_k = r_j.sum(0)
                a = (r_i / (n_k + eps)) @ r_j.T
                y[bi, :, hi] = a @ vv
    return y


def ref_state(k, v, mean, log_var, logit, covariance: str = "diag",
              key_mask: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(S [B, H, K, Dv], n [B, H, K]): the complete slot memory of each row."""
    rk = ref_responsibility(k, mean, log_var, logit, covariance)
    if key_mask is not None:
        rk = rk * np.asarray(key_mask, dtype=np.float64)[:, :, None, None]
    return np.einsum("bnhk,bnhd->bhkd", rk, np.asarray(v, np.float64)), rk.sum(1)


def call(kernel, inputs: dict, **kwargs):
    """Call a compiled canonical kernel with the dict from ``make_inputs``."""
    positional = [i.name for i in kernel.program.inputs if not i.optional]
    optional = {name: inputs[name] for name in inputs if name not in positional}
    return kernel(*(inputs[name] for name in positional), **optional, **kwargs)


@pytest.fixture
def rng() -> np.random.Generator:
    """Fresh entropy: every run draws new inputs (GMA_SPEC)."""
    seed = np.random.SeedSequence().entropy
    print(f"rng = np.random.default_rng({seed})")  # shown with a failure, to replay it
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def gma_ref() -> SimpleNamespace:
    """The helpers above, for test modules (and hypothesis tests)."""
    return SimpleNamespace(TOL=TOL, to_f64=to_f64, rel_err=rel_err, assert_close=assert_close,
                           make_inputs=make_inputs, make_mixture=make_mixture,
                           ref_logits=ref_logits, ref_responsibility=ref_responsibility,
                           quadratic_gma=quadratic_gma, ref_state=ref_state, call=call)

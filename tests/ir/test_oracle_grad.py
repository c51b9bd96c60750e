"""Float64 gradients of the oracle (gmagen.ir.oracle_grad): each op's VJP against
central finite differences, whole programs against torch.autograd of an
independent N x N form (GMA_SPEC "The same thing as an N x N matrix",
"Gradients"), packed sequences against one-by-one, and the hard cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import gmagen
from gmagen.ir import oracle
from gmagen.ir import oracle_grad as og

GRAD_TOL = 1e-8  # GMA_SPEC "Precision contract", float64 gradients
FD_TOL = 1e-6
B, N, H, D, DV, K = 2, 7, 2, 3, 4, 3
NORMS = ("row", "slot")
COVARIANCES = ("diag", "spherical", "shared")
MIXTURE = ("mean", "log_var", "logit")


# -- finite differences ------------------------------------------------------------

def _dot(a, b) -> float:
    """<a, b> for arrays or (S, n) pairs."""
    if isinstance(a, tuple):
        return sum(_dot(x, y) for x, y in zip(a, b))
    return float(np.sum(np.asarray(a) * np.asarray(b)))


def _like(rng, a):
    if isinstance(a, tuple):
        return tuple(_like(rng, x) for x in a)
    return rng.normal(size=np.shape(a))


def _step(a, u, h):
    if isinstance(a, tuple):
        return tuple(_step(x, y, h) for x, y in zip(a, u))
    return a + h * u


def _norm(a) -> float:
    if isinstance(a, tuple):
        return float(np.sqrt(sum(_norm(x) ** 2 for x in a)))
    return float(np.linalg.norm(np.ravel(a)))


def check_fd(loss, args: dict, grads: dict, rng, tol: float = FD_TOL, h: float = 1e-5) -> None:
    """<dL/da, u> against central differences (L(a + h u) - L(a - h u)) / 2h for a
    random direction u per argument, Richardson-extrapolated (error O(h^4): the
    1 / (n + eps) of the reads is strongly curved where n is small).  The error
    is relative to max(|fd|, ||dL/da||): a directional derivative near 0 by
    chance must not blow the ratio up."""
    def central(name, u, step):
        return (loss(**{**args, name: _step(args[name], u, step)})
                - loss(**{**args, name: _step(args[name], u, -step)})) / (2 * step)

    for name, g in grads.items():
        u = _like(rng, args[name])
        fd = (4 * central(name, u, h / 2) - central(name, u, h)) / 3
        an = _dot(g, u)
        assert np.isfinite(an), f"d{name}: not finite"
        err = abs(an - fd) / max(abs(fd), _norm(g), 1e-300)
        assert err <= tol, f"d{name}: vjp {an:.10e} vs finite difference {fd:.10e} ({err:.1e})"


def _packing(lengths):
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return cu, int(cu[-1])


def _mask(rng, b, n):
    return rng.random((b, n)) < 0.75


# -- op by op ----------------------------------------------------------------------

@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("case", ["normal", "K1", "large"])
def test_responsibility_vjp_finite_differences(covariance, case, rng, gma_ref):
    k = 1 if case == "K1" else K
    inputs = gma_ref.make_inputs(rng, B, N, H, D, DV, k, covariance,
                                 scale=10.0 if case == "large" else 1.0)
    args = {"x": inputs["q"], **{m: inputs[m] for m in MIXTURE}}
    dr = rng.normal(size=(B, N, H, k))

    def loss(**a):
        return _dot(oracle.responsibility(**a, covariance=covariance), dr)

    grads = dict(zip(args, og.responsibility_vjp(**args, dr=dr, covariance=covariance)))
    for name, g in grads.items():
        assert g.shape == np.shape(args[name]), name
    if case == "K1":  # r = 1 whatever the inputs: every gradient vanishes
        assert all(np.all(g == 0.0) for g in grads.values())
    check_fd(loss, args, grads, rng)


@pytest.mark.parametrize("mask, varlen", [(False, False), (True, False), (True, True)],
                         ids=["plain", "mask", "mask-varlen"])
def test_slot_write_vjp_finite_differences(mask, varlen, rng):
    b, n, cu = B, N, None
    if varlen:
        cu, n = _packing([3, 0, 5, 2])
        b = 1
    r, v = rng.uniform(0.1, 1.0, (b, n, H, K)), rng.normal(size=(b, n, H, DV))
    key_mask = _mask(rng, b, n) if mask else None
    s_mem, n_mem = oracle.slot_write(r, v, key_mask, cu)
    ds, dn = rng.normal(size=s_mem.shape), rng.normal(size=n_mem.shape)

    def loss(r, v):
        return _dot(oracle.slot_write(r, v, key_mask, cu), (ds, dn))

    dr, dv = og.slot_write_vjp(r, v, ds, dn, key_mask, cu)
    check_fd(loss, {"r": r, "v": v}, {"r": dr, "v": dv}, rng)
    if mask:  # masked keys write nothing, so nothing flows back to them
        assert np.all(dr[~key_mask] == 0.0) and np.all(dv[~key_mask] == 0.0)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_slot_read_vjp_finite_differences(norm, varlen, rng):
    b, n, cu, rows = B, N, None, B
    if varlen:
        cu, n = _packing([3, 0, 5, 2])
        b, rows = 1, 4
    r = rng.uniform(0.1, 1.0, (b, n, H, K))
    memory = (rng.normal(size=(rows, H, K, DV)), rng.uniform(0.1, 2.0, (rows, H, K)))
    dy = rng.normal(size=(b, n, H, DV))

    def loss(r, memory):
        return _dot(oracle.slot_read(r, memory, cu, norm), dy)

    dr, dmem = og.slot_read_vjp(r, memory, dy, cu, norm)
    check_fd(loss, {"r": r, "memory": memory}, {"r": dr, "memory": dmem}, rng)


SCAN_CASES = [pytest.param(norm, mask, init, chunk, varlen,
                           id=f"{norm}{'-mask' if mask else ''}{'-init' if init else ''}"
                              f"-chunk{chunk}{'-varlen' if varlen else ''}")
              for norm, mask, init, chunk, varlen in itertools.product(
                  NORMS, (False, True), (False, True), (3, 64), (False, True))
              if not (varlen and chunk == 64)]


@pytest.mark.parametrize("norm, mask, init, chunk, varlen", SCAN_CASES)
def test_causal_scan_vjp_finite_differences(norm, mask, init, chunk, varlen, rng, monkeypatch):
    # chunk 3 < N: the reverse scan carries the state gradient across chunks
    monkeypatch.setattr(oracle, "SCAN_CHUNK", chunk)
    b, n, cu, rows = B, N, None, B
    if varlen:
        cu, n = _packing([4, 0, 8, 1])
        b, rows = 1, 4
    # r >= 0.1 keeps n(i) away from 0 where 1 / (n + eps) defeats finite differences
    rq, rk = rng.uniform(0.1, 1.0, (b, n, H, K)), rng.uniform(0.1, 1.0, (b, n, H, K))
    v = rng.normal(size=(b, n, H, DV))
    key_mask = _mask(rng, b, n) if mask else None
    state0 = ((rng.normal(size=(rows, H, K, DV)), rng.uniform(0.1, 2.0, (rows, H, K)))
              if init else None)
    dy = rng.normal(size=(b, n, H, DV))
    dstate = (rng.normal(size=(rows, H, K, DV)), rng.normal(size=(rows, H, K)))

    def loss(rq, rk, v, initial_state=None):
        y, state = oracle.causal_scan(rq, rk, v, key_mask, initial_state, cu, norm)
        return _dot(y, dy) + _dot(state, dstate)

    drq, drk, dv, dinit = og.causal_scan_vjp(rq, rk, v, dy, dstate, key_mask, state0, cu, norm)
    args, grads = {"rq": rq, "rk": rk, "v": v}, {"rq": drq, "rk": drk, "v": dv}
    if init:
        args["initial_state"], grads["initial_state"] = state0, dinit
    else:
        assert dinit is None
    check_fd(loss, args, grads, rng)
    if mask:
        assert np.all(drk[~key_mask] == 0.0) and np.all(dv[~key_mask] == 0.0)


def test_causal_scan_vjp_without_cotangents_is_zero(rng):
    rq, rk, v = rng.random((B, N, H, K)), rng.random((B, N, H, K)), rng.normal(size=(B, N, H, DV))
    state0 = (rng.normal(size=(B, H, K, DV)), rng.random((B, H, K)))
    drq, drk, dv, (ds0, dn0) = og.causal_scan_vjp(rq, rk, v, None, None, initial_state=state0)
    assert all(np.all(g == 0.0) for g in (drq, drk, dv, ds0, dn0))


# -- whole programs against torch.autograd of the N x N form ----------------------

def _torch_responsibility(torch, x, mean, log_var, logit, covariance):
    """softmax_k(alpha_k - 1/2 sum_d [(x_d - mu_kd)^2 e^-rho_kd + rho_kd]), one broadcast."""
    h, k, d = mean.shape
    if covariance == "spherical":
        log_var = log_var[:, :, None].expand(h, k, d)
    elif covariance == "shared":
        log_var = log_var[:, None, None].expand(h, k, d)
    terms = (x[..., None, :] - mean) ** 2 * torch.exp(-log_var) + log_var  # [B, N, H, K, D]
    return torch.softmax(logit - 0.5 * terms.sum(-1), dim=-1)


def torch_quadratic(torch, t: dict, *, causal: bool, norm: str, covariance: str,
                    key_mask, qk_mixtures: bool = False, eps: float = 1e-6):
    """(y, (S, n)) from the N x N affinity, in torch, differentiable in every input.

    With S0, n0 the initial state (zeros unless given), query i reads
    S(i) = S0 + sum_j A-weighted values:  row: y_i = (sum_j A_ij v_j + r_i . S0) /
    (sum_j A_ij + r_i . n0 + eps),  A_ij = m_j r_q(i) . r_k(j) (j <= i causal);
    slot: y_i = sum_k r_ik (S0_k + sum_j m_j r_jk v_j) / (n0_k + n_k(i) + eps)."""
    pq, pk = (("q_", "k_") if qk_mixtures else ("", ""))
    rq = _torch_responsibility(torch, t["q"], *(t[pq + m] for m in MIXTURE), covariance)
    rk = _torch_responsibility(torch, t["k"], *(t[pk + m] for m in MIXTURE), covariance)
    b, n, h, k = rq.shape
    m = torch.ones(b, n, dtype=torch.float64) if key_mask is None else \
        torch.as_tensor(key_mask, dtype=torch.float64)
    rk = rk * m[:, :, None, None]
    s0, n0 = t.get("S0"), t.get("n0")
    if s0 is None:
        s0 = torch.zeros(b, h, k, t["v"].shape[-1], dtype=torch.float64)
        n0 = torch.zeros(b, h, k, dtype=torch.float64)
    v = t["v"].transpose(1, 2)  # [B, H, N, Dv]
    keep = torch.tril(torch.ones(n, n, dtype=torch.float64)) if causal else \
        torch.ones(n, n, dtype=torch.float64)
    if norm == "row":
        a = torch.einsum("bihk,bjhk->bhij", rq, rk) * keep
        num = a @ v + torch.einsum("bihk,bhkd->bhid", rq, s0)
        den = a.sum(-1) + torch.einsum("bihk,bhk->bhi", rq, n0) + eps
        y = num / den[..., None]
    else:
        counts = torch.cumsum(rk, 1) if causal else rk.sum(1, keepdim=True).expand(b, n, h, k)
        inv = 1.0 / (n0[:, None] + counts + eps)  # [B, N, H, K]: 1 / (n_k(i) + eps)
        a = torch.einsum("bihk,bjhk,bihk->bhij", rq, rk, inv) * keep
        y = a @ v + torch.einsum("bihk,bhkd,bihk->bhid", rq, s0, inv)
    state = (s0 + torch.einsum("bjhk,bjhd->bhkd", rk, t["v"]), n0 + rk.sum(1))
    return y.transpose(1, 2), state


def _program_case(rng, gma_ref, *, causal, norm, covariance, mask, init, n=N, k=K,
                  log_var_mean=0.0, qk_mixtures=False):
    """Inputs, a program and cotangents for y and the state."""
    inputs = gma_ref.make_inputs(rng, B, n, H, D, DV, k, covariance, mask,
                                 log_var_mean=log_var_mean)
    if qk_mixtures:
        for m in MIXTURE:
            inputs["q_" + m] = inputs.pop(m)
        inputs.update(gma_ref.make_mixture(rng, H, k, D, covariance, prefix="k_",
                                           log_var_mean=log_var_mean))
        program = gmagen.dsl.gma_qk_mixtures(causal, norm, covariance)
    else:
        program = gmagen.gma(causal, norm, covariance)
    if init:
        inputs["initial_state"] = (rng.normal(size=(B, H, k, DV)), rng.random((B, H, k)))
    cts = {"y": rng.normal(size=(B, n, H, DV)),
           program.state: (rng.normal(size=(B, H, k, DV)), rng.normal(size=(B, H, k)))}
    return inputs, program, cts


def _torch_grads(inputs: dict, cts: dict, state_name: str, **kw) -> dict:
    """Autograd of L = <y, dy> + <S, dS> + <n, dn> through torch_quadratic."""
    torch = pytest.importorskip("torch")
    t = {name: torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
         for name, x in inputs.items() if name not in ("key_mask", "initial_state")}
    if "initial_state" in inputs:
        for name, x in zip(("S0", "n0"), inputs["initial_state"]):
            t[name] = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y, (s, n) = torch_quadratic(torch, t, key_mask=inputs.get("key_mask"), **kw)
    ds, dn = cts.get(state_name, (np.zeros(s.shape), np.zeros(n.shape)))
    loss = ((y * torch.as_tensor(cts["y"])).sum() + (s * torch.as_tensor(ds)).sum()
            + (n * torch.as_tensor(dn)).sum())
    loss.backward()
    out = {name: x.grad.numpy() for name, x in t.items()}
    if "S0" in out:
        out["initial_state"] = (out.pop("S0"), out.pop("n0"))
    return out


def _compare(grads: dict, ref: dict, gma_ref, tol: float = GRAD_TOL) -> None:
    for name, g_ref in ref.items():
        if name == "initial_state":
            gma_ref.assert_close(grads[name][0], g_ref[0], tol, "dS0")
            gma_ref.assert_close(grads[name][1], g_ref[1], tol, "dn0")
        else:
            gma_ref.assert_close(grads[name], g_ref, tol, f"d{name}")


PROGRAMS = [pytest.param(causal, norm, cov, mask,
                         id=f"{'causal' if causal else 'bidir'}-{norm}-{cov}"
                            f"{'-mask' if mask else ''}")
            for causal, norm, cov, mask in itertools.product((False, True), NORMS, COVARIANCES,
                                                             (False, True))]


@pytest.mark.parametrize("causal, norm, covariance, mask", PROGRAMS)
def test_run_vjp_matches_torch_quadratic(causal, norm, covariance, mask, rng, gma_ref):
    # causal programs start from a random state (its gradient is checked too)
    inputs, program, cts = _program_case(rng, gma_ref, causal=causal, norm=norm,
                                         covariance=covariance, mask=mask, init=causal)
    grads = og.run_vjp(program, inputs, cts)
    assert set(grads) == set(program.input_names)
    assert grads["key_mask"] is None and grads["cu_seqlens"] is None
    ref = _torch_grads(inputs, cts, program.state, causal=causal, norm=norm,
                       covariance=covariance)
    assert set(ref) == {n for n, g in grads.items() if g is not None}
    _compare(grads, ref, gma_ref)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_run_vjp_chunk_boundaries(causal, rng, gma_ref):
    """N = 130 crosses two of the oracle's 64-token chunks."""
    inputs, program, cts = _program_case(rng, gma_ref, causal=causal, norm="row",
                                         covariance="diag", mask=True, init=causal, n=130)
    ref = _torch_grads(inputs, cts, program.state, causal=causal, norm="row", covariance="diag")
    _compare(og.run_vjp(program, inputs, cts), ref, gma_ref)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_run_vjp_bhnd_layout(causal, rng, gma_ref):
    inputs, program, cts = _program_case(rng, gma_ref, causal=causal, norm="row",
                                         covariance="diag", mask=True, init=causal)
    ref = _torch_grads(inputs, cts, program.state, causal=causal, norm="row", covariance="diag")
    swap = {name: (np.swapaxes(x, 1, 2) if name in "qkv" else x) for name, x in inputs.items()}
    swapped_cts = {**cts, "y": np.swapaxes(cts["y"], 1, 2)}
    grads = og.run_vjp(program.with_layout("bhnd"), swap, swapped_cts)
    for name in "qkv":
        assert grads[name].shape == swap[name].shape
        grads[name] = np.swapaxes(grads[name], 1, 2)
    _compare(grads, ref, gma_ref)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_run_vjp_qk_mixtures(causal, rng, gma_ref):
    inputs, program, cts = _program_case(rng, gma_ref, causal=causal, norm="slot",
                                         covariance="spherical", mask=True, init=causal,
                                         qk_mixtures=True)
    grads = og.run_vjp(program, inputs, cts)
    ref = _torch_grads(inputs, cts, program.state, causal=causal, norm="slot",
                       covariance="spherical", qk_mixtures=True)
    assert {"q_mean", "k_mean"} <= set(ref)
    _compare(grads, ref, gma_ref)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_run_vjp_missing_cotangents_are_zero(causal, rng, gma_ref):
    inputs, program, cts = _program_case(rng, gma_ref, causal=causal, norm="row",
                                         covariance="diag", mask=False, init=causal)
    only_y = og.run_vjp(program, inputs, {"y": cts["y"]})
    only_state = og.run_vjp(program, inputs, {program.state: cts[program.state]})
    both = og.run_vjp(program, inputs, cts)
    for name in ("q", "k", "v", "mean", "log_var", "logit"):
        gma_ref.assert_close(only_y[name] + only_state[name], both[name], 1e-12, name)
    # the state does not depend on the queries
    assert np.all(only_state["q"] == 0.0)
    ref = _torch_grads(inputs, {"y": cts["y"]}, program.state, causal=causal, norm="row",
                       covariance="diag")
    _compare(only_y, ref, gma_ref)
    nothing = og.run_vjp(program, inputs, {})
    assert all(np.all(nothing[name] == 0.0) for name in ("q", "k", "v", "mean"))
    with pytest.raises(KeyError, match="not an output"):
        og.run_vjp(program, inputs, {"yy": cts["y"]})


# -- packed sequences -----------------------------------------------------------

def _one(inputs: dict, lo: int, hi: int, i: int) -> dict:
    out = {name: x for name, x in inputs.items() if name not in ("cu_seqlens", "initial_state")}
    for name in ("q", "k", "v"):
        out[name] = inputs[name][:, lo:hi]
    if "key_mask" in inputs:
        out["key_mask"] = inputs["key_mask"][:, lo:hi]
    if "initial_state" in inputs:
        out["initial_state"] = tuple(a[i:i + 1] for a in inputs["initial_state"])
    return out


VARLEN = [pytest.param(causal, norm, mask, init,
                       id=f"{'causal' if causal else 'bidir'}-{norm}{'-mask' if mask else ''}"
                          f"{'-init' if init else ''}")
          for causal, norm, mask, init in [(True, "row", False, False), (True, "row", True, True),
                                           (True, "slot", True, True), (True, "slot", False, True),
                                           (False, "row", True, False),
                                           (False, "slot", False, False)]]


@pytest.mark.parametrize("causal, norm, mask, init", VARLEN)
def test_run_vjp_varlen_matches_one_by_one(causal, norm, mask, init, rng, gma_ref):
    # zero-length sequences first, inside and last; 70 crosses a 64-token chunk
    lengths = [0, 5, 0, 70, 1, 9, 0]
    cu, n = _packing(lengths)
    s = len(lengths)
    inputs = gma_ref.make_inputs(rng, 1, n, H, D, DV, K, mask=mask)
    inputs["cu_seqlens"] = cu
    if init:
        inputs["initial_state"] = (rng.normal(size=(s, H, K, DV)), rng.random((s, H, K)))
    program = gmagen.gma(causal, norm)
    cts = {"y": rng.normal(size=(1, n, H, DV)),
           program.state: (rng.normal(size=(s, H, K, DV)), rng.normal(size=(s, H, K)))}
    grads = og.run_vjp(program, inputs, cts)
    mixture = {m: np.zeros_like(inputs[m]) for m in MIXTURE}
    for i, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
        if hi == lo:
            if init:  # the state passes through: dS0 = dS_final
                for j in range(2):
                    np.testing.assert_array_equal(grads["initial_state"][j][i],
                                                  cts[program.state][j][i])
            continue
        one_cts = {"y": cts["y"][:, lo:hi],
                   program.state: tuple(a[i:i + 1] for a in cts[program.state])}
        one = og.run_vjp(program, _one(inputs, lo, hi, i), one_cts)
        for name in ("q", "k", "v"):
            gma_ref.assert_close(grads[name][:, lo:hi], one[name], 1e-10, f"d{name} of seq {i}")
        if init:
            for j in range(2):
                gma_ref.assert_close(grads["initial_state"][j][i:i + 1],
                                     one["initial_state"][j], 1e-10, f"dstate of seq {i}")
        for m in MIXTURE:
            mixture[m] += one[m]
    for m in MIXTURE:  # every sequence's tokens route through the same mixture
        gma_ref.assert_close(grads[m], mixture[m], 1e-10, f"d{m}")
    assert grads["cu_seqlens"] is None
    if not init:  # absent (causal) or no such input (bidirectional)
        assert grads.get("initial_state") is None


# -- hard cases ----------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("case", ["N1", "K1"])
def test_run_vjp_small_shapes(causal, case, rng, gma_ref):
    n, k = (1, K) if case == "N1" else (N, 1)
    for norm in NORMS:
        inputs, program, cts = _program_case(rng, gma_ref, causal=causal, norm=norm,
                                             covariance="diag", mask=False, init=False,
                                             n=n, k=k)
        grads = og.run_vjp(program, inputs, cts)
        ref = _torch_grads(inputs, cts, program.state, causal=causal, norm=norm,
                           covariance="diag")
        if case == "K1":  # one component: r = 1 everywhere, no gradient reaches routing
            for name in ("q", "k", "mean", "log_var", "logit"):
                assert np.all(grads[name] == 0.0), name
                assert np.abs(ref[name]).max() < 1e-12, name
            ref = {"v": ref["v"]}
        _compare(grads, ref, gma_ref)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("norm", NORMS)
def test_run_vjp_fully_masked_row(causal, norm, rng, gma_ref):
    inputs, program, cts = _program_case(rng, gma_ref, causal=causal, norm=norm,
                                         covariance="diag", mask=True, init=False)
    inputs["key_mask"][0] = False
    inputs["key_mask"][1, 0] = True  # the other row keeps a key
    grads = og.run_vjp(program, inputs, cts)
    for name in ("q", "k", "v", "mean", "log_var", "logit"):
        assert np.isfinite(grads[name]).all(), name
    # row 0 reads an empty memory: y = 0 whatever q, k, v (and writes nothing)
    for name in ("q", "k", "v"):
        assert np.all(grads[name][0] == 0.0), name
    assert np.abs(grads["v"][1]).sum() > 0
    ref = _torch_grads(inputs, cts, program.state, causal=causal, norm=norm, covariance="diag")
    _compare(grads, ref, gma_ref)


def _near_boundaries(rng, gma_ref, x, mean, log_var, logit, covariance):
    """Move each token of x [B, N, H, D] onto the segment between two random
    components, where their logits are equal (bisection), plus a little noise:
    with tiny variances almost every other point has an exactly one-hot r, whose
    gradients are 0 on both sides of any comparison."""
    b, n, h, d = x.shape
    k = mean.shape[1]
    heads = np.arange(h)[None, None, :]
    a = rng.integers(0, k, size=(b, n, h))
    c = (a + rng.integers(1, k, size=(b, n, h))) % k  # c != a
    mu_a, mu_c = mean[heads, a], mean[heads, c]  # [B, N, H, D]
    lo, hi = np.zeros((b, n, h, 1)), np.ones((b, n, h, 1))

    def gap(t):  # l_a - l_c at mu_a + t (mu_c - mu_a): decreasing in t
        logits = gma_ref.ref_logits(mu_a + t * (mu_c - mu_a), mean, log_var, logit, covariance)
        return (np.take_along_axis(logits, a[..., None], -1)
                - np.take_along_axis(logits, c[..., None], -1))

    for _ in range(60):
        mid = (lo + hi) / 2
        above = gap(mid) > 0
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    sigma = np.exp(0.5 * np.mean(log_var))
    return mu_a + lo * (mu_c - mu_a) + 1e-3 * sigma * rng.normal(size=x.shape)


def _sharp_inputs(rng, gma_ref, inputs, covariance):
    mix = tuple(inputs[m] for m in MIXTURE)
    for name in ("q", "k"):
        inputs[name] = _near_boundaries(rng, gma_ref, inputs[name], *mix, covariance)
    r = oracle.responsibility(inputs["q"], *mix, covariance)
    # the test means something: many tokens split between components
    assert np.mean(r.max(-1) < 0.99) > 0.3
    return inputs


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("covariance", COVARIANCES)
def test_run_vjp_tiny_variances(causal, covariance, rng, gma_ref):
    """log_var ~ -8: sharp responsibilities, logits of magnitude ~1e3."""
    inputs, program, cts = _program_case(rng, gma_ref, causal=causal, norm="row",
                                         covariance=covariance, mask=True, init=causal,
                                         log_var_mean=-8.0)
    inputs = _sharp_inputs(rng, gma_ref, inputs, covariance)
    grads = og.run_vjp(program, inputs, cts)
    ref = _torch_grads(inputs, cts, program.state, causal=causal, norm="row",
                       covariance=covariance)
    _compare(grads, ref, gma_ref)


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_responsibility_vjp_tiny_variances_finite_differences(covariance, rng, gma_ref):
    inputs = gma_ref.make_inputs(rng, B, N, H, D, DV, K, covariance, log_var_mean=-8.0)
    inputs = _sharp_inputs(rng, gma_ref, inputs, covariance)
    args = {"x": inputs["q"], **{m: inputs[m] for m in MIXTURE}}
    dr = rng.normal(size=(B, N, H, K))

    def loss(**a):
        return _dot(oracle.responsibility(**a, covariance=covariance), dr)

    grads = dict(zip(args, og.responsibility_vjp(**args, dr=dr, covariance=covariance)))
    assert all(np.isfinite(g).all() for g in grads.values())
    # logits of ~1e3 round at ~1e-13, which the differences divide by h: a looser tolerance
    check_fd(loss, args, grads, rng, tol=1e-4, h=1e-5)

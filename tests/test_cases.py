"""gmagen.cases: rounding, inputs of every hard case, the N x N reference, run_case."""

from __future__ import annotations

import math
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gmagen import cases
from gmagen.backends import registry
from gmagen.backends.numpy import NumpyBackend
from gmagen.cases import (DTYPES, HARD_CASES, TOLERANCES, Case, backend_targets, cases_for,
                          make_inputs, quadratic_reference, rel_error, round_to, run_case)
from gmagen.ir import oracle

ALL = cases_for(DTYPES)


def test_tolerances_are_the_spec_contract() -> None:
    assert TOLERANCES == {"f64": 1e-10, "f32": 1e-4, "f16": 1e-2, "bf16": 2e-2}


def test_case_id() -> None:
    case = Case(True, "slot", "spherical", True, 2, 63, 3, 8, 5, 4, "f32")
    assert case.id == "causal-slot-spherical-mask-B2-N63-H3-D8-Dv5-K4-f32"
    assert replace(case, hard="sharp").id.endswith("-f32-sharp")
    assert replace(case, layout="bhnd", causal=False, mask=False).id == \
        "bidir-slot-spherical-nomask-B2-N63-H3-D8-Dv5-K4-f32-bhnd"


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_to_is_idempotent_and_matches_casts(dtype: str) -> None:
    x = np.random.default_rng(0).normal(0, 3, 4096)
    r = round_to(x, dtype)
    assert r.dtype == np.float64
    np.testing.assert_array_equal(round_to(r, dtype), r)
    cast = {"f64": np.float64, "f32": np.float32, "f16": np.float16}.get(dtype)
    if cast is not None:
        np.testing.assert_array_equal(r, x.astype(cast).astype(np.float64))
    assert np.max(np.abs(r - x) / np.abs(x)) <= {"f64": 0, "f32": 2**-24, "f16": 2**-11,
                                                 "bf16": 2**-8}[dtype]


def test_round_to_bf16_ties_to_even_and_specials() -> None:
    one = 1.0
    ulp = 2.0**-7  # bf16 has 7 explicit mantissa bits
    x = np.array([one + ulp / 2, one + 3 * ulp / 2, -(one + ulp / 2), np.inf, -np.inf, 0.0,
                  np.nan, 3.3895313892515355e38])
    r = round_to(x, "bf16")
    assert r[0] == 1.0 and r[1] == one + 2 * ulp and r[2] == -1.0  # halfway: to even
    assert r[3] == np.inf and r[4] == -np.inf and r[5] == 0.0 and np.isnan(r[6])
    assert r[7] == 3.3895313892515355e38  # the largest bf16 stays finite
    bits = r[:6].astype(np.float32).view(np.uint32)
    assert np.all(bits & 0xFFFF == 0)


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False, width=32))
def test_round_to_bf16_matches_torch(value: float) -> None:
    torch = pytest.importorskip("torch")
    expected = torch.tensor([value], dtype=torch.float32).to(torch.bfloat16).double().item()
    assert round_to(np.array([value]), "bf16")[0] == expected


def test_cases_cover_every_variant_and_hard_case() -> None:
    ids = [c.id for c in ALL]
    assert len(ids) == len(set(ids))
    for quick in (False, True):
        for dtype in DTYPES:
            mine = [c for c in cases_for([dtype], quick) if c.dtype == dtype]
            assert {c.hard for c in mine} >= set(HARD_CASES)
            assert {c.layout for c in mine} == {"bnhd", "bhnd"}
            for flag in ("causal", "norm", "covariance", "mask"):
                plain = {getattr(c, flag) for c in mine if not c.hard}
                assert len(plain) >= 2, (flag, quick, dtype)
    full = [c for c in ALL if c.dtype == "f32" and not c.hard and c.layout == "bnhd"]
    assert len({(c.causal, c.norm, c.covariance, c.mask) for c in full}) == 24
    for hard in HARD_CASES:
        flags = {c.causal for c in ALL if c.hard == hard}
        assert flags == ({True} if hard == "state_split" else {False, True}), hard


@pytest.mark.parametrize("case", [c for c in ALL if c.dtype in ("f32", "bf16")
                                  and (c.hard or c.layout == "bhnd")], ids=lambda c: c.id)
def test_make_inputs_hard_cases(case: Case) -> None:
    x = make_inputs(case, np.random.default_rng(1))
    token = (case.B, case.N, case.H) if case.layout == "bnhd" else (case.B, case.H, case.N)
    assert x["q"].shape == token + (case.D,) and x["v"].shape == token + (case.Dv,)
    for name, value in x.items():
        if value.dtype != np.bool_:
            np.testing.assert_array_equal(round_to(value, case.dtype), value, err_msg=name)
    prefix = "q_" if case.hard == "qk_mixtures" else ""
    if case.hard == "qk_mixtures":
        assert {"k_mean", "k_log_var", "k_logit"} <= set(x)
    mean, log_var = x[prefix + "mean"], x[prefix + "log_var"]
    assert mean.shape == (case.H, case.K, case.D)
    if case.hard == "N1":
        assert case.N == 1
    if case.hard == "ragged_N":
        assert all(case.N % t for t in (16, 32, 64))
    if case.hard == "K1":
        assert case.K == 1 and x["logit"].shape == (case.H, 1)
    if case.hard == "sharp":
        assert -9 < log_var.mean() < -7
        r = oracle.responsibility(x["q"], mean, log_var, x["logit"], case.covariance)
        assert np.mean(r.max(-1)) > 0.99  # near one-hot
    else:
        assert abs(log_var.mean()) < 0.5
    if case.hard == "large":
        assert np.abs(x["q"]).max() > 20 and np.abs(x["k"]).std() > 10
    if case.hard == "all_masked":
        assert (~x["key_mask"]).all(axis=1).any()
    elif case.mask:
        assert x["key_mask"].any(axis=1).all()


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_strided_inputs_are_views_with_the_same_values(framework: str) -> None:
    if framework == "torch":
        pytest.importorskip("torch")
    case = next(c for c in ALL if c.hard == "strided" and c.dtype == "f32")
    x = make_inputs(case, np.random.default_rng(2))
    args = cases._framework_inputs(case, x, framework, "cpu")
    for name in ("q", "k", "v", "mean"):
        arr = args[name]
        contiguous = (arr.is_contiguous() if framework == "torch"
                      else arr.flags["C_CONTIGUOUS"])
        assert not contiguous, name
        np.testing.assert_array_equal(cases.to_host(arr), x[name])


@pytest.mark.parametrize("case", [c for c in ALL if c.dtype == "f64"], ids=lambda c: c.id)
def test_quadratic_reference_agrees_with_oracle(case: Case) -> None:
    x = make_inputs(case, np.random.default_rng(3))
    program = case.program()
    y_oracle = oracle.run(program, x)[program.outputs[0]]
    y_quad = quadratic_reference(case, x)
    assert rel_error(y_quad, y_oracle) < 1e-12


def test_rel_error() -> None:
    ref = np.ones((2, 3))
    assert rel_error(ref, ref) == 0.0
    assert rel_error(ref * 1.5, ref) == pytest.approx(0.5)
    assert math.isnan(rel_error(ref * np.nan, ref))
    assert rel_error(np.zeros(2), np.zeros(2)) == 0.0
    with pytest.raises(Exception, match="shape"):
        rel_error(np.ones(3), np.ones(2))


def test_run_case_numpy_all_pass() -> None:
    for case in cases_for(["f32", "bf16"], quick=True):
        result = run_case(case, "numpy", "numpy", "cpu", np.random.default_rng(4))
        assert result.passed, (case.id, result.detail)
        assert result.error <= result.tol and result.seconds >= 0


def test_run_case_reports_instead_of_raising() -> None:
    case = cases_for(["f32"], quick=True)[0]
    result = run_case(case, "no_such_backend", "numpy", "cpu", np.random.default_rng(0))
    assert not result.passed and math.isnan(result.error)
    assert "no_such_backend" in result.detail


class _TorchNative(NumpyBackend):
    name = "fake_torch"
    native = "torch"
    devices = ("cuda", "cpu")
    dtypes = ("f16", "bf16", "f32")
    cpu_dtypes = ("f32",)


def test_backend_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    target, reason = backend_targets("numpy")
    assert target is not None and reason == ""
    assert (target.framework, target.device) == ("numpy", "cpu") and "f64" in target.dtypes
    torch = pytest.importorskip("torch")
    module = types.ModuleType("_gmagen_test_fake_torch")
    module.BACKEND = _TorchNative()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(registry.BACKENDS, "fake_torch", module.__name__)
    registry._load.cache_clear()
    try:
        target, _ = backend_targets("fake_torch")
        assert target is not None
        if torch.cuda.is_available():
            assert (target.framework, target.device, target.dtypes) == \
                ("torch", "cuda", ("f16", "bf16", "f32"))
        else:
            assert (target.framework, target.device, target.dtypes) == ("torch", "cpu", ("f32",))
            monkeypatch.setattr(_TorchNative, "devices", ("cuda",))
            target, reason = backend_targets("fake_torch")
            assert target is None and "CUDA" in reason
    finally:
        registry._load.cache_clear()

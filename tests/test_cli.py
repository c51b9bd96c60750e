"""The gmagen command line: check (and that it catches a wrong backend), show, info."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from typing import Any, Mapping

import numpy as np
import pytest

from gmagen.backends import registry
from gmagen.backends.base import Availability, Executable
from gmagen.backends.numpy import NumpyBackend
from gmagen.cases import backend_targets, cases_for
from gmagen.cli.main import main


class _Wrong(Executable):
    """The oracle's result, then spoiled: y scaled (or NaN), or an exception."""

    def __init__(self, inner: Executable, how: str):
        self.inner, self.how = inner, how
        self.source, self.config = inner.source, inner.config

    def run(self, env: dict[str, Any], binding: Any) -> dict[str, Any]:
        if self.how == "raise":
            raise RuntimeError("kernel launch failed on purpose")
        out = self.inner.run(env, binding)
        for name, value in out.items():
            if isinstance(value, np.ndarray) and value.ndim == 4:  # y, not the (S, n) memory
                out[name] = value * 1.1 if self.how == "scale" else value * np.nan
        return out


class WrongBackend(NumpyBackend):
    def __init__(self, name: str, how: str):
        self.name, self.how = name, how

    def lower(self, kernel: Any, binding: Any, config: Any,
              options: Mapping[str, Any]) -> Executable:
        return _Wrong(super().lower(kernel, binding, config, options), self.how)


class MissingBackend(NumpyBackend):
    name = "missing"

    def availability(self) -> Availability:
        return Availability(False, "needs a device this machine lacks")


@pytest.fixture
def register(monkeypatch: pytest.MonkeyPatch):
    """Register a backend object under a name for one test."""

    def add(name: str, backend: Any) -> None:
        module = types.ModuleType(f"_gmagen_test_backend_{name}")
        module.BACKEND = backend  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(registry.BACKENDS, name, module.__name__)
        registry._load.cache_clear()

    yield add
    registry._load.cache_clear()


def _numpy_quick_cases() -> list:
    target, _ = backend_targets("numpy")
    assert target is not None
    return cases_for(target.dtypes, quick=True)


def test_check_numpy_quick_passes_and_prints_table(capsys: pytest.CaptureFixture) -> None:
    assert main(["check", "--backend", "numpy", "--quick", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "gmagen check (seed 1)" in out
    assert "state_split" in out and "qk_mixtures" in out and "pass" in out
    assert "bidir-row-diag-mask-B2-N63-H3-D8-Dv5-K4-f32" in out
    assert "FAIL" not in out and "OK:" in out


def test_check_json_one_record_per_case(capsys: pytest.CaptureFixture) -> None:
    assert main(["check", "--backend", "numpy", "--quick", "--json", "--seed", "7"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = _numpy_quick_cases()
    assert data["seed"] == 7 and data["passed"] is True
    assert [r["case"] for r in data["results"]] == [c.id for c in expected]
    for record in data["results"]:
        assert record["passed"] and record["error"] <= record["tol"]
        assert record["backend"] == "numpy"
    assert data["backends"]["numpy"]["framework"] == "numpy"


def test_check_seed_reproduces_inputs(capsys: pytest.CaptureFixture) -> None:
    runs = []
    for _ in range(2):
        main(["check", "--backend", "numpy", "--dtype", "f32", "-k", "sharp", "--json",
              "--seed", "5"])
        runs.append([r["error"] for r in json.loads(capsys.readouterr().out)["results"]])
    assert runs[0] == runs[1] and len(runs[0]) == 2


@pytest.mark.parametrize("how", ["scale", "nan", "raise"])
def test_check_fails_on_wrong_backend(how: str, register: Any,
                                      capsys: pytest.CaptureFixture) -> None:
    register("wrong", WrongBackend("wrong", how))
    assert main(["check", "--backend", "wrong", "--quick", "--dtype", "f32", "--json",
                 "--seed", "0"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is False and data["results"]
    assert all(not r["passed"] for r in data["results"])
    detail = data["results"][0]["detail"]
    expected = {"scale": "error", "nan": "NaN", "raise": "kernel launch failed on purpose"}[how]
    assert expected in detail


def test_check_table_shows_failures(register: Any, capsys: pytest.CaptureFixture) -> None:
    register("wrong", WrongBackend("wrong", "scale"))
    assert main(["check", "--backend", "wrong", "numpy", "--quick", "--dtype", "f32"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "FAILED" in out and "pass" in out  # numpy still passes


def test_check_requested_unavailable_backend_fails(register: Any,
                                                   capsys: pytest.CaptureFixture) -> None:
    register("missing", MissingBackend())
    assert main(["check", "--backend", "missing", "--quick"]) == 1
    assert "needs a device this machine lacks" in capsys.readouterr().out
    # not requested: listed, but not a failure
    assert main(["check", "--quick", "--dtype", "f64", "-k", "N1"]) == 0
    assert "needs a device this machine lacks" in capsys.readouterr().out


def test_check_unknown_backend_is_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["check", "--backend", "no_such_backend"]) == 2
    assert "no_such_backend" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expect", [
    (["show"], ["program gma_bidirectional_row_diag", "slot_write", "plan for", "kernel gma_write",
                "kernel gma_read", "# source of gma_read", "gmagen numpy oracle"]),
    (["show", "--causal", "--norm", "slot", "--covariance", "shared", "--mask", "-K", "8",
      "--layout", "bhnd"],
     ['layout="bhnd"', "causal_scan", 'norm="slot"', "kernel gma_scan", "K=8"]),
    (["show", "--qk-mixtures"], ["q_mean", "k_mean", "gma_qk_mixtures"]),
])
def test_show_prints_ir_plan_and_source(argv: list, expect: list,
                                        capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    for text in expect:
        assert text in out


def test_info_runs(capsys: pytest.CaptureFixture) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for text in ("gmagen", "numpy", "cache_dir", "autotune_cache", "backends"):
        assert text in out
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backends"]["numpy"]["available"] is True
    assert set(data["versions"]) >= {"gmagen", "python", "numpy", "torch", "triton", "jax",
                                     "cupy", "tvm"}


def test_console_entry_point_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "gmagen.cli.main", "check", "--backend",
                           "numpy", "-k", "all_masked", "--dtype", "f64"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed, 0 failed" in done.stdout

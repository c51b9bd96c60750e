"""What benchmarks/bench_tuned.py ships: a tuned entry whose row ran slower in
full calls than with the defaults is left out of the exported cache file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="bench_tuned.py runs on torch")

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_tuned.py"


@pytest.fixture(scope="module")
def bench_tuned():
    spec = importlib.util.spec_from_file_location("bench_tuned", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tune(backend: str, variant: str, N: int, plans: list) -> dict:
    return {"kind": "tune", "strategy": "auto", "backend": backend, "variant": variant, "N": N,
            "plans": [{"key": key, "config": cfg, "default": "D"} for key, cfg in plans]}


def _bench(impl: str, variant: str, N: int, ms: float) -> dict:
    return {"kind": "bench", "impl": impl, "variant": variant, "N": N, "ms": ms}


def test_only_changed_entries_of_rows_that_lost_are_dropped(bench_tuned, tmp_path: Path) -> None:
    records = [
        # lost by 12%: its changed entry goes, its default-config entry was never a change
        _tune("cupy", "bidirectional", 65536, [("w65", "D"), ("r65", "C")]),
        _bench("gmagen-cupy-default", "bidirectional", 65536, 9.57),
        _bench("gmagen-cupy-tuned", "bidirectional", 65536, 10.77),
        # slower by 2%, within the tolerance: kept
        _tune("cupy", "bidirectional", 4096, [("r4", "C")]),
        _bench("gmagen-cupy-default", "bidirectional", 4096, 1.00),
        _bench("gmagen-cupy-tuned", "bidirectional", 4096, 1.02),
        # faster: kept; the exhaustive strategy is never vetoed here
        _tune("triton", "causal", 1024, [("s1", "C")]),
        _bench("gmagen-triton-default", "causal", 1024, 0.15),
        _bench("gmagen-triton-tuned", "causal", 1024, 0.12),
        dict(_tune("triton", "causal", 1024, [("s1x", "C")]), strategy="exhaustive"),
    ]
    lost = bench_tuned.lost_in_full_calls(records)
    assert set(lost) == {"r65"}
    assert "10.7700 ms tuned vs 9.5700 ms default" in lost["r65"]

    path = tmp_path / "export.json"
    path.write_text(json.dumps({"schema": 1, "gpu": {}, "entries": {
        k: {"config": {}} for k in ("w65", "r65", "r4", "s1")}}))
    bench_tuned.drop_entries(path, lost)
    assert sorted(json.loads(path.read_text())["entries"]) == ["r4", "s1", "w65"]

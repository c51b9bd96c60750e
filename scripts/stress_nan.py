"""Hunt the intermittent NaN of the CuPy bidirectional plan (GPU tests
test_fragment_configs[slot-shared-bhnd] f16 (40, 72, 24) and
test_hard_cases[False-qk_mixtures] f16): the same cases many times on fresh
inputs, outputs NaN-filled beforehand as in the tests; on a NaN, where it is
(S, n, y: which (b, h, k) / rows), whether the same inputs give it again, and
whether synchronizing between the kernels changes anything.

    python scripts/stress_nan.py OUT.json [trials]
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

import gmagen
from gmagen.backends.cupy import launch
from gmagen.cases import round_to
from gmagen.dsl import gma_qk_mixtures

_real_empty = launch.empty


def _nan_empty(like, shape, dtype=None):
    out = _real_empty(like, shape, dtype)
    return out.fill_(float("nan")) if launch.is_torch(out) else out.fill(float("nan"))


def inputs(rng, B, N, H, D, Dv, K, cov, dtype, extra=False):
    lv = {"diag": (H, K, D), "spherical": (H, K), "shared": (H,)}[cov]
    arrs = [rng.normal(size=(B, N, H, D)), rng.normal(size=(B, N, H, D)),
            rng.normal(size=(B, N, H, Dv)), rng.normal(0, 0.5, (H, K, D)),
            rng.normal(0, 0.1, lv), rng.normal(0, 0.1, (H, K))]
    if extra:
        arrs += [rng.normal(0, 0.5, (H, K, D)), rng.normal(0, 0.1, lv), rng.normal(0, 0.1, (H, K))]
    tdt = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    return [torch.tensor(round_to(a, dtype) if i < 3 else a, dtype=tdt if i < 3 else torch.float32,
                         device="cuda") for i, a in enumerate(arrs)]


CASES = {
    "frag-slot-shared-bhnd-f16": dict(
        program=gmagen.gma(norm="slot", covariance="shared", layout="bhnd"),
        shape=(2, 333, 3, 40, 72, 24), cov="shared", dtype="f16", bhnd=True, mask=True,
        config={"gma_write": dict(block_n=64, block_dv=16, num_threads=128, mma=2),
                "gma_read": dict(block_n=64, block_dv=16, num_threads=128, mma=2)}),
    "qk-mixtures-f16": dict(program=gma_qk_mixtures(), shape=(2, 200, 2, 64, 64, 16), cov="diag",
                            dtype="f16", bhnd=False, mask=False, config=None, extra=True),
    "frag-slot-diag-bhnd-bf16-small": dict(
        program=gmagen.gma(norm="slot", covariance="diag", layout="bhnd"),
        shape=(2, 333, 3, 20, 33, 7), cov="diag", dtype="bf16", bhnd=True, mask=True,
        config={"gma_write": dict(block_n=32, block_dv=32, num_threads=64, mma=2),
                "gma_read": dict(block_n=32, block_dv=32, num_threads=64, mma=2)}),
}


def where_nan(t: torch.Tensor) -> dict:
    idx = torch.nonzero(torch.isnan(t.float()))
    return {"count": int(idx.shape[0]), "first": idx[:8].tolist(),
            "unique_dim0": sorted(set(idx[:, 0].tolist()))[:8] if idx.numel() else []}


def main() -> None:
    out, trials = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100
    launch.empty = _nan_empty
    rng = np.random.default_rng(1234)
    records = []
    for name, case in CASES.items():
        kern = gmagen.compile(case["program"], backend="cupy", config=case["config"])
        B, N, H, D, Dv, K = case["shape"]
        hits = 0
        for trial in range(trials):
            arrs = inputs(rng, B, N, H, D, Dv, K, case["cov"], case["dtype"], case.get("extra", False))
            if case["bhnd"]:
                arrs = [a.transpose(1, 2).contiguous() if i < 3 else a for i, a in enumerate(arrs)]
            mask = torch.tensor(rng.random((B, N)) > 0.3, device="cuda") if case["mask"] else None
            y, (s, n) = kern(*arrs, key_mask=mask, return_state=True)
            torch.cuda.synchronize()
            bad = {k: where_nan(t) for k, t in (("y", y), ("S", s), ("n", n)) if torch.isnan(t.float()).any()}
            if not bad:
                continue
            hits += 1
            again = []
            for _ in range(3):
                y2, (s2, n2) = kern(*arrs, key_mask=mask, return_state=True)
                torch.cuda.synchronize()
                again.append({k: int(torch.isnan(t.float()).sum()) for k, t in (("y", y2), ("S", s2), ("n", n2))})
            rec = {"case": name, "trial": trial, "nan": bad, "again": again,
                   "inputs_finite": [bool(torch.isfinite(a.float()).all()) for a in arrs]}
            print(json.dumps(rec), flush=True)
            records.append(rec)
            if hits >= 4:
                break
        print(f"{name}: {hits} trials with NaN of {trial + 1}", flush=True)
        records.append({"case": name, "hits": hits, "trials": trial + 1, "config": str(kern.config)})
    json.dump(records, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()

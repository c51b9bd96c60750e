"""GMA forward + backward on one GPU: gmagen triton (gmagen.torch.gma) vs SDPA flash
vs eager PyTorch GMA with autograd.  Records carry ``variant`` "<variant>-fwdbwd".

Timing as in bench_triton.py (METHOD.md: events, warm-up, median, rotating input
sets).  One timed call is forward plus backward with a fixed cotangent; extra
memory is the peak during that call minus what was allocated before it (inputs,
cotangent) and minus the gradients it returns (the size of the inputs).

    python benchmarks/bench_training.py --out benchmarks/results/h100_training.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_triton import (L2_BYTES, _flush, _sdpa, copy_bandwidth, extra_bytes,  # noqa: E402
                          make_sets, time_ms, versions)
from eager_gma import eager_gma  # noqa: E402

import gmagen.torch as gt  # noqa: E402


def _fwdbwd(forward):
    """A call: fresh leaves over the set's tensors, forward, backward with dy."""
    def call(*tensors_and_dy):
        *tensors, dy = tensors_and_dy
        leaves = [t.detach().requires_grad_() for t in tensors]
        y = forward(*leaves)
        y.backward(dy)
        return [t.grad for t in leaves]
    return call


def bench(args, bw: float, records: list, base: dict) -> None:
    B, H, D, K = 4, 16, 64, 64
    for N in args.lengths:
        n_sets = max(1, min(3, math.ceil(2 * L2_BYTES / (4 * B * N * H * D * 2))))
        sets = [s + (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16),)
                for s in make_sets(B, N, H, D, K, torch.bfloat16, n_sets)]
        input_bytes = 3 * B * N * H * D * 2
        grad_bytes = input_bytes + sum(t.numel() * 4 for t in sets[0][3:6])
        for causal in (False, True):
            variant = ("causal" if causal else "bidirectional") + "-fwdbwd"
            row = dict(base, variant=variant, N=N, B=B, H=H, D=D, Dv=D, K=K, dtype="bf16",
                       input_bytes=input_bytes,
                       # q, k, v, dy read and y, dq, dk, dv written once
                       floor_ms=8 * B * N * H * D * 2 / bw * 1e3)
            impls = {
                "gmagen-triton": _fwdbwd(lambda *a: gt.gma(*a, causal=causal, backend="triton")),
                "sdpa-flash": _fwdbwd(lambda q, k, v, *_: _sdpa(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal)
                    .transpose(1, 2)),
                "eager-gma": _fwdbwd(lambda *a: eager_gma(*a, causal=causal)),
            }
            for impl in args.impls.split(","):
                if impl not in impls:
                    continue
                fn = impls[impl]
                try:
                    ms = time_ms(fn, sets, warmup=2, reps=args.reps)
                    extra = extra_bytes(fn, sets[0], grad_bytes)  # minus the gradients
                    rec = dict(row, impl=impl, ms=ms, extra_bytes=extra)
                except torch.OutOfMemoryError as exc:
                    rec = dict(row, impl=impl, ms=None, extra_bytes=None, error=f"OOM: {exc}"[:200])
                    torch.cuda.empty_cache()
                except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
                    rec = dict(row, impl=impl, ms=None, extra_bytes=None,
                               error=f"{type(exc).__name__}: {exc}"[:300])
                records.append(rec)
                print(f"{impl:14s} {variant:20s} N={N:6d} ms={rec['ms']} extra={rec['extra_bytes']}"
                      f"{' ' + rec['error'] if 'error' in rec else ''}", flush=True)
                _flush(args.out, records)
            records.append(dict(row, impl="floor", ms=row["floor_ms"], extra_bytes=0))
        del sets
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 16384, 65536])
    ap.add_argument("--impls", default="gmagen-triton,sdpa-flash,eager-gma")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    base = {"gpu": torch.cuda.get_device_name(), "versions": versions(),
            "copy_bandwidth_Bps": bw}
    print(f"{base['gpu']}: copy bandwidth {bw / 1e12:.2f} TB/s; {base['versions']}", flush=True)
    records: list = []
    bench(args, bw, records, base)
    _flush(args.out, records)


if __name__ == "__main__":
    main()

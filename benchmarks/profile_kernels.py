"""Per-kernel GPU times of each GPU backend at the benchmark shape (one device call).

For gmagen-triton, gmagen-cupy and gmagen-tvm (bf16, B=4, H=16, D=Dv=K=64,
bidirectional and causal, one N): torch.profiler's CUDA activity over a few
calls after warm-up, every kernel the call launches (whichever library launched
it: CUPTI sees Triton's, CuPy's and TVM's alike), its launches and device time
per call, and its share of the call.  What the end-to-end rows of
bench_triton.py cannot say: which kernel of a backend is slow, and how far each
is from moving its bytes at the copy bandwidth.  Writes a list of records.

    python benchmarks/profile_kernels.py --out profile.json [--n 1024 65536]
        [--impls gmagen-triton,gmagen-cupy,gmagen-tvm] [--tvm-exports DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_triton import copy_bandwidth, make_sets, versions  # noqa: E402

import gmagen  # noqa: E402

CALLS = 5  # profiled calls per (impl, variant), after warm-up


def kernels_of(impl: str, causal: bool, args: argparse.Namespace):
    if impl == "gmagen-tvm":
        if args.tvm_exports:
            return gmagen.load(str(Path(args.tvm_exports) / ("causal" if causal else "bidir")))
        return gmagen.compile(gmagen.gma(causal=causal), backend="tvm", target="cuda")
    backend = impl.removeprefix("gmagen-")
    return gmagen.compile(gmagen.gma(causal=causal), backend=backend)


def profile_calls(fn, sets: list) -> dict[str, dict[str, float]]:
    """{kernel name: {"launches", "us"}} per call, summed over CALLS calls / CALLS."""
    from torch.profiler import ProfilerActivity, profile

    for s in sets:  # warm-up: compiles, caches, allocator
        fn(*s)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(CALLS):
            fn(*sets[i % len(sets)])
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    total = defaultdict(int)
    for evt in events:
        total[evt.name] += 1
    seen: dict[str, int] = defaultdict(int)
    per: dict[str, dict[str, float]] = defaultdict(lambda: {"launches": 0.0, "us": 0.0})
    for evt in events:
        # a name launched several times per call (TVM names the kernels of each module
        # main_kernel, main_kernel_1, ...: the write and read modules' both have a
        # main_kernel_3) gets one row per launch position within the call
        per_call = max(1, total[evt.name] // CALLS)
        name = evt.name if per_call == 1 else f"{evt.name} [{seen[evt.name] % per_call}]"
        seen[evt.name] += 1
        # torch >= 2.x names the device time device_time (older: cuda_time)
        us = getattr(evt, "device_time", None)
        if us is None:
            us = evt.cuda_time
        row = per[name]
        row["launches"] += 1.0 / CALLS
        row["us"] += us / CALLS
    return dict(per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, nargs="+", default=[65536])
    ap.add_argument("--impls", default="gmagen-triton,gmagen-cupy,gmagen-tvm")
    ap.add_argument("--tvm-exports", default="",
                    help="gmagen-tvm from libraries under this directory (gmagen.load)")
    args = ap.parse_args()
    B, H, D, K = 4, 16, 64, 64
    bw = copy_bandwidth()
    records = []
    for N in args.n:
        profile_length(args, records, bw, B, H, D, K, N)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)


def stream_us(fn, sets: list) -> float:
    """Event-timed microseconds per call: kernels plus the gaps between them (launch
    and host overhead), which the profiler's per-kernel sum leaves out."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for i in range(CALLS):
        fn(*sets[i % len(sets)])
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / CALLS


def profile_length(args: argparse.Namespace, records: list, bw: float,
                   B: int, H: int, D: int, K: int, N: int) -> None:
    """Profile every impl and variant at one length N; appends to records."""
    sets = make_sets(B, N, H, D, K, torch.bfloat16, 2)
    token_bytes = B * N * H * D * 2
    base = dict(gpu=torch.cuda.get_device_name(), versions=versions(), N=N, B=B, H=H, D=D, Dv=D,
                K=K, dtype="bf16", copy_bandwidth_Bps=bw,
                floor_us=4 * token_bytes / bw * 1e6)  # q, k, v read, y written, once
    for impl in args.impls.split(","):
        for causal in (False, True):
            variant = "causal" if causal else "bidirectional"
            try:
                kern = kernels_of(impl, causal, args)
                per = profile_calls(lambda *a: kern(*a), sets)
                wall = stream_us(lambda *a: kern(*a), sets)
            except Exception as exc:  # noqa: BLE001 - report and go on with the others
                print(f"{impl} {variant}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                records.append(dict(base, impl=impl, variant=variant, error=str(exc)[:500]))
                continue
            total = sum(r["us"] for r in per.values())
            print(f"{impl} {variant} N={N}: {total:.0f} us per call in kernels, {wall:.0f} us "
                  f"event-timed (floor {base['floor_us']:.0f} us)", flush=True)
            for name, r in sorted(per.items(), key=lambda kv: -kv[1]["us"]):
                share = r["us"] / total if total else 0.0
                print(f"  {r['us']:9.1f} us  {share:6.1%}  x{r['launches']:.0f}  {name[:90]}",
                      flush=True)
                records.append(dict(base, impl=impl, variant=variant, kernel=name,
                                    launches_per_call=r["launches"], us_per_call=r["us"],
                                    share=share, total_us=total, stream_us=wall))
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()

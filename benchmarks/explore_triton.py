"""Config sweep and overhead breakdown for the Triton kernels (one device call).

Prints, for the benchmark shape at one N: time per config (bidirectional and
causal), tf32x3 vs tf32 logits, per-kernel GPU times (torch.profiler), and the
host cost of one call (checks + launches).  Used to pick space.default_config.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_triton import make_sets, time_ms  # noqa: E402

import gmagen  # noqa: E402
from gmagen.adapters import checks  # noqa: E402


def main() -> None:
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    out = sys.argv[2] if len(sys.argv) > 2 else ""
    sets = make_sets(4, N, 16, 64, 64, torch.bfloat16, 2)
    rows = []
    grids = {
        False: [dict(block_n=bn, num_warps=w, num_stages=st, segments=sg)
                for bn, w, st, sg in itertools.product((64, 128), (4, 8), (2, 3), (0, 24))],
        True: [dict(block_n=bn, num_warps=w, num_stages=st, segments=sg)
               for bn, w, st, sg in itertools.product((32, 64), (4, 8), (1, 2), (0, 16))],
    }
    for causal in (False, True):
        names = ("gma_scan",) if causal else ("gma_write", "gma_read")
        best = None
        for cfg in grids[causal]:
            kern = gmagen.compile(gmagen.gma(causal=causal), backend="triton",
                                  config={n: cfg for n in names})
            try:
                ms = time_ms(lambda *a: kern(*a), sets, warmup=2, reps=8)
            except Exception as exc:  # noqa: BLE001 - a config may not compile
                print("FAILED", causal, cfg, str(exc)[:200], flush=True)
                continue
            rows.append(dict(causal=causal, config=cfg, ms=ms))
            print(f"causal={causal} {cfg} {ms:.3f} ms", flush=True)
            if best is None or ms < best[1]:
                best = (cfg, ms)
        print(f"BEST causal={causal}: {best}", flush=True)
        cfg = best[0]
        for prec in ("tf32", "tf32x3"):
            kern = gmagen.compile(gmagen.gma(causal=causal), backend="triton", precision=prec,
                                  config={n: cfg for n in names})
            ms = time_ms(lambda *a: kern(*a), sets, warmup=2, reps=8)
            rows.append(dict(causal=causal, config=cfg, precision=prec, ms=ms))
            print(f"causal={causal} precision={prec}: {ms:.3f} ms", flush=True)
        kern = gmagen.compile(gmagen.gma(causal=causal), backend="triton", config={n: cfg for n in names})
        kern(*sets[0])
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            kern(*sets[0])
            torch.cuda.synchronize()
        for evt in prof.key_averages():
            if evt.device_type == torch.autograd.DeviceType.CUDA or "gma" in evt.key:
                print(f"  kernel {evt.key[:40]:40s} {evt.device_time_total / 1e3:.3f} ms", flush=True)
    # host cost per call at a tiny N: checks alone, and the whole call
    small = make_sets(1, 64, 2, 64, 64, torch.bfloat16, 1)[0]
    for causal in (False, True):
        kern = gmagen.compile(gmagen.gma(causal=causal), backend="triton")
        kern(*small)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            kern(*small)
        torch.cuda.synchronize()
        call_us = (time.perf_counter() - t0) / 200 * 1e6
        names = [i.name for i in kern.program.inputs if not i.optional]
        t0 = time.perf_counter()
        for _ in range(200):
            checks.bind(kern.program, dict(zip(names, small)), "bnhd", ("bf16",), ("cuda",), "triton")
        bind_us = (time.perf_counter() - t0) / 200 * 1e6
        print(f"host: causal={causal} call {call_us:.1f} us, checks {bind_us:.1f} us", flush=True)
        rows.append(dict(causal=causal, host_call_us=call_us, host_bind_us=bind_us))
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Host time of one gmagen call, and where it goes (one device call).

profile_kernels.py found that an eager call costs far more than its kernels at
small N (CuPy, N=1024: 182 us of kernels, ~2.2 ms per call; Triton: 103 us of
kernels, ~440 us per call).  This script times the host side alone: the call
returns once its kernels are queued, so the time of CALLS calls without a
synchronize (the queue is kept short by one sync per REPEAT) is what the host
spends; cProfile then says in which functions.

    python benchmarks/profile_host.py --out host.json [--n 1024] [--impls ...]
        [--sort tottime|cumulative]

Rows: bidirectional and causal at N, and a decode step (causal, N=1, carrying
the state: what token-by-token generation calls once per token).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_triton import make_sets, versions  # noqa: E402

import gmagen  # noqa: E402

CALLS = 200


def host_us(fn, args: tuple) -> float:
    """Median over 5 rounds of the host microseconds per call (CALLS calls queued)."""
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(CALLS):
            fn(*args)
        rounds.append((time.perf_counter() - t0) * 1e6 / CALLS)
    torch.cuda.synchronize()
    return sorted(rounds)[len(rounds) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--impls", default="gmagen-triton,gmagen-cupy")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--sort", default="tottime", choices=("tottime", "cumulative"))
    args = ap.parse_args()
    B, H, D, K = 4, 16, 64, 64
    args_set = make_sets(B, args.n, H, D, K, torch.bfloat16, 1)[0]
    records = []
    for impl in args.impls.split(","):
        for variant in ("bidirectional", "causal", "decode"):
            kern = gmagen.compile(gmagen.gma(causal=variant != "bidirectional"),
                                  backend=impl.removeprefix("gmagen-"))
            call_args, kwargs, n = args_set, {}, args.n
            if variant == "decode":  # one new token, the state of a context carried in
                _, state = kern(*args_set, return_state=True)
                call_args = tuple(a[:, :1] for a in args_set[:3]) + tuple(args_set[3:])
                kwargs, n = {"initial_state": state, "return_state": True}, 1

            def fn(*a, kern=kern, kwargs=kwargs):
                return kern(*a, **kwargs)

            for _ in range(3):
                fn(*call_args)
            us = host_us(fn, call_args)
            prof = cProfile.Profile()
            torch.cuda.synchronize()
            prof.enable()
            for _ in range(CALLS):
                fn(*call_args)
            prof.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats(args.sort).print_stats(args.top)
            print(f"== {impl} {variant} N={n}: {us:.1f} us of host time per call", flush=True)
            print("\n".join(text.getvalue().splitlines()[6:]), flush=True)
            records.append(dict(gpu=torch.cuda.get_device_name(), versions=versions(), impl=impl,
                                variant=variant, N=n, B=B, H=H, D=D, K=K, dtype="bf16",
                                host_us_per_call=us, profile=text.getvalue()))
    Path(args.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()

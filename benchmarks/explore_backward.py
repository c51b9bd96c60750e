"""Per-kernel view of the Triton backward on the benchmark shape: each config's
backward alone (the gradient kernels and their host glue) and the torch profiler's
kernel times for the default.  For choosing defaults; not a benchmark row.

    python benchmarks/explore_backward.py [N] [out.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_triton import make_sets, time_ms  # noqa: E402

from gmagen.backends.triton.backward import gma_backward, gma_backward_causal  # noqa: E402
import gmagen.torch as gt  # noqa: E402


def main() -> None:
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    out = sys.argv[2] if len(sys.argv) > 2 else "explore_backward.json"
    B, H, D, K = 4, 16, 64, 64
    sets = [s + (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16),)
            for s in make_sets(B, N, H, D, K, torch.bfloat16, 2)]
    rows = []
    for causal in (False, True):
        states = [gt.gma(*s[:6], causal=causal, backend="triton", return_state=True)[1]
                  for s in sets]
        fwd = time_ms(lambda *a: gt.gma(*a[:6], causal=causal, backend="triton"), sets)
        rows.append(dict(causal=causal, what="forward", ms=fwd))
        print(rows[-1], flush=True)
        for bn in (16, 32, 64):
            for warps in (4, 8):
                cfg = {"block_n": bn, "num_warps": warps}
                if causal:
                    def call(*a, cfg=cfg):
                        return gma_backward_causal(*a[:6], None, None, a[6], (None, None),
                                                   config=cfg)
                else:
                    def call(*a, cfg=cfg):
                        i = next(j for j, s in enumerate(sets) if s[0] is a[0])
                        return gma_backward(*a[:6], None, states[i], a[6], (None, None),
                                            config=cfg)
                try:
                    ms = time_ms(call, sets)
                except Exception as exc:  # a config that does not fit: record why
                    ms, err = None, str(exc)[:200]
                else:
                    err = None
                rows.append(dict(causal=causal, what="backward", **cfg, ms=ms, error=err))
                print(rows[-1], flush=True)
        # per-kernel times of the default backward
        from torch.profiler import ProfilerActivity, profile
        s = sets[0]
        leaves = [t.detach().requires_grad_() for t in s[:6]]
        for _ in range(2):
            gt.gma(*leaves, causal=causal, backend="triton").backward(s[6])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                gt.gma(*leaves, causal=causal, backend="triton").backward(s[6])
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        print(table, flush=True)
        rows.append(dict(causal=causal, what="profile", table=table))
    Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

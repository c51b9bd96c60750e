"""Explore CuPy register-fragment (mma=2) tile configs at the benchmark shape on one GPU.

Times the bidirectional forward (write + reduce + read) with one kernel's config
changed at a time, and the causal forward (segment memories + scan) over the
number of segments per (b, h) and the scan's tile (the causal rows at N = 1024 and
4096 are where CuPy is furthest from Triton: 1.72x and 1.38x at 87b8e62), as
METHOD.md says: CUDA events, warm-up, median of repeats, two input sets rotated
(each larger than L2 at the benchmark's large N).  Prints one line per config and
writes the records (JSON) to the path given.

    python benchmarks/explore_cupy.py 65536 out.json [--causal]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_triton import capture_graph  # noqa: E402

import gmagen  # noqa: E402

B, H, D, DV, K = 4, 16, 64, 64, 64
GRAPH_STEPS = 20
CONFIGS = {
    # segments: the tuner's pick on an H100 at every N was 128 threads and 8 segments per
    # (b, h) (the heuristic: 8 blocks per SM, 17 at B*H=64); which of the two matters
    "gma_write": [dict(num_threads=256, block_n=64), dict(num_threads=128, block_n=32),
                  dict(num_threads=128, block_n=64), dict(num_threads=256, block_n=32),
                  dict(num_threads=256, block_n=64, segments=8),
                  dict(num_threads=256, block_n=64, segments=4),
                  dict(num_threads=128, block_n=64, segments=8),
                  dict(num_threads=128, block_n=64, segments=4),
                  dict(num_threads=128, block_n=32, segments=8)],
    "gma_read": [dict(num_threads=128, block_n=64), dict(num_threads=64, block_n=32),
                 dict(num_threads=128, block_n=128), dict(num_threads=64, block_n=64),
                 dict(num_threads=256, block_n=256)],
}
# the causal plan: one config (the scan's; its segment memories take the write
# kernel's default); segments 0 = the heuristic (8 blocks per SM over B*H*Dv-blocks)
CAUSAL_CONFIGS = [dict(segments=s) for s in (1, 2, 4, 8, 16, 32, 64)] + [
    dict(block_dv=32), dict(block_dv=32, segments=8), dict(block_dv=32, segments=16)]


def inputs(n: int, seed: int) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(seed)
    tok = [torch.randn(B, n, H, d, device="cuda", generator=g).bfloat16() for d in (D, D, DV)]
    mix = [torch.randn(H, K, D, device="cuda", generator=g) * 0.5,
           torch.randn(H, K, D, device="cuda", generator=g) * 0.1,
           torch.randn(H, K, device="cuda", generator=g) * 0.1]
    return (*tok, *mix)


def time_ms(fn, sets: list, reps: int = 15, graph_max_n: int = 16384) -> float:
    """Median ms per call.  Up to ``graph_max_n`` tokens the calls replay from a CUDA
    graph of GRAPH_STEPS calls (as bench_triton.py): at N = 1024 an eager call's host
    time (~0.2 ms) would hide the kernels' differences."""
    n = sets[0][0].shape[1]
    steps = GRAPH_STEPS if n <= graph_max_n else 1
    g = capture_graph(fn, sets, steps) if steps > 1 else None
    for s in sets:
        fn(*s)
    torch.cuda.synchronize()
    out = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        if g is not None:
            g.replay()
        else:
            fn(*sets[i % len(sets)])
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / steps)
    return statistics.median(out)


def explore(program, label: str, variations: list[tuple[str, dict, dict]], n: int,
            sets: list) -> list[dict]:
    """The default config of ``program``, then each variation (kernel name, the config
    passed to gmagen.compile, the change it makes): time and gap to the default's y."""
    ref = gmagen.compile(program, backend="cupy", autotune="off")
    y0 = ref(*sets[0]).float()
    base = time_ms(ref, sets)
    rows = [{"kernel": label, "config": str(ref.config), "ms": base, "N": n}]
    print(f"{label} {ref.config}: {base:.3f} ms", flush=True)
    for name, config, change in variations:
        try:
            kern = gmagen.compile(program, backend="cupy", config=config)
            y = kern(*sets[0]).float()
            gap = float((y - y0).norm() / y0.norm())
            ms = time_ms(kern, sets)
        except gmagen.errors.GMAError as exc:
            print(f"{name} {change}: {exc}", flush=True)
            continue
        rows.append({"kernel": name, "config": change, "ms": ms, "gap_vs_default": gap, "N": n})
        print(f"{name} {change}: {ms:.3f} ms (default {base:.3f}), gap {gap:.1e}", flush=True)
    return rows


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 65536
    sets = [inputs(n, 1), inputs(n, 2)]
    if "--causal" in sys.argv:  # one plan: the scan's config (its segment memories: defaults)
        rows = explore(gmagen.gma(causal=True), "causal default",
                       [("gma_scan", {**cfg, "mma": 2}, cfg) for cfg in CAUSAL_CONFIGS], n, sets)
    else:
        rows = explore(gmagen.gma(), "default",
                       [(name, {name: {**cfg, "mma": 2}}, cfg)
                        for name, configs in CONFIGS.items() for cfg in configs], n, sets)
    if len(args) > 1:
        json.dump(rows, open(args[1], "w"), indent=1)


if __name__ == "__main__":
    main()

"""A short, quiet program for Nsight Compute (``gpu_run.sh ncu``): one gmagen
forward at the benchmark shape, called twice (ncu's kernel filter,
--launch-skip and --launch-count pick the launches it profiles).  What
profile_kernels.py cannot say: why a kernel is slow (occupancy, memory or
issue bound, shared-memory bank conflicts).

    ncu ... python benchmarks/ncu_target.py --impl gmagen-cupy [--causal] [--n 65536]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_triton import make_sets  # noqa: E402

import gmagen  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impl", default="gmagen-cupy",
                    choices=("gmagen-triton", "gmagen-cupy", "gmagen-tvm"))
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--tvm-exports", default="", help="gmagen-tvm from these libraries")
    args = ap.parse_args()
    (s,) = make_sets(4, args.n, 16, 64, 64, torch.bfloat16, 1)
    if args.impl == "gmagen-tvm" and args.tvm_exports:
        kern = gmagen.load(str(Path(args.tvm_exports) / ("causal" if args.causal else "bidir")))
    else:
        kern = gmagen.compile(gmagen.gma(causal=args.causal),
                              backend=args.impl.removeprefix("gmagen-"),
                              **({"target": "cuda"} if args.impl == "gmagen-tvm" else {}))
    for _ in range(2):
        kern(*s)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

"""gmagen tune: tune a program's kernels for a grid of shapes on this GPU and
store the winners in the autotune cache (``gmagen.compile`` then finds them).

Each shape is "B,N,H,D,Dv,K"; the default grid is the benchmark's (B=4, H=16,
D=Dv=K=64, N = 1024 ... 65536).  The closing table gives, per shape and kernel,
the default and tuned times, the speed-up, the chosen config and how many
candidates were tried and rejected (a rejected candidate failed to compile or
gave a different output).  ``--export FILE`` writes this GPU's entries to a
cache file for shipping in autotune_cache/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gmagen.cases import DTYPES
from gmagen.errors import OptionError
from gmagen.ir.ops import COVARIANCES, NORMS
from gmagen.tune import DEFAULT_BUDGET_S

NAME = "tune"
HELP = "tune kernels for shapes on this GPU and cache the winners"
GRID = ["4,1024,16,64,64,64", "4,4096,16,64,64,64", "4,16384,16,64,64,64",
        "4,65536,16,64,64,64"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--causal", action="store_true", help="the causal program")
    parser.add_argument("--norm", choices=NORMS, default="row")
    parser.add_argument("--covariance", choices=COVARIANCES, default="diag")
    parser.add_argument("--backend", action="append", default=None,
                        help="backend to tune (repeatable; default triton)")
    parser.add_argument("--shape", action="append", default=None, metavar="B,N,H,D,Dv,K",
                        help="a shape to tune (repeatable; default: the benchmark grid)")
    parser.add_argument("--dtype", choices=[d for d in DTYPES if d != "f64"], default="bf16")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds per shape, its kernels' searches split evenly (default 30)")
    parser.add_argument("--strategy", default="auto", help="auto, exhaustive or random_local")
    parser.add_argument("--export", type=Path, default=None, metavar="FILE",
                        help="write this GPU's cache entries to FILE (for autotune_cache/)")


def parse_shape(text: str) -> dict[str, int]:
    parts = text.split(",")
    if len(parts) != 6 or not all(p.strip().isdigit() for p in parts):
        raise OptionError(f"--shape {text!r}: expected six integers B,N,H,D,Dv,K")
    return dict(zip(("B", "N", "H", "D", "Dv", "K"), (int(p) for p in parts)))


def run(args: argparse.Namespace) -> int:
    import gmagen
    from gmagen import autotune
    from gmagen.tune import tune

    from . import echo, print_table, steps

    shapes = [parse_shape(s) for s in (args.shape or GRID)]
    program = gmagen.gma(causal=args.causal, norm=args.norm, covariance=args.covariance)
    backends = args.backend or ["triton"]
    # one step per (backend, shape, kernel plan); the plans come from the lowering
    plans = {b: len(gmagen.compile(program, b, autotune="off").plan.kernels) for b in backends}
    rows = []
    with steps(sum(plans[b] * len(shapes) for b in backends), "gmagen tune") as bar:
        for backend in backends:
            def progress(row, backend=backend) -> None:
                r = row.result
                bar.advance(f"{backend} {row.kernel} N={row.shape['N']}: "
                            f"{r.default_time.median_ms:.3f} -> {r.best_time.median_ms:.3f} ms "
                            f"in {row.seconds:.1f} s ({r.decision})")
                bar.describe(f"tuning {backend}, about {args.budget:g} s per shape")

            bar.describe(f"tuning {backend}, about {args.budget:g} s per shape")
            rows += _tune_rows(tune(program, shapes, backend, dtype=args.dtype,
                                    strategy=args.strategy, budget_s=args.budget,
                                    progress=progress), backend)
    print_table("gmagen tune", ["backend", "B,N,H,D,Dv,K", "kernel", "default ms", "tuned ms",
                                "speed-up", "config", "tried/rejected", "s"], rows)
    if args.export is not None and rows:
        gpu = _gpu_name()
        count = autotune.default_cache().export(args.export, gpu)
        echo(f"exported {count} entries for {gpu} to {args.export}")
    return 0


def _tune_rows(tuned: list, backend: str) -> list[list[str]]:
    """The closing table's rows of one backend."""
    rows = []
    for row in tuned:
        r = row.result
        rows.append([backend, ",".join(str(row.shape[k]) for k in ("B", "N", "H", "D", "Dv", "K")),
                     row.kernel, f"{r.default_time.median_ms:.3f}",
                     f"{r.best_time.median_ms:.3f}", f"{row.speedup:.2f}x", str(r.best),
                     f"{r.tried}/{len(r.rejected)}", f"{row.seconds:.1f}"])
    return rows


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(torch.cuda.current_device())

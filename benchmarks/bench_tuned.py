"""The autotuner on one GPU (issue 8's checks and targets).

1. ``gmagen.tune`` on the forward benchmark grid (bf16, B=4, H=16, D=Dv=K=64,
   bidirectional and causal, each N): the tuning time per shape and what each
   kernel plan's search found.
2. The exhaustive strategy on a subset of rows, into a second cache: how far the
   budgeted search lands from the best of the whole pruned space.
3. Full calls timed with each config source, interleaved (CUDA events, warm-up,
   median, inputs rotated among sets larger than L2, as bench_triton.py):
   ``gmagen-triton-default`` (autotune="off"), ``-tuned`` (the cache of step 1)
   and ``-exhaustive`` (the cache of step 2).
4. Latencies: one cache lookup from a fresh cache object (the file read and
   checked), and ``gmagen.compile`` + first call in a fresh process, with
   Triton's kernel cache cold and warm.
5. ``--export``: the tuned entries of this GPU as a cache file to ship, less
   those of a row whose full call (step 3) ran slower with its tuned configs
   than with the defaults (``lost_in_full_calls``): a config that won its
   kernel-level race but lost the end-to-end one is not shipped.

    python benchmarks/bench_tuned.py --out tuned.json --export autotune_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_triton import (L2_BYTES, capture_graph, copy_bandwidth, make_sets,  # noqa: E402
                          versions)

import gmagen  # noqa: E402
from gmagen import autotune  # noqa: E402

B, H, D, K = 4, 16, 64, 64


def shape(N: int) -> dict:
    return {"B": B, "N": N, "H": H, "D": D, "Dv": D, "K": K}


def tune_rows(backend: str, causal: bool, N: int, strategy: str, budget: float) -> dict:
    """Tune one shape into the cache GMAGEN_CACHE_DIR points at; a record."""
    t0 = time.perf_counter()
    rows = gmagen.tune(gmagen.gma(causal=causal), [shape(N)], backend, dtype="bf16",
                       strategy=strategy, budget_s=budget)
    seconds = time.perf_counter() - t0
    plans = []
    for row in rows:
        r = row.result
        plans.append({"kernel": row.kernel, "default_ms": r.default_time.median_ms,
                      "best_ms": r.best_time.median_ms, "noise_ms": r.noise_ms,
                      "config": str(r.best), "default": str(r.default), "tried": r.tried,
                      "rejected": len(r.rejected), "complete": r.complete,
                      "strategy": r.strategy, "seconds": row.seconds, "decision": r.decision,
                      "search_s": r.elapsed_s, "phases": r.phases,
                      "key": str(row.key)})
        print(f"  {backend} {strategy} {row.kernel} N={N}: {r.default_time.median_ms:.4f} -> "
              f"{r.best_time.median_ms:.4f} ms, {r.tried} tried, {len(r.rejected)} rejected, "
              f"complete={r.complete}, {row.seconds:.1f} s ("
              + ", ".join(f"{k} {v:.1f}" for k, v in r.phases.items()) + ")", flush=True)
    return {"tune_s": seconds, "plans": plans, "keys": [row.key for row in rows]}


def time_interleaved(fns: dict, sets: list, warmup: int = 3, reps: int = 20) -> dict:
    """Median ms of one call per name; the calls alternate, so that clock and
    thermal drift touch every name alike."""
    for fn in fns.values():
        for i in range(warmup):
            fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    times: dict = {name: [] for name in fns}
    for i in range(reps):
        args = sets[i % len(sets)]
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}


GRAPH_STEPS = 20


def compiled(backend: str, causal: bool, mode: str, cache_dir: Path, args: tuple):
    """A kernel whose configs come from ``cache_dir``: they are looked up at the
    first call of a specialization, which is made here."""
    os.environ["GMAGEN_CACHE_DIR"] = str(cache_dir)
    # tvm's default target is llvm: its configs are tuned for (and timed on) cuda
    options = {"target": "cuda"} if backend == "tvm" else {}
    kern = gmagen.compile(gmagen.gma(causal=causal), backend=backend, autotune=mode, **options)
    kern(*args)
    return kern


def lookup_ms(cache_dir: Path, keys: list, repeats: int = 20) -> dict:
    """One ``get`` from a fresh AutotuneCache (file read, parsed and checked)."""
    samples, hits = [], 0
    for i in range(repeats):
        t0 = time.perf_counter()
        hit = autotune.AutotuneCache(cache_dir).get(keys[i % len(keys)])
        samples.append((time.perf_counter() - t0) * 1e3)
        hits += hit is not None
    return {"median_ms": statistics.median(samples), "max_ms": max(samples), "hits": hits,
            "lookups": repeats}


FRESH = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, gmagen
t1 = time.perf_counter()
causal = sys.argv[1] == "causal"
x = [torch.randn(4, int(sys.argv[2]), 16, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
mix = [torch.randn(16, 64, 64, device="cuda") * .5, torch.randn(16, 64, 64, device="cuda") * .1,
       torch.randn(16, 64, device="cuda") * .1]
torch.cuda.synchronize()
t2 = time.perf_counter()
kern = gmagen.compile(gmagen.gma(causal=causal), backend="triton")
t3 = time.perf_counter()
kern(*x, *mix)
torch.cuda.synchronize()
t4 = time.perf_counter()
kern(*x, *mix)
torch.cuda.synchronize()
t5 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "compile_s": t3 - t2, "first_call_s": t4 - t3,
                  "second_call_s": t5 - t4, "config": str(kern.config)}))
"""


def fresh_process(causal: bool, N: int, cache_dir: Path, triton_cache: Path) -> dict:
    env = dict(os.environ, GMAGEN_CACHE_DIR=str(cache_dir), TRITON_CACHE_DIR=str(triton_cache))
    out = subprocess.run([sys.executable, "-c", FRESH, "causal" if causal else "bidir", str(N)],
                         env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return {"error": out.stderr[-500:]}
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec["compile_and_first_call_s"] = rec["compile_s"] + rec["first_call_s"]
    return rec


FULL_CALL_TOLERANCE = 0.03  # a tuned row may be this much slower in full calls (their noise)


def lost_in_full_calls(records: list, tolerance: float = FULL_CALL_TOLERANCE) -> dict[str, str]:
    """{cache key: why} for the tuned entries of every (backend, variant, N) whose
    full call timed ``-tuned`` above ``-default`` by more than ``tolerance``; only
    entries whose config differs from the default (the others are the default)."""
    bench = {(r["impl"], r["variant"], r["N"]): r["ms"] for r in records if r.get("kind") == "bench"}
    lost = {}
    for r in records:
        if r.get("kind") != "tune" or r.get("strategy") != "auto" or "plans" not in r:
            continue
        tuned = bench.get((f"gmagen-{r['backend']}-tuned", r["variant"], r["N"]))
        default = bench.get((f"gmagen-{r['backend']}-default", r["variant"], r["N"]))
        if tuned is None or default is None or tuned <= default * (1 + tolerance):
            continue
        for plan in r["plans"]:
            if plan["config"] != plan["default"]:
                lost[plan["key"]] = (f"{r['backend']} {r['variant']} N={r['N']}: full call "
                                     f"{tuned:.4f} ms tuned vs {default:.4f} ms default")
    return lost


def drop_entries(path: Path, keys: dict[str, str]) -> None:
    """Remove ``keys`` from the cache file at ``path`` (written by export), saying why."""
    data = json.loads(path.read_text())
    dropped = [key for key in keys if data["entries"].pop(key, None) is not None]
    for key in dropped:
        print(f"not shipped ({keys[key]}): {key}", flush=True)
    if dropped:
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--export", default="")
    ap.add_argument("--work", default="", help="cache directories (default: a temp dir)")
    ap.add_argument("--backends", default="triton", help="comma-separated GPU backends")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--budget", type=float, default=20.0,
                    help="seconds per shape, split over its kernel plans (gmagen.tune)")
    ap.add_argument("--exhaustive", nargs="*", default=["bidirectional:16384"],
                    metavar="VARIANT:N", help="rows that also get an exhaustive search")
    ap.add_argument("--exhaustive-budget", type=float, default=480.0, help="seconds per shape")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes compiling tuning candidates at once (GMAGEN_TUNE_WORKERS; "
                         "0: serially; default: min(16, CPUs - 1))")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--graph-max-n", type=int, default=16384)
    ap.add_argument("--steps", default="tune,exhaustive,bench,latency",
                    help="which of tune, exhaustive, bench, latency to run; the caches live "
                         "under --work, so that a later call can take up where one stopped")
    args = ap.parse_args()
    steps = set(args.steps.split(","))
    if args.workers is not None:
        os.environ["GMAGEN_TUNE_WORKERS"] = str(args.workers)
    from gmagen.autotune.torch_runner import default_workers, keep_workers
    workers = default_workers()

    work = Path(args.work or tempfile.mkdtemp(prefix="gmagen-tuned-"))
    tuned_dir, exh_dir = work / "cache-tuned", work / "cache-exhaustive"
    gpu = torch.cuda.get_device_name()
    records: list = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else []

    def flush() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=1))

    bw = copy_bandwidth()
    # the fields of bench_triton.py's records, so that the rows merge into <gpu>.json
    base = {"gpu": gpu, "versions": versions(), "copy_bandwidth_Bps": bw,
            "B": B, "H": H, "D": D, "Dv": D, "K": K, "dtype": "bf16"}
    backends = args.backends.split(",")
    grid = [(causal, N) for causal in (False, True) for N in args.lengths]
    exhaustive = {(v.split(":")[0] == "causal", int(v.split(":")[1])) for v in args.exhaustive}
    # one pool of compile workers for the whole grid (as gmagen.tune keeps it for its
    # shapes): started per shape, its start-up (~6 s on the H100 machine) took most of a
    # short budget, so that the first kernel plan of each shape timed 1-2 configs
    with keep_workers():
        for backend in (backends if "tune" in steps else []):  # 1: the budgeted search
            for causal, N in grid:
                variant = "causal" if causal else "bidirectional"
                os.environ["GMAGEN_CACHE_DIR"] = str(tuned_dir)
                try:
                    rec = tune_rows(backend, causal, N, "auto", args.budget)
                except Exception as exc:  # noqa: BLE001 - recorded; the other rows go on
                    rec = {"error": f"{type(exc).__name__}: {exc}"[:500], "keys": []}
                    print(f"tuning {backend} {variant} N={N} failed: {rec['error']}", flush=True)
                rec.pop("keys")
                records.append(dict(base, kind="tune", backend=backend, variant=variant, N=N,
                                    strategy="auto", budget_per_shape_s=args.budget, workers=workers, **rec))
                print(f"tuned {backend} {variant} N={N} in {rec.get('tune_s', 0):.1f} s", flush=True)
                flush()
    for causal, N in (sorted(exhaustive) if "exhaustive" in steps else []):  # 2: all of it
        variant = "causal" if causal else "bidirectional"
        os.environ["GMAGEN_CACHE_DIR"] = str(exh_dir)
        rec = tune_rows("triton", causal, N, "exhaustive", args.exhaustive_budget)
        rec.pop("keys")
        records.append(dict(base, kind="tune", backend="triton", variant=variant, N=N,
                            strategy="exhaustive", budget_per_shape_s=args.exhaustive_budget,
                            workers=workers, **rec))
        flush()
    exhaustive_done = exh_dir.is_dir() and any(exh_dir.rglob("*.json"))
    for causal, N in (grid if "bench" in steps else []):  # 3: full calls, interleaved
        variant = "causal" if causal else "bidirectional"
        n_sets = max(1, min(4, -(-2 * L2_BYTES // (3 * B * N * H * D * 2))))
        sets = make_sets(B, N, H, D, K, torch.bfloat16, n_sets)
        kernels = {}
        for backend in backends:
            kernels[f"gmagen-{backend}-default"] = compiled(backend, causal, "off", tuned_dir,
                                                            sets[0])
            kernels[f"gmagen-{backend}-tuned"] = compiled(backend, causal, "cached", tuned_dir,
                                                          sets[0])
        if (causal, N) in exhaustive and exhaustive_done:
            kernels["gmagen-triton-exhaustive"] = compiled("triton", causal, "cached", exh_dir,
                                                           sets[0])
        fns = {name: (lambda *a, k=kern: k(*a)) for name, kern in kernels.items()}
        timing = "launch"
        if N <= args.graph_max_n:  # as bench_triton.py: graph replays, launch overhead out
            graphs = {name: capture_graph(fn, sets, GRAPH_STEPS) for name, fn in fns.items()}
            ms = {name: t / GRAPH_STEPS for name, t in time_interleaved(
                {name: g.replay for name, g in graphs.items()}, [()], reps=args.reps).items()}
            timing = f"graph of {GRAPH_STEPS} calls"
            del graphs
        else:
            ms = time_interleaved(fns, sets, reps=args.reps)
        io_bytes = 4 * B * N * H * D * 2
        for name, kern in kernels.items():
            records.append(dict(base, kind="bench", impl=name, variant=variant, N=N, ms=ms[name],
                                timing=timing,
                                floor_ms=io_bytes / bw * 1e3, input_bytes=3 * B * N * H * D * 2,
                                config=str(kern.config)))
            print(f"{name:26s} {variant:13s} N={N:6d} {ms[name]:.4f} ms  {kern.config}",
                  flush=True)
        del sets
        torch.cuda.empty_cache()
        flush()
    if "latency" in steps:  # 4: latencies, over the keys the tuned cache holds
        os.environ["GMAGEN_CACHE_DIR"] = str(tuned_dir)
        user_dir = autotune.cache.default_directory()   # <GMAGEN_CACHE_DIR>/autotune
        held = autotune.AutotuneCache(user_dir).entries(gpu)   # user, then shipped
        keys = list(dict.fromkeys(k for source in held.values() for k in source))
        if keys:
            records.append(dict(base, kind="cache_lookup", **lookup_ms(user_dir, keys)))
            print(f"cache lookup: {records[-1]}", flush=True)
        else:
            print(f"cache lookup: no entries under {user_dir}", flush=True)
    triton_cache = Path(tempfile.mkdtemp(prefix="triton-cache-"))  # empty: "cold" first
    for causal in ((False, True) if "latency" in steps else ()):
        for state in ("cold", "warm"):  # the same Triton cache directory, twice
            rec = fresh_process(causal, 4096, tuned_dir, triton_cache)
            records.append(dict(base, kind="fresh_compile", variant="causal" if causal else
                                "bidirectional", N=4096, triton_cache=state, **rec))
            print(f"fresh process {state} causal={causal}: {rec}", flush=True)
    flush()
    if args.export:  # 5
        os.environ["GMAGEN_CACHE_DIR"] = str(tuned_dir)
        count = autotune.default_cache().export(Path(args.export), gpu)
        lost = lost_in_full_calls(records)
        drop_entries(Path(args.export), lost)
        print(f"exported {count - len(lost)} entries for {gpu} to {args.export}", flush=True)


if __name__ == "__main__":
    main()

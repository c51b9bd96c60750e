"""GMA forward benchmark on one GPU: gmagen triton vs SDPA flash vs eager / compiled
PyTorch GMA vs the bandwidth floor; plus decoding (one token per step).

Timing as the device tool's METHOD.md says: CUDA events, warm-up, median of
repeats, inputs rotated among sets larger than L2, the floor from a measured
device-to-device copy.  Writes a list of records (JSON) to --out.

    python benchmarks/bench_triton.py --out benchmarks/results/h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eager_gma import eager_gma, eager_gma_decode_step  # noqa: E402

import gmagen  # noqa: E402

L2_BYTES = 50 * 2 ** 20


def versions() -> dict:
    import triton

    # GMAGEN_COMMIT first: the GPU machine gets a copy of the working tree whose git
    # metadata may be older than the code it runs (scripts/gpu_run.sh explains)
    commit = os.environ.get("GMAGEN_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            pass
    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "gmagen": gmagen.__version__, "commit": commit,
            "python": sys.version.split()[0]}


def time_ms(fn, sets: list, warmup: int = 3, reps: int = 10, max_s: float = 20.0) -> float:
    """Median over ``reps`` of one call, events around it, rotating input sets."""
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    t_start = time.time()
    for i in range(reps):
        args = sets[i % len(sets)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if time.time() - t_start > max_s and len(times) >= 3:
            break
    return statistics.median(times)


def extra_bytes(fn, args: tuple, out_bytes: int) -> int:
    """Peak allocated during one call, minus what was allocated before (inputs) and
    the output itself."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(*args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0, peak - before - out_bytes)


def copy_bandwidth() -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    src = torch.randn(2 ** 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), [()], warmup=3, reps=20)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def make_sets(B, N, H, D, K, dtype, n_sets):
    sets = []
    for _ in range(n_sets):
        q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=dtype) for _ in range(3))
        mean = torch.randn(H, K, D, device="cuda") * 0.5
        log_var = torch.randn(H, K, D, device="cuda") * 0.1
        logit = torch.randn(H, K, device="cuda") * 0.1
        sets.append((q, k, v, mean, log_var, logit))
    return sets


def tvm_configs(args) -> dict[str, dict[str, int]]:
    """{name: TVM config} of the gmagen-tvm-<name> impls: "vector" (vector=1) and
    each --tvm-config NAME=KNOB:V,KNOB:V (an A/B of knobs the defaults lack)."""
    out = {"vector": {"vector": 1}}
    for spec in args.tvm_config:
        name, _, knobs = spec.partition("=")
        out[name] = {k: int(v) for k, v in (p.split(":") for p in knobs.split(",") if p)}
    return out


def bench_forward(args, bw: float, records: list, base: dict) -> None:
    B, H, D, K = 4, 16, 64, 64
    dtype = torch.bfloat16
    impls = args.impls.split(",")
    for N in args.lengths:
        io_bytes = 4 * B * N * H * D * 2  # q, k, v read and y written once
        n_sets = max(1, min(4, math.ceil(2 * L2_BYTES / (3 * B * N * H * D * 2))))
        sets = make_sets(B, N, H, D, K, dtype, n_sets)
        for causal in (False, True):
            variant = "causal" if causal else "bidirectional"
            row = dict(base, variant=variant, N=N, B=B, H=H, D=D, Dv=D, K=K, dtype="bf16",
                       floor_ms=io_bytes / bw * 1e3, input_bytes=3 * B * N * H * D * 2)
            kern = gmagen.compile(gmagen.gma(causal=causal), backend="triton")
            fast = gmagen.compile(gmagen.gma(causal=causal), backend="triton", precision="tf32")
            kernels = {"gmagen-triton": kern, "gmagen-triton-tf32": fast}
            if "gmagen-cupy" in impls:  # compiled only when asked: NVRTC takes a while
                try:
                    kernels["gmagen-cupy"] = gmagen.compile(gmagen.gma(causal=causal),
                                                            backend="cupy")
                except gmagen.errors.GMAError as exc:  # e.g. cupy not installed: say so
                    print(f"  gmagen-cupy: {exc}", flush=True)
            if "gmagen-tvm" in impls:
                try:
                    kernels["gmagen-tvm"] = tvm_kernel(args, causal)
                except (gmagen.errors.GMAError, ImportError, OSError) as exc:
                    print(f"  gmagen-tvm: {exc}", flush=True)
            for name, config in tvm_configs(args).items():
                # TVM with config knobs of its own (--tvm-config), built in-process only
                impl = f"gmagen-tvm-{name}"
                if impl not in impls or args.tvm_exports:
                    continue
                try:
                    kernels[impl] = gmagen.compile(gmagen.gma(causal=causal), backend="tvm",
                                                   target="cuda", config=config)
                except (gmagen.errors.GMAError, ImportError, OSError) as exc:
                    print(f"  {impl}: {exc}", flush=True)
            candidates = {
                "gmagen-triton": lambda q, k, v, m, lv, lg: kern(q, k, v, m, lv, lg),
                "gmagen-triton-tf32": lambda q, k, v, m, lv, lg: fast(q, k, v, m, lv, lg),
                "gmagen-cupy": lambda q, k, v, m, lv, lg: kernels["gmagen-cupy"](q, k, v, m, lv, lg),
                "gmagen-tvm": lambda q, k, v, m, lv, lg: kernels["gmagen-tvm"](q, k, v, m, lv, lg),
                **{impl: (lambda *a, impl=impl: kernels[impl](*a))
                   for impl in (f"gmagen-tvm-{name}" for name in tvm_configs(args))},
                "sdpa-flash": lambda q, k, v, *_: _sdpa(q, k, v, causal),
                "eager-gma": lambda *a: eager_gma(*a, causal=causal),
                "compiled-gma": _compiled(causal),
            }
            for impl in impls:
                if impl not in candidates or (impl.startswith("gmagen") and impl not in kernels):
                    continue
                if impl == "sdpa-flash" and N > args.sdpa_max_n:
                    continue
                fn = candidates[impl]
                # SDPA takes [B, H, N, D]; transposing views costs nothing
                call_sets = ([tuple(x.transpose(1, 2) for x in s[:3]) + s[3:] for s in sets]
                             if impl == "sdpa-flash" else sets)
                try:
                    ms_launch = time_ms(fn, call_sets, reps=args.reps)
                    ms_graph = None
                    if N <= args.graph_max_n:  # small problems: time graph replays (METHOD.md)
                        try:
                            ms_graph = _graph_ms(fn, call_sets)
                        except Exception as exc:  # noqa: BLE001 - recorded, launch time stands
                            print(f"  {impl}: no graph timing ({str(exc)[:80]})")
                    extra = extra_bytes(fn, call_sets[0], B * N * H * D * 2)
                    rec = dict(row, impl=impl, ms=ms_graph if ms_graph is not None else ms_launch,
                               ms_launch=ms_launch, ms_graph=ms_graph, extra_bytes=extra,
                               config=str(getattr(kernels[impl], "config", "")) if impl in kernels else "")
                except torch.OutOfMemoryError as exc:
                    rec = dict(row, impl=impl, ms=None, extra_bytes=None, error=f"OOM: {exc}"[:200])
                    torch.cuda.empty_cache()
                records.append(rec)
                print(f"{impl:18s} {variant:13s} N={N:6d} ms={rec['ms'] if rec['ms'] is None else round(rec['ms'], 4)}"
                      f" launch={rec.get('ms_launch')} floor={row['floor_ms']:.4f} extra={rec['extra_bytes']}",
                      flush=True)
                _flush(args.out, records)
            records.append(dict(row, impl="floor", ms=row["floor_ms"], extra_bytes=0))
        del sets
        torch.cuda.empty_cache()


TVM_SPEC = {"D": 64, "Dv": 64, "K": 64, "dtype": "bf16"}  # the benchmark shape


def export_tvm(path: str, arch: str) -> None:
    """One library per program (bidir/, causal/) of the benchmark's specialization."""
    for causal in (False, True):
        kern = gmagen.compile(gmagen.gma(causal=causal), backend="tvm",
                              target={"kind": "cuda", "arch": arch})
        out = kern.export(str(Path(path) / ("causal" if causal else "bidir")), TVM_SPEC)
        print(f"exported {out}", flush=True)


def tvm_kernel(args, causal: bool):
    """The gmagen-tvm kernel: exported libraries (--tvm-exports) or an in-process build."""
    if args.tvm_exports:
        return gmagen.load(str(Path(args.tvm_exports) / ("causal" if causal else "bidir")))
    return gmagen.compile(gmagen.gma(causal=causal), backend="tvm", target="cuda")


def _sdpa(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


_COMPILED: dict = {}


def _compiled(causal: bool):
    if causal not in _COMPILED:
        _COMPILED[causal] = torch.compile(lambda *a: eager_gma(*a, causal=causal))
    return _COMPILED[causal]


def bench_decode(args, bw: float, records: list, base: dict) -> None:
    """One new token per step against the state (gmagen) or a KV cache (SDPA)."""
    H, D, K = 16, 64, 64
    dtype = torch.bfloat16
    for B in args.decode_batches:
        q, k, v = (torch.randn(B, 1, H, D, device="cuda", dtype=dtype) for _ in range(3))
        mean = torch.randn(H, K, D, device="cuda") * 0.5
        log_var = torch.randn(H, K, D, device="cuda") * 0.1
        logit = torch.randn(H, K, device="cuda") * 0.1
        state = (torch.randn(B, H, K, D, device="cuda").abs(), torch.rand(B, H, K, device="cuda") * 100)
        kern = gmagen.compile(gmagen.gma(causal=True), backend="triton")
        state_bytes = 2 * B * H * (K * D + K) * 4  # read and write the float32 state
        row = dict(base, variant="decode", B=B, H=H, D=D, Dv=D, K=K, dtype="bf16",
                   input_bytes=3 * B * H * D * 2)

        def step():
            return kern(q, k, v, mean, log_var, logit, initial_state=state, return_state=True)

        ms_eager = time_ms(step, [()], warmup=10, reps=200)
        ms_graph = _graph_ms(step)
        for L in args.decode_contexts:
            records.append(dict(row, impl="gmagen-triton", N=L, ms=ms_graph, ms_eager_launch=ms_eager,
                                bytes_read=state_bytes // 2, floor_ms=state_bytes / bw * 1e3,
                                extra_bytes=None))
        eager_step = lambda: eager_gma_decode_step(q, k, v, mean, log_var, logit, state)  # noqa: E731
        ms_e = time_ms(eager_step, [()], warmup=5, reps=100)
        ms_eg = _graph_ms(eager_step)
        for L in args.decode_contexts:
            records.append(dict(row, impl="eager-gma", N=L, ms=ms_e, ms_graph=ms_eg,
                                bytes_read=state_bytes // 2, floor_ms=state_bytes / bw * 1e3,
                                extra_bytes=None))
        print(f"decode B={B}: gmagen {ms_graph * 1e3:.1f} us (graph), {ms_eager * 1e3:.1f} us "
              f"(eager launch); eager torch {ms_e * 1e3:.1f} us, graph {ms_eg * 1e3:.1f} us", flush=True)
        for L in args.decode_contexts:
            kc = torch.randn(B, H, L, D, device="cuda", dtype=dtype)
            vc = torch.randn(B, H, L, D, device="cuda", dtype=dtype)
            qd = q.transpose(1, 2)
            sdpa = lambda: _sdpa(qd, kc, vc, False)  # noqa: E731
            kv_bytes = 2 * B * H * L * D * 2
            try:
                ms = _graph_ms(sdpa)
            except Exception:  # noqa: BLE001 - graphs are optional for this baseline
                ms = time_ms(sdpa, [()], warmup=5, reps=50)
            records.append(dict(row, impl="sdpa-flash", N=L, ms=ms, bytes_read=kv_bytes,
                                floor_ms=kv_bytes / bw * 1e3, extra_bytes=None))
            print(f"decode B={B} L={L}: sdpa {ms * 1e3:.1f} us ({kv_bytes / 1e9:.2f} GB)", flush=True)
            del kc, vc
        _flush(args.out, records)


def _graph_ms(fn, sets: list | None = None, steps: int = 20) -> float:
    """Per-call time of ``steps`` calls (rotating over input ``sets``) captured in one
    CUDA graph: median of replays over the call count."""
    g = capture_graph(fn, sets or [()], steps)
    return time_ms(lambda: g.replay(), [()], warmup=3, reps=20) / steps


def capture_graph(fn, sets: list, steps: int = 20):
    """``steps`` calls of ``fn`` (inputs rotating over ``sets``) in one CUDA graph,
    after a warm-up on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(*sets[i % len(sets)])
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(steps):
            fn(*sets[i % len(sets)])
    return g


def _flush(path: str, records: list) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(records, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--impls", default="gmagen-triton,gmagen-triton-tf32,gmagen-cupy,gmagen-tvm,"
                                       "sdpa-flash,"
                                       "eager-gma,compiled-gma")
    ap.add_argument("--graph-max-n", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--sdpa-max-n", type=int, default=65536)
    ap.add_argument("--decode-batches", type=int, nargs="*", default=[1, 16, 64])
    ap.add_argument("--decode-contexts", type=int, nargs="*", default=[4096, 65536])
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--tvm-exports", default="",
                    help="gmagen-tvm rows from libraries under this directory (gmagen.load), "
                         "for a GPU machine with TVM's runtime only; else compiled in process")
    ap.add_argument("--export-tvm", default="", metavar="DIR",
                    help="no benchmark: export the gmagen-tvm libraries of the benchmark "
                         "shape to DIR (a CPU machine with TVM and nvcc) and exit")
    ap.add_argument("--tvm-arch", default="sm_90")
    ap.add_argument("--tvm-config", action="append", default=[], metavar="NAME=KNOB:V,...",
                    help="an impl gmagen-tvm-NAME built with these cuda config knobs (list it "
                         "in --impls); gmagen-tvm-vector is vector:1 unless given")
    args = ap.parse_args()
    if args.export_tvm:
        export_tvm(args.export_tvm, args.tvm_arch)
        return
    torch.manual_seed(0)
    bw = copy_bandwidth()
    base = {"gpu": torch.cuda.get_device_name(), "versions": versions(),
            "copy_bandwidth_Bps": bw}
    print(f"{base['gpu']}: copy bandwidth {bw / 1e12:.2f} TB/s; {base['versions']}", flush=True)
    records: list = []
    if not args.no_decode:  # first: short, and a time-out later must not lose it
        bench_decode(args, bw, records, base)
    if args.lengths:
        bench_forward(args, bw, records, base)
    _flush(args.out, records)


if __name__ == "__main__":
    main()

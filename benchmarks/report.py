"""Markdown table and plots from benchmarks/results/<gpu>.json (forward, decode) or
<gpu>_training.json (forward + backward, variants "<v>-fwdbwd").

    python benchmarks/report.py benchmarks/results/h100.json
writes <stem>.md, <stem>_time.png and <stem>_memory.png beside the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

IMPLS = ["gmagen-triton", "gmagen-triton-tf32", "gmagen-triton-default", "gmagen-triton-tuned",
         "gmagen-triton-exhaustive", "gmagen-cupy", "gmagen-cupy-default", "gmagen-cupy-tuned",
         "gmagen-tvm", "gmagen-tvm-default", "gmagen-tvm-tuned", "gmagen-tvm-vector",
         "sdpa-flash", "eager-gma",
         "compiled-gma", "floor"]


def variants(records: list[dict]) -> list[str]:
    """The token-sequence variants present, forward before forward + backward."""
    order = ("bidirectional", "causal", "bidirectional-fwdbwd", "causal-fwdbwd")
    return [v for v in order if any(r["variant"] == v for r in records)]


def table(records: list[dict]) -> str:
    r0 = records[0]
    v = r0["versions"]
    training = any(r["variant"].endswith("-fwdbwd") for r in records)
    timing = ("forward + backward with a fixed cotangent, fresh leaves per call; median of "
              "CUDA-event timings including launch overhead; extra memory: peak during the "
              "call minus inputs and the returned gradients" if training else
              "median of CUDA-event timings; N <= 16384 as CUDA-graph replays, launch "
              "overhead excluded, for every implementation alike")
    commits = sorted({r["versions"]["commit"] for r in records if r.get("versions")})
    lines = [f"GPU: {r0['gpu']}; CUDA {v['cuda']}, PyTorch {v['torch']}, Triton {v['triton']}, "
             f"gmagen {v['gmagen']} (commit{'s' if len(commits) > 1 else ''} "
             f"{', '.join(commits)}; each row's is in the JSON); copy bandwidth "
             f"{r0['copy_bandwidth_Bps'] / 1e12:.2f} TB/s. B=4, H=16, D=Dv=K=64, bfloat16, bnhd. "
             f"Time in ms ({timing}); extra memory in MB.", ""]
    for variant in variants(records):
        rows = [r for r in records if r["variant"] == variant]
        ns = sorted({r["N"] for r in rows})
        lines.append(f"**{variant}**\n")
        lines.append("| impl | " + " | ".join(f"N={n}" for n in ns) + " | extra MB at N=" + str(ns[-1]) + " |")
        lines.append("|---" * (len(ns) + 2) + "|")
        for impl in [i for i in IMPLS if any(r["impl"] == i for r in rows)]:
            cells = []
            for n in ns:
                hit = [r for r in rows if r["impl"] == impl and r["N"] == n]
                cells.append(f"{hit[0]['ms']:.3f}" if hit and hit[0].get("ms") is not None else "-")
            last = [r for r in rows if r["impl"] == impl and r["N"] == ns[-1]]
            extra = last[0].get("extra_bytes") if last else None
            lines.append(f"| {impl} | " + " | ".join(cells) + f" | {extra / 1e6:.1f} |" if extra is not None
                         else f"| {impl} | " + " | ".join(cells) + " | - |")
        lines.append("")
    dec = [r for r in records if r["variant"] == "decode"]
    if dec:
        lines.append("**decode** (one new token per step, H=16, D=Dv=K=64; microseconds per step, "
                     "CUDA-graph replay; gmagen and eager GMA do not depend on the context)\n")
        lines.append("| B | gmagen-triton | eager GMA | SDPA, 4096-token cache | SDPA, 65536-token cache |")
        lines.append("|---|---|---|---|---|")
        for b in sorted({r["B"] for r in dec}):
            def us(impl, n=None):
                hit = [r for r in dec if r["B"] == b and r["impl"] == impl and (n is None or r["N"] == n)]
                if not hit:
                    return "-"
                val = hit[0].get("ms_graph") if impl == "eager-gma" and hit[0].get("ms_graph") else hit[0]["ms"]
                return f"{val * 1e3:.1f}"
            lines.append(f"| {b} | {us('gmagen-triton')} | {us('eager-gma')} | {us('sdpa-flash', 4096)} | "
                         f"{us('sdpa-flash', 65536)} |")
    return "\n".join(lines) + "\n"


def plots(records: list[dict], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for what, key, ylabel in (("time", "ms", "time (ms)"), ("memory", "extra_bytes", "extra memory (bytes)")):
        names = variants(records)
        fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2))
        for ax, variant in zip(list(axes) if len(names) > 1 else [axes], names):
            for impl in IMPLS:
                pts = sorted((r["N"], r[key]) for r in records if r["variant"] == variant
                             and r["impl"] == impl and r.get(key))
                if pts and not (what == "memory" and impl == "floor"):
                    ax.plot(*zip(*pts), marker="o", label=impl, linestyle="--" if impl == "floor" else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{variant}, {records[0]['gpu']}")
            ax.grid(True, which="both", alpha=0.3)
        (axes[0] if len(names) > 1 else axes).legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{stem}_{what}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/h100.json")
    records = json.loads(path.read_text())
    stem = path.with_suffix("")
    Path(f"{stem}.md").write_text(table(records))
    plots([r for r in records if r["variant"] != "decode"], stem)
    print(Path(f"{stem}.md").read_text())


if __name__ == "__main__":
    main()

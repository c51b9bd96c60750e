"""Instructions per loop in the SASS of a TVM cuda kernel plan, on a machine
without a GPU: the plan's CUDA source (``backends.tvm.lower.cuda_source``) is
compiled by nvcc to a cubin, dumped by the cuobjdump that ships with Triton, and
every loop (a backward branch) is counted by opcode class.  This is how the
README's per-loop numbers (shared loads per FFMA and so on) were taken; the
GPU's own profile (ncu) is the measurement, this is the quick look before it.

    python scripts/sass_loops.py [--causal] [--kind write|read|scan|...]
        [--config vector=1,min_blocks=3] [--dtype bfloat16] [--arch sm_90]
        [--n-shape D=64,Dv=64,K=64]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

# opcode classes worth telling apart (the rest count as "other")
CLASSES = {
    "FFMA": "ffma", "FMUL": "fmul", "FADD": "fadd", "HMMA": "hmma",
    "LDS": "lds", "STS": "sts", "LDG": "ldg", "STG": "stg", "LDSM": "lds",
    "BAR": "bar", "MUFU": "mufu", "SHFL": "shfl", "LDL": "local", "STL": "local",
}
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[\w.]+)?\s*([^;]*);")
FUNC = re.compile(r"Function : (\S+)")


def sass(cubin: str) -> dict[str, list[tuple[int, str, str]]]:
    """{function: [(address, opcode, operands)]} of a cubin."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    text = subprocess.run([tool, "-sass", cubin], check=True, capture_output=True,
                          text=True).stdout
    out: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        m = FUNC.search(line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        m = LINE.search(line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(3), m.group(5)))
    return out


def loops(code: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(start, end) address ranges of the backward branches, innermost first."""
    spans = []
    for addr, op, args in code:
        if op == "BRA":
            target = re.search(r"0x([0-9a-f]+)", args)
            if target and int(target.group(1), 16) <= addr:
                spans.append((int(target.group(1), 16), addr))
    return sorted(set(spans), key=lambda s: s[1] - s[0])


def count(code, lo: int, hi: int) -> collections.Counter:
    c: collections.Counter = collections.Counter()
    for addr, op, _ in code:
        if lo <= addr <= hi:
            c[CLASSES.get(op, "other")] += 1
            c["total"] += 1
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--norm", default="")
    ap.add_argument("--cov", default="diag")
    ap.add_argument("--kind", default="", help="plan kind to show (default: all)")
    ap.add_argument("--config", default="", help="knob=value,... (TVM cuda knobs)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--shape", default="D=64,Dv=64,K=64")
    a = ap.parse_args()

    import gmagen
    from gmagen.backends.tvm.lower import cuda_source
    from gmagen.config import Config
    from gmagen.ir.passes.plan import plan_program

    dims = {k: int(v) for k, v in (p.split("=") for p in a.shape.split(","))}
    config = Config(**{k: int(v) for k, v in (p.split("=") for p in a.config.split(",") if p)})
    norm = a.norm or ("slot" if a.causal else "row")
    plan = plan_program(gmagen.gma(a.causal, norm, a.cov))
    cols = ["total", "ffma", "hmma", "lds", "sts", "ldg", "bar", "mufu", "shfl", "local",
            "other"]
    with tempfile.TemporaryDirectory() as tmp:
        for kp in plan.kernels:
            if a.kind and kp.kind != a.kind:
                continue
            src = cuda_source(kp, "bnhd", dims, frozenset(), config, a.arch, a.dtype)
            cu, cubin = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.cubin")
            with open(cu, "w") as f:
                f.write(src)
            subprocess.run(["nvcc", "-cubin", f"-arch={a.arch}", "-O3", "-w", "-o", cubin, cu],
                           check=True)
            for fn, code in sass(cubin).items():
                print(f"{kp.name} {fn}: {len(code)} instructions")
                print("  loop          " + " ".join(f"{c:>6}" for c in cols))
                for lo, hi in loops(code):
                    c = count(code, lo, hi)
                    print(f"  {lo:05x}-{hi:05x}   " + " ".join(f"{c[k]:>6}" for k in cols))


if __name__ == "__main__":
    main()

"""gmagen check: run every available backend over the check cases against the float64 oracle.

Each case draws fresh random inputs (GMA_SPEC distributions plus the hard
cases), rounds them to the case's dtype, runs the backend and compares y and
the (S, n) state with the oracle, and for small N with the independent N x N
form, by relative Frobenius norm.  Exit status 1 if any case fails or a backend
named with --backend cannot run here.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from gmagen import knobs
from gmagen.errors import UnknownBackend
from gmagen.cases import DTYPES, CaseResult, Target, backend_targets, cases_for, run_case

NAME = "check"
HELP = "check backends against the float64 oracle"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", action="extend", nargs="+", metavar="NAME", default=None,
                        help="backends to check (default: every available one); "
                             "an unavailable one named here is a failure")
    parser.add_argument("--dtype", action="extend", nargs="+", choices=DTYPES, default=None,
                        help="input dtypes (default: all a backend supports on its device)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases: every flag value and each hard case once per dtype")
    parser.add_argument("-k", dest="pattern", default="", metavar="TEXT",
                        help="only cases whose id contains TEXT")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the random inputs (default: GMAGEN_SEED, else fresh)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON only")


@dataclass
class CheckReport:
    seed: int
    quick: bool
    results: list[CaseResult] = field(default_factory=list)
    targets: dict[str, Target] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # name -> why it was not run
    missing: list[str] = field(default_factory=list)  # requested but not runnable here
    seconds: float = 0.0

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.missing

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "quick": self.quick, "passed": self.ok,
            "seconds": self.seconds,
            "backends": {name: {"framework": t.framework, "device": t.device,
                                "dtypes": list(t.dtypes), "note": t.note}
                         for name, t in self.targets.items()},
            "unavailable": self.unavailable, "missing": self.missing,
            "results": [r.to_json() for r in self.results],
        }


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    """Same inputs for a case on every backend of one run (and across runs with one seed)."""
    return np.random.default_rng([seed, zlib.crc32(case_id.encode())])


def run_check(backends: Optional[Sequence[str]] = None, dtypes: Optional[Sequence[str]] = None,
              quick: bool = False, seed: Optional[int] = None, pattern: str = "",
              on_backend: Optional[Callable[[str, Target, int], None]] = None) -> CheckReport:
    """Check ``backends`` (default: all registered that can run here). Never raises
    for a failing backend: failures are results."""
    from gmagen.backends.registry import BACKENDS

    if seed is None:
        seed = knobs.check_seed()
    if seed is None:
        seed = secrets.randbelow(2**31)
    report = CheckReport(seed, quick)
    names = list(dict.fromkeys(backends)) if backends else list(BACKENDS)
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:  # a typo fails before any work
        raise UnknownBackend(f"unknown backend {', '.join(map(repr, unknown))}; known "
                             f"backends: {', '.join(BACKENDS)}")
    start = time.perf_counter()
    for name in names:
        target, reason = backend_targets(name)
        if target is None:
            report.unavailable[name] = reason
            if backends:
                report.missing.append(name)
            continue
        report.targets[name] = target
        wanted = [d for d in target.dtypes if dtypes is None or d in dtypes]
        cases = [c for c in cases_for(wanted, quick) if pattern in c.id]
        if on_backend is not None:
            on_backend(name, target, len(cases))
        for case in cases:
            report.results.append(run_case(case, name, target.framework, target.device,
                                           case_rng(seed, case.id)))
    report.seconds = time.perf_counter() - start
    return report


def _fmt_error(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.2e}"


def print_report(report: CheckReport) -> None:
    from . import echo, print_table

    rows, styles = [], []
    for r in report.results:
        t = report.targets[r.backend]
        rows.append([r.backend, f"{t.framework}/{t.device}", r.case.id, _fmt_error(r.error),
                     f"{r.tol:.0e}", "pass" if r.passed else "FAIL", f"{r.seconds * 1e3:.1f}",
                     r.detail])
        styles.append("" if r.passed else "bold red")
    columns = ["backend", "arrays", "case", "error", "tol", "result", "ms", "detail"]
    if not report.failed:  # the detail column is empty when everything passed
        columns, rows = columns[:-1], [row[:-1] for row in rows]
    if rows:
        print_table(f"gmagen check (seed {report.seed}): worst relative error of y and "
                    f"state vs the float64 oracle", columns, rows, styles)
    if report.unavailable:
        echo("not checked here:")
        for name, why in report.unavailable.items():
            echo(f"  {name}: {why}")
    for name, target in report.targets.items():
        mine = [r for r in report.results if r.backend == name]
        failed = sum(not r.passed for r in mine)
        ratios = [r.error / r.tol for r in mine if not math.isnan(r.error)]
        worst = f", worst error/tol {max(ratios):.2g}" if ratios else ""
        note = f" [{target.note}]" if target.note else ""
        echo(f"{name} on {target.framework}/{target.device}{note}: {len(mine) - failed} passed, "
             f"{failed} failed{worst}", style="red" if failed else "green")
    for name in report.missing:
        echo(f"{name}: requested with --backend but cannot run here", style="red")
    verdict = "OK" if report.ok else "FAILED"
    missing = f", {len(report.missing)} requested backend(s) unavailable" if report.missing else ""
    echo(f"{verdict}: {len(report.results) - len(report.failed)} passed, {len(report.failed)} "
         f"failed{missing} in {report.seconds:.1f} s (rerun: gmagen check --seed {report.seed})",
         style="bold green" if report.ok else "bold red")


def run(args: argparse.Namespace) -> int:
    def announce(name: str, target: Target, count: int) -> None:
        print(f"checking {name} on {target.framework}/{target.device}: {count} cases ...",
              file=sys.stderr, flush=True)

    report = run_check(args.backend, args.dtype, args.quick, args.seed, args.pattern,
                       None if args.json else announce)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print_report(report)
    return 0 if report.ok else 1

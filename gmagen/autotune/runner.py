"""The tuning loop's measuring half: a Runner protocol and a Session over it.

Why a protocol: the loop (checks, interleaving, noise, budget, incumbent) is
the part that decides winners, so it is written once here and tested with a
fake runner and a fake clock; a backend's runner only compiles, launches on
scratch buffers, compares two outputs and times one launch.

Rules the Session enforces for every strategy:
  * the reference output is the default config's (itself checked against the
    oracle by the caller); a candidate whose output differs is rejected and
    reported, however fast;
  * failures (compile error, out of resources, wrong output) are data
    (:class:`ErrorConfig`), never exceptions out of the loop;
  * candidates of a batch are timed interleaved -- round robin over repeats,
    the starting candidate rotating -- and the incumbent is re-timed in every
    batch, so drift (clocks, heat) hits all alike and scores are ratios to it;
  * the winner is decided in a final interleaved showdown, and the incumbent
    stays unless a challenger beats it by more than the measured noise;
  * a runner with ``precompile`` compiles each batch at once (worker
    processes) before its configs are checked one by one; its time counts
    against the budget like any other.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Union

from gmagen.config import Config

from .cache import MAX_REJECTIONS, Entry
from .space import DeviceLimits, PrunedSpace

__all__ = ["ErrorConfig", "Measurement", "Runner", "Session", "TuneResult", "admit",
           "classify_message", "measure", "time_interleaved"]


@dataclass(frozen=True)
class Measurement:
    """Timed samples of one config; ``spread_ms`` (interquartile range) is
    its noise."""

    config: Config
    times_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def spread_ms(self) -> float:
        if len(self.times_ms) < 2:
            return 0.0
        q = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q[2] - q[0]


@dataclass(frozen=True)
class ErrorConfig:
    """A candidate that cannot win: kind is "compile", "out-of-resources",
    "wrong-output" or "runtime"."""

    config: Config
    kind: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"config": str(self.config), "kind": self.kind, "message": self.message[:500]}


Result = Union[Measurement, ErrorConfig]


class Runner(Protocol):
    """What a backend provides to tune one (program, shape, dtype) on one GPU.

    ``compile`` may raise (classified by exception name) or return an
    ErrorConfig.  ``run`` launches once on scratch buffers (nothing the caller
    owns) and returns the output; ``check`` returns None when ``output``
    matches ``reference`` within the dtype's tolerance, else the reason.
    ``sample`` is one timed launch in ms (CUDA events, inputs rotated past L2;
    warm-up is the Session's business).  ``now`` is a monotonic clock in
    seconds; tests pass a fake one.

    Optional (looked up with getattr): ``precompile(configs, timeout_s)``
    compiles many configs at once so that the ``compile`` + first run that
    follow are cheap (e.g. Triton's disk cache made warm by worker processes).
    It returns {config: None (compiled) or "ExceptionName: message" (failed,
    rejected like a compile error, never timed)}; a config it leaves out was
    not precompiled (no workers, or ``timeout_s`` seconds ran out) and is
    compiled by ``compile`` as usual.  ``precompile_workers`` says how many
    configs it compiles at once (the Session's first cost estimate)."""

    limits: DeviceLimits
    default: Config

    def compile(self, config: Config) -> Any: ...

    def run(self, handle: Any) -> Any: ...

    def check(self, output: Any, reference: Any) -> Optional[str]: ...

    def sample(self, handle: Any) -> float: ...

    def now(self) -> float: ...


def _kind(name: str, text: str) -> str:
    name, text = name.lower(), text.lower()
    if "outofresources" in name or "out of resource" in text or "shared memory" in text:
        return "out-of-resources"
    if "compil" in name:
        return "compile"
    return "runtime"


def classify(exc: BaseException) -> str:
    return _kind(type(exc).__name__, str(exc))


def classify_message(message: str) -> str:
    """:func:`classify` of an error that came back as "ExceptionName: text"."""
    name, _, text = message.partition(":")
    return _kind(name.strip(), text)


def precompile(runner: Runner, configs: Sequence[Config],
               timeout_s: Optional[float] = None) -> tuple[dict[Config, Optional[str]], bool]:
    """The runner's optional precompile of ``configs`` ({} without one) and
    whether it ran out of ``timeout_s``."""
    fn = getattr(runner, "precompile", None)
    if fn is None or not configs:
        return {}, False
    t0 = runner.now()
    done = dict(fn(list(configs), timeout_s))
    late = timeout_s is not None and runner.now() - t0 >= timeout_s and len(done) < len(configs)
    return done, late


def admit(runner: Runner, config: Config, reference: Any) -> Any:
    """Compile ``config`` and compare one run with ``reference``: the handle,
    or an ErrorConfig saying why the config may not be timed."""
    try:
        handle = runner.compile(config)
    except Exception as exc:  # a candidate's failure is data, never the loop's
        return ErrorConfig(config, classify(exc), f"{type(exc).__name__}: {exc}")
    if isinstance(handle, ErrorConfig) or reference is None:
        return handle
    try:
        problem = runner.check(runner.run(handle), reference)
    except Exception as exc:
        return ErrorConfig(config, classify(exc), f"{type(exc).__name__}: {exc}")
    return handle if problem is None else ErrorConfig(config, "wrong-output", problem)


def time_interleaved(runner: Runner, handles: Mapping[Config, Any], repeats: int,
                     warmup: int = 1) -> dict[Config, Measurement]:
    """``warmup`` untimed rounds, then ``repeats`` rounds visiting every config
    once, the starting config moving one along each round, so that drift
    (clocks, heat) spreads over all configs alike."""
    configs = list(handles)
    for _ in range(warmup):
        for c in configs:
            runner.sample(handles[c])
    samples: list[list[float]] = [[] for _ in configs]
    n = len(configs)
    for r in range(repeats):
        for j in range(n):
            i = (r + j) % n
            samples[i].append(float(runner.sample(handles[configs[i]])))
    return {c: Measurement(c, tuple(t)) for c, t in zip(configs, samples)}


def measure(runner: Runner, configs: Iterable[Config], repeats: int = 15,
            warmup: int = 1) -> dict[Config, Result]:
    """Check ``configs`` against the default config's output and time the
    admitted ones interleaved (the default included): for benchmark rows
    such as default vs tuned vs exhaustive-best."""
    reference_handle = admit(runner, runner.default, None)
    if isinstance(reference_handle, ErrorConfig):
        return {runner.default: reference_handle}
    reference = runner.run(reference_handle)
    handles: dict[Config, Any] = {runner.default: reference_handle}
    out: dict[Config, Result] = {}
    todo = [c for c in dict.fromkeys(configs) if c not in handles]
    done, _ = precompile(runner, todo)
    for c in todo:
        if done.get(c) is not None:
            out[c] = ErrorConfig(c, classify_message(done[c]), done[c])
        else:
            h = admit(runner, c, reference)
            if isinstance(h, ErrorConfig):
                out[c] = h
            else:
                handles[c] = h
    out.update(time_interleaved(runner, handles, repeats, warmup))
    return out


@dataclass
class TuneResult:
    """What tuning found; ``best`` is the incumbent unless beaten beyond noise."""

    best: Config
    best_time: Measurement
    incumbent: Config
    default: Config
    default_time: Measurement
    strategy: str
    tried: int
    rejected: list[ErrorConfig]
    elapsed_s: float
    complete: bool                 # False when the budget stopped the search
    decision: str                  # why best won (or why the incumbent stayed)
    measurements: dict[Config, Measurement] = field(default_factory=dict)
    # seconds per phase of the run (Session.phases: where a budget went)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def noise_ms(self) -> float:
        return self.best_time.spread_ms

    def to_entry(self, *, commit: Optional[str] = None) -> Entry:
        return Entry(config=self.best, time_ms=self.best_time.median_ms,
                     default_time_ms=self.default_time.median_ms,
                     noise_ms=self.noise_ms, tried=self.tried, rejected=len(self.rejected),
                     commit=commit, strategy=self.strategy,
                     rejections=tuple(r.to_json() for r in self.rejected[:MAX_REJECTIONS]))


class Session:
    """One tuning run: strategies call :meth:`evaluate` with batches and
    :meth:`finish` at the end.  ``options`` are the resolved common options
    (see ``strategies.COMMON_OPTIONS``)."""

    def __init__(self, space: PrunedSpace, runner: Runner, options: dict[str, Any],
                 strategy: str):
        self.space, self.runner, self.options, self.strategy = space, runner, options, strategy
        self.start = runner.now()
        self.deadline = self.start + float(options["budget_s"])
        self.results: dict[Config, Result] = {}
        self.scores: dict[Config, float] = {}          # median / incumbent's median, same batch
        self.handles: dict[Config, Any] = {}
        self.rejected: list[ErrorConfig] = []
        self.stopped = False                            # the budget ended the search
        self._cost_per_candidate = 0.0                  # the dearest batch so far, per candidate
        self._cost_per_sample = 0.0
        # seconds spent per phase: the default's compile and reference run, the
        # runner's batch precompiles, compile + check of each candidate here, timing
        # rounds, the final showdown; what a budget overrun went to
        self.phases = {"default": 0.0, "precompile": 0.0, "compile_check": 0.0,
                       "timing": 0.0, "final": 0.0}
        self.default = runner.default
        default_handle = admit(runner, self.default, None)
        if isinstance(default_handle, ErrorConfig):
            raise RuntimeError(f"the default config {self.default} fails ({default_handle.kind}):"
                               f" {default_handle.message}; cannot tune without a reference")
        self.handles[self.default] = default_handle
        self.reference = runner.run(default_handle)
        # first cost estimates, from the default: one compile + run, one launch;
        # a runner that precompiles a batch at once pays one compile per round
        t1 = runner.now()
        runner.sample(default_handle)
        self._cost_per_sample = runner.now() - t1
        self._cost_per_candidate = (t1 - self.start) / self._parallel_compiles() \
            + self._samples_per_candidate() * self._cost_per_sample
        self.incumbent = self._admit_incumbent(options.get("incumbent"))
        self.phases["default"] = runner.now() - self.start

    # -- admission ------------------------------------------------------------

    def _admit_incumbent(self, proposed: Optional[Config]) -> Config:
        if proposed is None or Config(proposed) == self.default:
            return self.default
        proposed = Config(proposed)
        try:
            broken = [r.why for r in self.space.space.broken_rules(proposed, self.space.limits)]
        except (KeyError, TypeError, ValueError) as exc:
            broken = [f"{type(exc).__name__}: {exc}"]
        if broken:
            self.rejected.append(ErrorConfig(proposed, "invalid", "incumbent breaks "
                                             + "; ".join(broken) + "; the default stays"))
            return self.default
        error = self._prepare(proposed)
        return self.default if error else proposed

    def _prepare(self, config: Config) -> Optional[ErrorConfig]:
        """Compile and check against the reference; None when admitted."""
        if config in self.handles:
            return None
        handle = admit(self.runner, config, self.reference)
        if isinstance(handle, ErrorConfig):
            self._reject(handle)
            return handle
        self.handles[config] = handle
        return None

    def _parallel_compiles(self) -> int:
        if getattr(self.runner, "precompile", None) is None:
            return 1
        batch = max(1, int(self.options["batch"]))
        workers = getattr(self.runner, "precompile_workers", None)
        return max(1, min(batch, batch if workers is None else int(workers)))

    def _reject(self, error: ErrorConfig) -> None:
        self.results[error.config] = error
        self.rejected.append(error)

    def _precompile(self, batch: list[Config]) -> list[Config]:
        """The runner's precompile of ``batch`` (if it has one), within the time
        the budget leaves after timing the batch: its failures are rejected;
        returns the configs to compile and check one by one (those precompile
        did not finish are dropped when it ran out of time, which ends the
        search)."""
        limit = self.remaining() - self._final_cost() \
            - (len(batch) + 1) * self._samples_per_candidate() * self._cost_per_sample
        if getattr(self.runner, "precompile", None) is None or limit <= 0:
            return batch  # the per-config deadline checks stop the loop
        t0 = self.runner.now()
        done, late = precompile(self.runner, batch, limit)
        self.phases["precompile"] += self.runner.now() - t0
        todo = []
        for c in batch:
            message = done.get(c)
            if message is not None:
                self._reject(ErrorConfig(c, classify_message(message), message))
            elif c in done or not late:
                todo.append(c)
        if late:
            self.stopped = True
        return todo

    def _time(self, configs: Sequence[Config], repeats: int) -> dict[Config, Measurement]:
        return time_interleaved(self.runner, {c: self.handles[c] for c in configs}, repeats,
                                int(self.options["warmup"]))

    def remaining(self) -> float:
        return self.deadline - self.runner.now()

    def _samples_per_candidate(self) -> int:
        return int(self.options["repeats"]) + int(self.options["warmup"])

    def _final_cost(self) -> float:
        n = int(self.options["finalists"]) + 2
        return n * (int(self.options["final_repeats"]) + int(self.options["warmup"])) \
            * self._cost_per_sample

    def affordable(self) -> int:
        """How many more candidates fit in one batch, leaving room for the
        incumbent's re-timing and the final showdown (dearest costs so far)."""
        if self.stopped:
            return 0
        spare = self.remaining() - self._final_cost() \
            - self._samples_per_candidate() * self._cost_per_sample
        if spare <= 0:
            return 0
        return int(spare / self._cost_per_candidate) if self._cost_per_candidate > 0 else 1 << 30

    def seen(self, config: Config) -> bool:
        return config in self.results or config == self.incumbent

    def evaluate(self, configs: Iterable[Config]) -> list[Result]:
        """Check and time one batch (with the incumbent); configs already seen
        are not re-run.  Returns one Result per config; stops (``stopped``)
        when the budget has no room for the batch."""
        batch = list(dict.fromkeys(c for c in configs if not self.seen(c)))
        if not batch:
            return []
        fits = self.affordable()
        if fits < len(batch):
            self.stopped = True  # the budget ends the search after this (partial) batch
            batch = batch[:fits]
            if not batch:
                return []
        t0 = self.runner.now()
        timed, prepared = [], 0
        for c in self._precompile(batch):
            # compile times vary by config and the default's may have come from a
            # disk cache: check the deadline before each compile, not once per batch
            if prepared and self.remaining() < self._final_cost() + (len(timed) + 2) \
                    * self._samples_per_candidate() * self._cost_per_sample:
                self.stopped = True
                break
            prepared += 1
            t1 = self.runner.now()
            if self._prepare(c) is None:
                timed.append(c)
            self.phases["compile_check"] += self.runner.now() - t1
        if timed:
            repeats = int(self.options["repeats"])
            t1 = self.runner.now()
            measured = self._time([self.incumbent] + timed, repeats)
            self.phases["timing"] += self.runner.now() - t1
            n_samples = (len(timed) + 1) * (repeats + int(self.options["warmup"]))
            self._cost_per_sample = max(self._cost_per_sample,
                                        (self.runner.now() - t1) / n_samples)
            base = measured[self.incumbent].median_ms
            for c in timed:
                self.results[c] = measured[c]
                self.scores[c] = measured[c].median_ms / base if base > 0 else float("inf")
        done = [c for c in batch if c in self.results]  # rejected or timed
        if done:
            self._cost_per_candidate = max(self._cost_per_candidate,
                                           (self.runner.now() - t0) / len(done))
        return [self.results[c] for c in done]

    def best(self, k: int = 1) -> list[Config]:
        """The ``k`` best scores so far (ratio to the incumbent, lower first)."""
        return sorted(self.scores, key=lambda c: (self.scores[c], str(c)))[:k]

    # -- the decision ---------------------------------------------------------

    def finish(self) -> TuneResult:
        """Re-time finalists, incumbent and default interleaved; keep the
        incumbent unless a challenger is faster by more than the noise."""
        finalists = [c for c in self.best(int(self.options["finalists"]))
                     if self.scores[c] < 1.0]
        contenders = list(dict.fromkeys([self.incumbent, self.default] + finalists))
        repeats = int(self.options["final_repeats"])
        t0 = self.runner.now()
        measured = self._time(contenders, repeats)
        self.phases["final"] += self.runner.now() - t0
        inc = measured[self.incumbent]
        challenger = min(contenders, key=lambda c: (measured[c].median_ms, str(c)))
        ch = measured[challenger]
        noise = max(inc.spread_ms, ch.spread_ms,
                    float(self.options["min_improvement"]) * inc.median_ms)
        gain = inc.median_ms - ch.median_ms
        if challenger != self.incumbent and gain > noise:
            best = challenger
            decision = (f"{challenger} beats the incumbent {self.incumbent} by {gain:.4g} ms "
                        f"({inc.median_ms:.4g} -> {ch.median_ms:.4g}), noise {noise:.3g} ms")
        else:
            best = self.incumbent
            decision = (f"incumbent {self.incumbent} kept: best challenger "
                        f"{challenger} {gain:.4g} ms faster, within noise {noise:.3g} ms"
                        if challenger != self.incumbent else
                        f"incumbent {self.incumbent} is the fastest")
        measurements = {c: r for c, r in self.results.items() if isinstance(r, Measurement)}
        measurements.update(measured)
        return TuneResult(best=best, best_time=measured[best], incumbent=self.incumbent,
                          default=self.default, default_time=measured[self.default],
                          strategy=self.strategy, tried=len(self.results) + 1,
                          rejected=list(self.rejected), elapsed_s=self.runner.now() - self.start,
                          complete=not self.stopped, decision=decision,
                          measurements=measurements, phases=dict(self.phases))

"""A Runner (gmagen.autotune's protocol) for backends whose executables run on
torch tensors on a CUDA device (Triton; CuPy with torch installed): one kernel
plan and specialization.

The runner owns its inputs: random tensors of the specialization's shapes and
dtypes on the device, several sets rotated so that timed launches do not find
their inputs in L2 (METHOD.md); the plans before the tuned one run once with
their default configs to produce its inputs (e.g. the memory a read consumes).
Nothing the caller passed is read or written.  Every candidate's outputs are
compared with the default config's before it may be timed.  On CUDA a sample
is one launch between CUDA events; on the CPU (Triton's interpreter, tests) it
is wall time.

Precompiling: on CUDA, :meth:`TorchRunner.precompile` compiles a batch of
configs at once in worker processes ("spawn": CUDA cannot fork), each running
a config once on its own inputs of the same shapes, so that the compiler's disk
cache (Triton's ~/.triton/cache or TRITON_CACHE_DIR) is warm when the tuning
process compiles the config itself.  Workers: GMAGEN_TUNE_WORKERS (0: none,
compile serially), default min(16, CPUs - 1).  Starting them (spawn, import
torch, a CUDA context) takes seconds, as much as a short budget: inside
:func:`keep_workers` (``gmagen.tune`` runs in it) the runners of one tuning run
share one pool, started once; outside, a runner's pool stops with the runner,
so that no idle process keeps a CUDA context in the caller's program.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Optional

from gmagen.config import Config
from gmagen.ir.types import MemoryType

from .runner import classify_message
from .space import DeviceLimits

GRACE_S = 3.0                # past a timeout, a shared pool's running compiles may finish (s)
L2_BYTES = 50 * 2**20          # H100; rotating past it is what matters
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 2e-2}  # vs the default config's output


def device_limits(index: int) -> DeviceLimits:
    import torch

    p = torch.cuda.get_device_properties(index)
    shared = getattr(p, "shared_memory_per_block_optin", 0) or 227 * 1024
    return DeviceLimits(name=p.name, capability=(p.major, p.minor),
                        sm_count=p.multi_processor_count, shared_memory_per_block=int(shared))


def _random_inputs(program: Any, binding: Any, device: Any, gen: Any) -> dict[str, Any]:
    """Program inputs of the binding's shapes, dtypes and layout (torch)."""
    import torch

    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
          "f64": torch.float64}
    dims = binding.dims
    env: dict[str, Any] = {}
    for inp in program.inputs:
        if inp.optional and inp.name not in binding.present:
            env[inp.name] = None
            continue
        t = inp.type
        if isinstance(t, MemoryType):
            shape = [dims[d] if isinstance(d, str) else d for d in t.shape]
            dtype = dt[binding.dtypes.get("acc", "f32")]
            s = torch.randn(shape, generator=gen, device=device).to(dtype)
            env[inp.name] = (s, torch.rand(shape[:-1], generator=gen, device=device).to(dtype))
            continue
        shape = [dims[d] if isinstance(d, str) else d for d in t.shape]
        if t.dtype == "bool":
            env[inp.name] = torch.rand(shape, generator=gen, device=device) > 0.2
            continue
        dtype = dt[binding.input_dtypes.get(inp.name, binding.dtypes.get(t.dtype, "f32"))]
        x = torch.randn(shape, generator=gen, device=device)
        if inp.role == "token" and binding.layout == "bhnd":
            x = x.transpose(1, 2).contiguous()  # logical [B, N, H, X] stored as [B, H, N, X]
        if inp.name == "log_var":
            x = 0.1 * x
        env[inp.name] = x.to(dtype)
    return env


def _flat(value: Any) -> list:
    return list(value) if isinstance(value, tuple) else [value]


MAX_WORKERS = 16


def default_workers() -> int:
    """GMAGEN_TUNE_WORKERS, else min(MAX_WORKERS, CPUs - 1); 0 compiles serially."""
    from gmagen import knobs

    value = knobs.tune_workers()
    if value is not None:
        return value
    return max(0, min(MAX_WORKERS, (os.cpu_count() or 1) - 1))


# -- the pool shared by the runners of one tuning run ---------------------------

_SHARED: dict[str, Any] = {"depth": 0, "pool": None, "workers": 0}


@contextlib.contextmanager
def keep_workers() -> Iterator[None]:
    """Within: a runner's worker pool outlives the runner and the next runner
    (same worker count) takes it up; on leaving the outermost, it stops."""
    _SHARED["depth"] += 1
    try:
        yield
    finally:
        _SHARED["depth"] -= 1
        if _SHARED["depth"] == 0:
            pool, _SHARED["pool"], _SHARED["workers"] = _SHARED["pool"], None, 0
            _stop_pool(pool, kill=False)


def _stop_pool(pool: Any, kill: bool) -> None:
    if pool is None:
        return
    if kill:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


# -- the worker processes' side -----------------------------------------------

_WORKER: dict[str, Any] = {}  # per worker: "inputs" (token, env), "poisoned"


def _worker_init() -> None:
    """Compilers and warnings of 16 processes would bury the tuner's output."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


def _worker_ready() -> int:
    """Imports torch and initializes CUDA while the tuning process is busy."""
    import torch

    torch.cuda.init()
    return os.getpid()


def _worker_inputs(token: str, module: str, program: Any, plan: Any, index: int,
                   binding: Any, options: Any) -> dict[str, Any]:
    """This runner's inputs, made as TorchRunner makes them, kept for its next
    configs (one runner's at a time)."""
    import importlib

    import torch

    held = _WORKER.get("inputs")
    if held is not None and held[0] == token:
        return held[1]
    if _WORKER.pop("inputs", None) is not None:
        # the last runner's inputs go back to the driver, not to this process's cache: a
        # pool kept over a grid of shapes otherwise holds every size it has seen (on an
        # H100 at N=65536, 15 workers x 5 GB left the tuner itself out of memory)
        torch.cuda.empty_cache()
    backend = importlib.import_module(module).BACKEND
    device = torch.device(f"cuda:{binding.device[1]}")
    torch.cuda.set_device(device)
    env = _random_inputs(program, binding, device, torch.Generator(device=device).manual_seed(0))
    for kp in plan.kernels[:index]:
        exe = backend.lower(kp, binding, backend.default_config(kp, binding), options)
        env.update(exe.run(env, binding))
    _WORKER["inputs"] = (token, env)
    return env


def _worker_compile(token: str, module: str, program: Any, plan: Any, index: int,
                    binding: Any, options: Any, config: Config) -> tuple[str, str]:
    """Lower ``config`` (complete) and run it once: ("ok", ""), ("error",
    "Name: message") for a config that cannot compile or that broke the CUDA
    context, or ("skip", why) where the tuning process had better find out
    itself (a failure that may be this worker's, such as memory)."""
    import importlib

    import torch

    if _WORKER.get("poisoned"):
        return "skip", "this worker's CUDA context is broken"
    try:
        env = _worker_inputs(token, module, program, plan, index, binding, options)
    except Exception as exc:
        return "skip", f"{type(exc).__name__}: {exc}"
    try:
        backend = importlib.import_module(module).BACKEND
        exe = backend.lower(plan.kernels[index], binding, config, options)
        exe.run(dict(env), binding)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # its outputs: 15 workers' caches crowd out the tuner at large N
        return "ok", ""
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
    try:
        torch.cuda.synchronize()
    except Exception:  # a fault: the tuning process would break its context too
        _WORKER["poisoned"] = True
        return "error", message
    compile_error = classify_message(message) in ("compile", "out-of-resources")
    return ("error" if compile_error else "skip"), message


class TorchRunner:
    """gmagen.autotune's Runner for one kernel plan and specialization of
    ``backend`` (its ``lower``, ``default_config`` and executables' ``run``)."""

    def __init__(self, backend: Any, program: Any, plan: Any, kernel: Any, binding: Any,
                 options: Any, limits: Optional[DeviceLimits] = None, *,
                 workers: Optional[int] = None, start_workers: int = 0) -> None:
        """``workers``: processes of :meth:`precompile` (None: GMAGEN_TUNE_WORKERS
        or the default; 0: none); ``start_workers``: how many to start now, so
        that they start up while the inputs and the default are made."""
        try:
            self._setup(backend, program, plan, kernel, binding, options, limits, workers,
                        start_workers)
        except BaseException:
            self.close(kill=True)
            raise

    def _setup(self, backend: Any, program: Any, plan: Any, kernel: Any, binding: Any,
               options: Any, limits: Optional[DeviceLimits], workers: Optional[int],
               start_workers: int) -> None:
        import torch

        self.backend, self.kernel, self.binding, self.options = backend, kernel, binding, options
        self.cuda = binding.device[0] == "cuda"
        # what a worker needs to lower and run a config of this plan (all picklable)
        self._pool: Any = None
        self.precompile_workers = (default_workers() if workers is None else max(0, workers)) \
            if self.cuda else 0  # the interpreter compiles nothing
        index = [i for i, kp in enumerate(plan.kernels) if kp is kernel]
        if not index:
            self.precompile_workers = 0
        self._task = (uuid.uuid4().hex, type(backend).__module__, program, plan,
                      index[0] if index else -1, binding, dict(options))
        if start_workers:
            self.start_workers(start_workers)
        self.device = torch.device(f"cuda:{binding.device[1]}" if self.cuda else "cpu")
        self.limits = limits or (device_limits(binding.device[1]) if self.cuda
                                 else DeviceLimits.fake(name="interpreter"))
        self.default = backend.default_config(kernel, binding)
        gen = torch.Generator(device=self.device).manual_seed(0)
        first = _random_inputs(program, binding, self.device, gen)
        per_set = sum(x.numel() * x.element_size() for v in first.values() if v is not None
                      for x in _flat(v))
        n_sets = 1 if not self.cuda else max(1, min(4, math.ceil(2 * L2_BYTES / max(per_set, 1))))
        self.sets = [first] + [_random_inputs(program, binding, self.device, gen)
                               for _ in range(n_sets - 1)]
        # the plans before this one, once, with their defaults: this plan's inputs
        for env in self.sets:
            for kp in plan.kernels:
                if kp is kernel:
                    break
                exe = backend.lower(kp, binding, backend.default_config(kp, binding), options)
                env.update(exe.run(env, binding))
        self._turn = 0

    def compile(self, config: Config) -> Any:
        full = self.default.replace(**dict(config))
        return self.backend.lower(self.kernel, self.binding, full, self.options)

    def run(self, exe: Any) -> dict[str, Any]:
        out = exe.run(dict(self.sets[0]), self.binding)
        return {k: tuple(x.clone() for x in _flat(v)) for k, v in out.items()}

    def check(self, output: dict[str, Any], reference: dict[str, Any]) -> Optional[str]:
        tol = TOLERANCE[self.binding.dtypes.get("T", "f32")]
        for name, ref in reference.items():
            for i, (a, b) in enumerate(zip(output[name], ref)):
                a, b = a.double(), b.double()
                if not bool(a.isfinite().all()):
                    return f"{name}[{i}] has non-finite values"
                err = float((a - b).norm() / b.norm().clamp_min(1e-30))
                if err > tol:
                    return f"{name}[{i}] differs from the default config's: {err:.2e} > {tol:.0e}"
        return None

    def sample(self, exe: Any) -> float:
        import torch

        env = dict(self.sets[self._turn % len(self.sets)])
        self._turn += 1
        if not self.cuda:
            t0 = time.perf_counter()
            exe.run(env, self.binding)
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        exe.run(env, self.binding)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def now(self) -> float:
        return time.monotonic()

    # -- precompiling in worker processes --------------------------------------

    def start_workers(self, n: Optional[int] = None) -> Any:
        """The pool of worker processes (None without workers), started with
        ``n`` of them (default: all) importing torch and setting up CUDA."""
        if not self.precompile_workers:
            return None
        if self._pool is None and _SHARED["depth"] and _SHARED["pool"] is not None \
                and _SHARED["workers"] == self.precompile_workers:
            self._pool = _SHARED["pool"]  # started by an earlier runner of this run
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.precompile_workers,
                                             mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init)
            # "spawn" pools start a process per task that finds none idle
            for _ in range(min(self.precompile_workers, n or self.precompile_workers)):
                self._pool.submit(_worker_ready)
            if _SHARED["depth"]:
                _stop_pool(_SHARED["pool"], kill=False)
                _SHARED["pool"], _SHARED["workers"] = self._pool, self.precompile_workers
        return self._pool

    def precompile(self, configs: Sequence[Config],
                   timeout_s: Optional[float] = None) -> dict[Config, Optional[str]]:
        """Compile ``configs`` at once in the worker processes, each run once
        there, so that :meth:`compile` + the first run find them in the
        compiler's disk cache: {config: None (compiled) or "Name: message"
        (cannot compile)}.  Configs left out were not precompiled (a failure
        that may be the worker's, a broken worker, ``timeout_s`` ran out);
        out of time, the workers are stopped, so that nothing they still run
        shares the GPU with the timing.  {} on the CPU (the interpreter) or
        without workers."""
        from concurrent.futures import wait

        pool = self.start_workers(len(configs)) if configs else None
        if pool is None:
            return {}
        futures = {}
        try:
            for c in configs:
                futures[pool.submit(self._compile_task, *self._task,
                                    self.default.replace(**dict(c)))] = c
        except Exception:  # a broken pool: the configs not submitted compile here
            pass
        submitted = len(futures)
        done, pending = wait(futures, timeout=timeout_s)
        if pending and self._pool is _SHARED["pool"]:
            # out of time in a shared pool: drop the queued configs and give the
            # running compiles a grace period, so that the next runner of this
            # run finds the pool started (killing it costs the next plan its
            # start-up, seconds of its budget); the late results are not used
            for f in pending:
                f.cancel()
            _, still = wait([f for f in pending if not f.cancelled()], timeout=GRACE_S)
            pending = pending if still else set()
            futures = {f: c for f, c in futures.items() if f in done}
        out: dict[Config, Optional[str]] = {}
        broken = bool(pending)
        for f in done:
            try:
                status, message = f.result()
            except Exception:  # BrokenProcessPool: not the config's fault
                broken = True
                continue
            if status != "skip":
                out[futures[f]] = None if status == "ok" else message
        if broken or submitted < len(configs):
            self.close(kill=True)  # the next batch starts a fresh pool
        return out

    _compile_task = staticmethod(_worker_compile)  # tests swap in a fake

    def close(self, kill: bool = False) -> None:
        """Stop the worker processes (``kill``: without waiting for the tasks
        they run); precompile starts new ones if called again.  A pool shared
        within :func:`keep_workers` is left running unless ``kill``."""
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is None:
            return
        if pool is _SHARED["pool"]:
            if not kill:
                return
            _SHARED["pool"], _SHARED["workers"] = None, 0
        _stop_pool(pool, kill)

    def __enter__(self) -> "TorchRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def tune_plan(backend: Any, tuning_space: Any, program: Any, plan: Any, kernel: Any,
              binding: Any, options: Any, strategy: str = "auto",
              tune_options: Optional[Any] = None, space: Any = None) -> Any:
    """``Backend.tune`` of a torch-native backend: gmagen.autotune's loop over a
    TorchRunner, in ``space`` or ``tuning_space(kind, default, D, Dv, K, dtype)``."""
    from gmagen import autotune

    from .strategies import COMMON_OPTIONS

    batch = int((tune_options or {}).get("batch", COMMON_OPTIONS["batch"][0]))
    t0 = time.monotonic()
    with TorchRunner(backend, program, plan, kernel, binding, options,
                     start_workers=batch) as runner:
        if space is None:
            dims = binding.dims
            K = dims.get("K", 64)
            space = tuning_space(kernel.kind, runner.default, dims.get("D", 64),
                                 dims.get("Dv", K), K, binding.dtypes.get("T", "f32"))
        # the inputs, the earlier plans' outputs and the worker start: outside the
        # search's budget, but part of what one shape's tuning costs
        setup = time.monotonic() - t0
        result = autotune.tune(space, runner, strategy, tune_options)
    result.phases = {"setup": setup, **result.phases,
                     "close": time.monotonic() - t0 - setup - result.elapsed_s}
    return result

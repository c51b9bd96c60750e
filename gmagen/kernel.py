"""Kernel: a compiled program, callable on arrays of any supported framework."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Union

from gmagen.adapters import checks, dlpack
from gmagen.backends.base import Backend, Executable
from gmagen.config import Config
from gmagen.errors import FrameworkError, UnsupportedFeature
from gmagen.ir.passes.plan import Plan
from gmagen.ir.program import Program
from gmagen.ir.types import MemoryType, TensorType
from gmagen.ir.verify import verify

log = logging.getLogger("gmagen")

_BINDINGS_KEPT = 64  # call signatures remembered per kernel (Kernel._bind)


class Kernel:
    """``kernel(q, k, v, mean, log_var, logit, key_mask=None, initial_state=None,
    cu_seqlens=None, return_state=False, layout=None)``.

    Positional arguments fill the program's required inputs in order; optional
    inputs (key_mask, initial_state, cu_seqlens) are keyword-only.  Arrays come
    back in the caller's framework and device.  Each new specialization (layout,
    dtypes, D/Dv/K, optional inputs present) is lowered once and cached."""

    def __init__(self, program: Program, plan: Plan, backend: Backend,
                 config: Union[None, Config, Mapping[str, Config]], options: Mapping[str, Any],
                 autotune: str = "cached"):
        self.program = program
        self.autotune = autotune
        self.plan = plan
        self._backend = backend
        self._user_config = config
        self.options = dict(options)
        self._types = verify(program)
        self._compiled: dict[tuple, list[Executable]] = {}
        self._bindings: dict[tuple, tuple[checks.Binding, tuple]] = {}
        self._last: Optional[list[Executable]] = None

    # -- introspection -----------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def config(self) -> Union[Config, dict[str, Config], None]:
        """The config of the last specialization run (one Config per kernel plan,
        a dict by kernel name when the plan has several); before any call, the
        config given to compile (None: backend defaults)."""
        if self._last is None:
            return self._user_config  # type: ignore[return-value]
        if len(self._last) == 1:
            return self._last[0].config
        return {kp.name: exe.config for kp, exe in zip(self.plan.kernels, self._last)}

    @property
    def source(self) -> str:
        """Generated code of the last specialization run (before any call: of a
        float32, bnhd, D=Dv=K=64 specialization, generated without running)."""
        exes = self._last if self._last is not None else self._lower(self._example_binding())
        return "\n\n".join(exe.source for exe in exes)

    def __repr__(self) -> str:
        return (f"Kernel({self.program.name}, backend={self.backend!r}, "
                f"kernels={[k.name for k in self.plan.kernels]})")

    # -- calling -----------------------------------------------------------
    def _collect(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        required = [i.name for i in self.program.inputs if not i.optional]
        if len(args) > len(required):
            raise FrameworkError(f"{self.program.name} takes {len(required)} positional arrays "
                                 f"({', '.join(required)}), got {len(args)}")
        named = dict(zip(required, args))
        for key, value in kwargs.items():
            if key in named:
                raise FrameworkError(f"argument {key!r} given twice (positionally and by name)")
            named[key] = value
        return named

    def __call__(self, *args: Any, return_state: bool = False, layout: Optional[str] = None,
                 **kwargs: Any) -> Any:
        named = self._collect(args, kwargs)
        binding, key = self._bind(named, layout or self.program.layout)
        be = self._backend
        exes = self._compiled.get(key)
        if exes is None:
            exes = self._lower(binding)
            self._compiled[key] = exes
        self._last = exes
        env: dict[str, Any] = {i.name: None for i in self.program.inputs}  # absent optionals
        for name, value in named.items():
            if value is None:
                continue
            if isinstance(value, (tuple, list)):
                env[name] = tuple(dlpack.to_native(v, binding.framework, be.native) for v in value)
            else:
                env[name] = dlpack.to_native(value, binding.framework, be.native)
        for exe in exes:
            env.update(exe.run(env, binding))
        outs = tuple(self._export(env[o], o, binding) for o in self.program.outputs)
        result: Any = outs[0] if len(outs) == 1 else outs
        if return_state:
            if self.program.state is None:
                raise FrameworkError(f"program {self.program.name} has no state to return")
            return result, self._export(env[self.program.state], self.program.state, binding)
        return result

    def _bind(self, named: dict[str, Any], layout: str) -> tuple[checks.Binding, tuple]:
        """The call's Binding and specialization key; calls with the signature of an
        earlier one (checks.signature: dtypes, shapes, strides, devices) reuse its."""
        sig = checks.signature(self.program, named)
        if sig is not None:
            hit = self._bindings.get((layout, sig))
            if hit is not None:
                return hit
        be = self._backend
        binding = checks.bind(self.program, named, layout, be.dtypes, be.devices, be.name)
        bound = (binding, binding.key + self._tuning_buckets(binding))
        if sig is not None:
            if len(self._bindings) >= _BINDINGS_KEPT:  # shapes that keep changing
                self._bindings.clear()
            self._bindings[(layout, sig)] = bound
        return bound

    def _export(self, value: Any, name: str, binding: checks.Binding) -> Any:
        t = self._types[name]
        if isinstance(t, MemoryType):
            return tuple(dlpack.from_native(v, self._backend.native, binding.framework)
                         for v in value)
        out = dlpack.from_native(value, self._backend.native, binding.framework)
        if isinstance(t, TensorType) and t.dtype == "T":
            out = dlpack.cast(out, binding.framework, binding.dtypes["T"])
        return out

    def _config_for(self, kernel_name: str) -> Optional[Config]:
        cfg = self._user_config
        if isinstance(cfg, Mapping) and not isinstance(cfg, Config):
            return cfg.get(kernel_name)
        return cfg

    def _tuning_buckets(self, binding: checks.Binding) -> tuple:
        """Where tuned configs may apply, they depend on the N and B*H buckets too."""
        if self.autotune == "off" or self._user_config is not None or \
                self._backend.tuning_device(binding) is None:
            return ()
        from gmagen.autotune import bucket

        dims = binding.dims
        return (bucket(dims["N"]), bucket(dims["B"] * dims["H"]))

    def export(self, path: str, *specs: Mapping[str, Any]) -> str:
        """Ahead-of-time libraries of this kernel under directory ``path`` for
        ``gmagen.load`` (backend tvm).  ``specs``: {"D", "Dv", "K", "layout", "dtype",
        "key_mask", "initial_state"}; none: every specialization run so far."""
        exporter = getattr(self._backend, "export", None)
        if exporter is None:
            raise UnsupportedFeature(f"backend {self.backend!r} cannot export libraries; "
                                     f"compile with backend='tvm'")
        return exporter(self, path, *specs)

    def tuning_key(self, kp: Any, binding: checks.Binding, device: Mapping[str, Any]) -> Any:
        """The autotune cache key of kernel plan ``kp`` for this specialization on
        ``device`` (the backend's ``tuning_device``): shared with gmagen.tune."""
        from gmagen import autotune

        dims = binding.dims
        return autotune.CacheKey.make(
            backend=self.backend, backend_version=device["backend_version"], gpu=device["gpu"],
            capability=device["capability"], sm_count=device["sm_count"],
            program=f"{self.program.hash()}:{kp.name}",
            dtypes=[f"{k}={binding.dtypes[k]}" for k in sorted(binding.dtypes)],
            D=dims.get("D", 0), Dv=dims.get("Dv", 0), K=dims.get("K", 0), layout=binding.layout,
            N=dims["N"], BH=dims["B"] * dims["H"])

    def binding_for(self, args: tuple, kwargs: dict, layout: Optional[str] = None) -> Any:
        """The specialization a call with these arguments would compile for."""
        be = self._backend
        return checks.bind(self.program, self._collect(args, kwargs), layout or self.program.layout,
                           be.dtypes, be.devices, be.name)

    def _tuned_config(self, kp: Any, binding: checks.Binding) -> Optional[Config]:
        """The autotune cache's config for this kernel and specialization (mode
        ``self.autotune``), or None for the backend's default."""
        if self.autotune == "off":
            return None
        device = self._backend.tuning_device(binding)
        if device is None:
            return None
        from gmagen import autotune

        key = self.tuning_key(kp, binding, device)

        def tune() -> Any:
            tuner = getattr(self._backend, "tune", None)
            if tuner is None:
                raise UnsupportedFeature(
                    f"autotune='on-miss': backend {self.backend!r} has no tuner in this version "
                    "of gmagen; use autotune='cached' (tuned configs from the caches) or 'off'")
            from gmagen.tune import DEFAULT_BUDGET_S, plan_budget

            # the shape's budget split over its plans, as gmagen.tune does (each plan
            # is tuned the first time its key misses; a program's plans miss together)
            return tuner(self.program, self.plan, kp, binding, self.options, "auto",
                         {"budget_s": plan_budget(DEFAULT_BUDGET_S, 0.0, len(self.plan.kernels))})

        sel = autotune.select(key, self.autotune, tune, autotune.default_cache(),
                              validate=lambda c: self._backend.validate_config(kp, c))
        log.info("%s: %s config for %s: %s", self.backend, kp.name, key, sel.describe())
        return sel.config

    def _lower(self, binding: checks.Binding) -> list[Executable]:
        exes = []
        for kp in self.plan.kernels:
            config = (self._config_for(kp.name) or self._tuned_config(kp, binding)
                      or self._backend.default_config(kp, binding))
            exe = self._backend.lower(kp, binding, config, self.options)
            log.info("%s: lowered %s for %s, dtypes %s, dims %s with %s", self.backend, kp.name,
                     dlpack.device_str(binding.device), dict(binding.dtypes),
                     {d: binding.dims[d] for d in checks.STATIC_DIMS if d in binding.dims},
                     exe.config)
            exes.append(exe)
        return exes

    def _example_binding(self) -> checks.Binding:
        dims = {"B": 1, "N": 128, "H": 1, "D": 64, "Dv": 64, "K": 64, "S": 1}
        return checks.Binding("numpy", (self._backend.devices[-1], 0), self.program.layout, dims,
                              {"T": "f32", "P": "f32", "acc": "f32"},
                              {i.name: "f32" for i in self.program.inputs}, frozenset(), ())

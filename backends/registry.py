"""Backend name -> lazily imported module; availability with a reason.

A backend is a package under ``backends/`` whose ``__init__`` defines
``BACKEND``, an instance of ``backends.base.Backend``; registering one is one
line here.  Importing the registry imports no backend.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

from typing import Any, Mapping, Optional

from gmagen.errors import BackendUnavailable, UnknownBackend

from .base import Availability, Backend

BACKENDS: dict[str, str] = {
    "numpy": "gmagen.backends.numpy",
    "triton": "gmagen.backends.triton",
    "cupy": "gmagen.backends.cupy",
    "tvm": "gmagen.backends.tvm",
    "torch": "gmagen.backends.torch",
    "jax": "gmagen.backends.jax",
}


@lru_cache(maxsize=None)
def _load(name: str) -> Backend | Availability:
    try:
        module = importlib.import_module(BACKENDS[name])
    except ModuleNotFoundError as exc:
        if exc.name == BACKENDS[name]:
            return Availability(False, f"backend {name!r} is not implemented in this version of gmagen")
        return Availability(False, f"cannot import {exc.name!r} ({exc})")
    except (ImportError, OSError) as exc:  # e.g. a broken shared library (libcuda, nvrtc)
        return Availability(False, f"cannot import {BACKENDS[name]}: {exc}")
    backend = getattr(module, "BACKEND", None)
    if not isinstance(backend, Backend):
        # a backend package still being built says what is missing
        return Availability(False, getattr(module, "UNAVAILABLE", None)
                            or f"{BACKENDS[name]} defines no BACKEND")
    return backend


def backend_availability(name: str) -> Availability:
    if name not in BACKENDS:
        raise UnknownBackend(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    loaded = _load(name)
    if isinstance(loaded, Availability):
        return loaded
    return loaded.availability()


def get_backend(name: str, options: Optional[Mapping[str, Any]] = None) -> Backend:
    """The backend object, or UnknownBackend / BackendUnavailable saying why.

    A backend that cannot run here may still generate and compile code for a
    device named in ``options`` (cupy with ``arch="sm_90"`` on a machine without a
    GPU): its ``lowering_availability(options)`` says so."""
    avail = backend_availability(name)
    if not avail:
        loaded = _load(name)
        lowering = getattr(loaded, "lowering_availability", None)
        if options is not None and lowering is not None and lowering(options):
            return loaded  # type: ignore[return-value]
        raise BackendUnavailable(f"backend {name!r} cannot run here: {avail.reason}")
    return _load(name)  # type: ignore[return-value]


def available_backends() -> dict[str, Availability]:
    """Every registered backend with whether it can run here and, if not, why."""
    return {name: backend_availability(name) for name in BACKENDS}

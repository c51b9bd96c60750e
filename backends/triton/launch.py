"""Load generated Triton source as a module (cached by source hash) and launch it.

Triton reads a kernel's source through ``inspect``, so generated code is
written to a file under the gmagen cache dir and imported from there.
Whether kernels are interpreted is decided once per process (see the backend's
``_probe``); the cache key still records it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

from gmagen import knobs
from gmagen.errors import CompileError

_MODULES: dict[tuple[str, bool], ModuleType] = {}
_LOCK = threading.Lock()


def source_dir() -> Path:
    path = knobs.cache_dir() / "triton_src"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load(source: str, interpret: bool) -> ModuleType:
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    key = (digest, interpret)
    with _LOCK:
        if key in _MODULES:
            return _MODULES[key]
        path = source_dir() / f"gma_{digest}.py"
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(source)
            tmp.replace(path)  # atomic: concurrent processes never see half a file
        name = f"gmagen_triton_{digest}_{'interp' if interpret else 'jit'}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as exc:
            raise CompileError(f"generated Triton source failed to load: {exc}; "
                               f"source: {path}") from exc
        sys.modules[name] = module
        _MODULES[key] = module
        return module


def launch(fn, grid: tuple, args: dict, num_warps: int, num_stages: int, source_path: str) -> None:
    try:
        fn[grid](**args, num_warps=num_warps, num_stages=num_stages)
    except Exception as exc:
        if type(exc).__name__ in ("CompilationError", "OutOfResources", "CompileTimeAssertionFailure"):
            raise CompileError(f"Triton could not compile {fn.__name__ if hasattr(fn, '__name__') else fn}"
                               f": {exc}; source: {source_path}") from exc
        raise

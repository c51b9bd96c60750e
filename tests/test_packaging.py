"""Packaging: the core imports without the GPU stacks, a regular (non-editable)
install works, and pyproject lists every package of the tree.

ir/ and backends/ live at the top of the repository and install as gmagen.ir
and gmagen.backends (STYLE.md); editable installs hide mistakes in that
mapping, so these checks run the installed layout in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "triton", "cupy", "tvm", "tvm_ffi", "jax", "jaxlib")

# A meta-path finder that refuses the heavy frameworks, installed before gmagen.
BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys

    BLOCKED = {BLOCKED!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:  # as if not installed
                raise ModuleNotFoundError(f"{{name}} is blocked by test_packaging", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
""")

SMOKE = textwrap.dedent("""
    import numpy as np
    import gmagen.ir
    from gmagen.ir import oracle

    program = gmagen.gma(causal=True)
    rng = np.random.default_rng()
    B, N, H, D, Dv, K = 1, 70, 2, 3, 4, 5
    inputs = dict(q=rng.normal(size=(B, N, H, D)), k=rng.normal(size=(B, N, H, D)),
                  v=rng.normal(size=(B, N, H, Dv)), mean=rng.normal(size=(H, K, D)),
                  log_var=rng.normal(0, 0.1, size=(H, K, D)),
                  logit=rng.normal(0, 0.1, size=(H, K)))
    out = oracle.run(program, inputs)
    assert out["y"].shape == (B, N, H, Dv) and np.isfinite(out["y"]).all()
    y = gmagen.compile(program, backend="numpy")(*inputs.values())
    assert np.allclose(y, out["y"], rtol=1e-12, atol=0)
""")


def _python(code: str, *, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_core_imports_without_gpu_stacks():
    code = BLOCKER + SMOKE + textwrap.dedent(f"""
        import gmagen.backends.registry, gmagen.adapters
        # availability probes must not need them either, and must say why not
        for name, avail in gmagen.available_backends().items():
            assert avail or avail.reason, name
        assert gmagen.available_backends()["numpy"]
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
        assert not loaded, loaded
        print("ok")
    """)
    out = _python(code)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_blocker_blocks():
    """The check above would pass vacuously if the finder blocked nothing."""
    out = _python(BLOCKER + "import torch")
    assert out.returncode != 0 and "blocked by test_packaging" in out.stderr


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _tree_packages() -> dict[str, Path]:
    """Package name -> directory, for every directory holding Python modules under
    the roots of pyproject's package-dir (gmagen/, ir/, backends/, ...)."""
    found: dict[str, Path] = {}
    for root_pkg, root_dir in _pyproject()["package-dir"].items():
        base = ROOT / root_dir
        for module in sorted(base.rglob("*.py")):
            rel = module.parent.relative_to(base)
            if "__pycache__" not in rel.parts:
                found.setdefault(".".join((root_pkg, *rel.parts)), module.parent)
    return found


def test_every_package_is_listed():
    listed = set(_pyproject()["packages"])
    tree = _tree_packages()
    missing = sorted(set(tree) - listed)
    assert not missing, (f"pyproject.toml [tool.setuptools] packages lacks {missing}: a "
                         f"regular install would leave them out")
    no_init = sorted(name for name, path in tree.items() if not (path / "__init__.py").exists())
    assert not no_init, f"{no_init} hold modules but no __init__.py"


def test_every_listed_package_exists():
    mapping = _pyproject()["package-dir"]
    for name in _pyproject()["packages"]:
        root = max((p for p in mapping if name == p or name.startswith(p + ".")), key=len)
        path = ROOT / mapping[root] / Path(*name[len(root):].split(".")[1:])
        assert (path / "__init__.py").is_file(), f"{name}: no {path / '__init__.py'}"


def _local_build_backend() -> bool:
    """Can this environment build the wheel itself (pyproject's build-system)?
    A fresh venv may lack setuptools >= 68 or wheel; pip then fetches them."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(dist: str) -> tuple[int, ...]:
        try:
            return tuple(int(p) for p in version(dist).split(".")[:2] if p.isdigit())
        except PackageNotFoundError:
            return ()
    setuptools = ver("setuptools")
    # setuptools >= 70.1 builds wheels without the separate wheel package
    return setuptools >= (68,) and (setuptools >= (70, 1) or ver("wheel") != ())


@pytest.mark.slow
def test_regular_install(tmp_path):
    """pip install (not editable) into a folder, then import from there only."""
    src, target, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    # install from a copy: building in place would write build/ into the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache",
        "tests", ".venv*"))
    elsewhere.mkdir()
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    args = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target)]
    if _local_build_backend():
        args.append("--no-build-isolation")  # offline and fast
        env["PIP_NO_INDEX"] = "1"
    pip = subprocess.run(args + [str(src)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]

    # every module of the tree made it into the install
    for name, path in _tree_packages().items():
        dest = target / Path(*name.split("."))
        for module in path.glob("*.py"):
            assert (dest / module.name).is_file(), f"{name}.{module.stem} was not installed"

    code = SMOKE + textwrap.dedent(f"""
        import importlib, gmagen.backends.registry
        target = {str(target)!r}
        for name in ("gmagen", "gmagen.ir", "gmagen.ir.passes", "gmagen.backends",
                     "gmagen.backends.registry", "gmagen.backends.numpy", "gmagen.adapters"):
            module = importlib.import_module(name)
            assert module.__file__.startswith(target), (name, module.__file__)
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(target))
    out = _python(code, env=env, cwd=elsewhere)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr

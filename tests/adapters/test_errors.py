"""Every wrong input raises its own gmagen error class, with a message that
names the argument and shows expected vs actual (STYLE.md "Errors")."""

from __future__ import annotations

import functools
import sys
import textwrap

import numpy as np
import pytest

import gmagen
from gmagen import errors
from gmagen.backends import registry
from gmagen.dsl import responsibilities_program

B, N, H, D, DV, K = 2, 9, 3, 8, 5, 4


@functools.lru_cache(maxsize=None)
def kernel(causal: bool = False, covariance: str = "diag"):
    return gmagen.compile(gmagen.gma(causal, covariance=covariance), backend="numpy")


@pytest.fixture
def base(rng) -> dict:
    """Valid float32 arguments of the canonical diag program; tests spoil one."""
    shapes = dict(q=(B, N, H, D), k=(B, N, H, D), v=(B, N, H, DV), mean=(H, K, D),
                  log_var=(H, K, D), logit=(H, K))
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


def _raises(cls, needles, fn, *args, **kwargs):
    with pytest.raises(cls) as info:
        fn(*args, **kwargs)
    err = info.value
    assert isinstance(err, errors.GMAError) and isinstance(err, (ValueError, TypeError))
    msg = str(err)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def f32(*shape):
    return np.zeros(shape, dtype=np.float32)


# name -> (changes to the base arguments, error class, needles in the message)
WRONG_INPUTS = {
    "k-shape": (dict(k=f32(B, N, H, D + 1)), errors.ShapeError,
                ["k has shape [2, 9, 3, 9]", "expected [B, N, H, D] = [2, 9, 3, 8]", "by q"]),
    "v-rank": (dict(v=f32(B, N, H)), errors.ShapeError,
               ["v has shape [2, 9, 3] (3 dims)", "[B, N, H, Dv]"]),
    "v-batch": (dict(v=f32(B + 1, N, H, DV)), errors.ShapeError, ["v has shape [3, 9, 3, 5]",
                                                                  "B was set by q"]),
    "q-bhnd-in-bnhd": (dict(q=f32(B, H, N, D), k=f32(B, H, N, D)), errors.ShapeError,
                       ["v has shape", "layout 'bnhd'"]),
    "mean-D": (dict(mean=f32(H, K, D - 1)), errors.ShapeError,
               ["mean has shape [3, 4, 7]", "[H, K, D] = [3, 4, 8]", "D was set by q"]),
    "mean-H": (dict(mean=f32(H - 1, K, D)), errors.ShapeError,
               ["mean has shape [2, 4, 8]", "H was set by q"]),
    "mean-K": (dict(mean=f32(H, K + 1, D)), errors.ShapeError,
               ["log_var has shape [3, 4, 8]", "[3, 5, 8]", "K was set by mean"]),
    "log_var-rank": (dict(log_var=f32(H, K)), errors.ShapeError,
                     ["log_var has shape [3, 4] (2 dims)", "expected [H, K, D]"]),
    "logit-K": (dict(logit=f32(H, K + 1)), errors.ShapeError,
                ["logit has shape [3, 5]", "[H, K] = [3, 4]"]),
    "mixed-token-dtypes": (dict(k=np.zeros((B, N, H, D))), errors.DTypeError,
                           ["k has dtype float64", "float32 like q"]),
    "v-float16": (dict(v=np.zeros((B, N, H, DV), np.float16)), errors.DTypeError,
                  ["v has dtype float16", "float32 like q"]),
    "mixed-mixture-dtypes": (dict(logit=np.zeros((H, K))), errors.DTypeError,
                             ["logit has dtype float64", "float32 like mean"]),
    "int-q": (dict(q=np.zeros((B, N, H, D), np.int64)), errors.DTypeError,
              ["q has dtype int64", "float32", "float64"]),
    "mask-float": (dict(key_mask=np.ones((B, N), np.float32)), errors.DTypeError,
                   ["key_mask has dtype float32", "expected bool"]),
    "mask-int": (dict(key_mask=np.ones((B, N), np.int32)), errors.DTypeError,
                 ["key_mask has dtype int32", "expected bool"]),
    "mask-shape": (dict(key_mask=np.ones((B, N - 1), bool)), errors.ShapeError,
                   ["key_mask has shape [2, 8]", "[B, N] = [2, 9]"]),
    "mask-rank": (dict(key_mask=np.ones((B, N, 1), bool)), errors.ShapeError,
                  ["key_mask has shape [2, 9, 1]", "[B, N]"]),
    "list-not-array": (dict(q=f32(B, N, H, D).tolist()), errors.FrameworkError,
                       ["q is a builtins.list", "NumPy, torch, JAX"]),
    "negative-strides": (dict(q=f32(B, N, H, D)[:, ::-1]), errors.LayoutError,
                         ["q has negative strides", "copy"]),
    "unexpected-keyword": (dict(values=f32(B, N, H, DV)), errors.FrameworkError,
                           ["unexpected argument 'values'", "q, k, v, mean, log_var, logit"]),
}


@pytest.mark.parametrize("changes, cls, needles",
                         [pytest.param(*v, id=k) for k, v in WRONG_INPUTS.items()])
def test_wrong_input(changes, cls, needles, base):
    _raises(cls, needles, kernel(), **{**base, **changes})


def test_log_var_inconsistent_with_covariance(base):
    _raises(errors.ShapeError, ["log_var has shape [3, 4, 8] (3 dims)", "expected [H, K]"],
            kernel(covariance="spherical"), **base)
    _raises(errors.ShapeError, ["log_var has shape [3, 4, 8]", "expected [H]"],
            kernel(covariance="shared"), **base)
    # and the public responsibilities() reads the covariance from log_var's rank
    _raises(errors.ShapeError, ["log_var has 4 dims", "[H, K, D]", "[H, K]", "[H]"],
            gmagen.responsibilities, base["q"], base["mean"], f32(H, K, D, 1), base["logit"])


def test_mixed_frameworks(base):
    torch = pytest.importorskip("torch")
    _raises(errors.FrameworkError, ["k is a torch array", "q is a numpy array"],
            kernel(), **{**base, "k": torch.from_numpy(base["k"])})
    jnp = pytest.importorskip("jax.numpy")
    _raises(errors.FrameworkError, ["logit is a jax array", "q is a numpy array"],
            kernel(), **{**base, "logit": jnp.asarray(base["logit"])})


def test_unknown_layout(base):
    _raises(errors.LayoutError, ["layout='nbhd'", "'bnhd'", "'bhnd'"], kernel(), **base,
            layout="nbhd")


def test_positional_arguments(base):
    args = list(base.values())
    _raises(errors.FrameworkError, ["missing required argument 'logit'"], kernel(), *args[:5])
    _raises(errors.FrameworkError, ["takes 6 positional arrays", "got 7"], kernel(),
            *args, args[0])
    _raises(errors.FrameworkError, ["'q' given twice"], kernel(), *args, q=args[0])
    _raises(errors.FrameworkError, ["missing required argument 'v'"], kernel(),
            **{**base, "v": None})


@pytest.mark.parametrize("state, cls, needles", [
    pytest.param(f32(B, H, K, DV), errors.FrameworkError,
                 ["initial_state must be a pair (S, n)", "got ndarray"], id="not-a-pair"),
    pytest.param((f32(B, H, K, DV),), errors.FrameworkError, ["pair", "got tuple"],
                 id="one-element"),
    pytest.param((f32(B, H, K, DV + 1), f32(B, H, K)), errors.ShapeError,
                 ["initial_state[0] (S) has shape [2, 3, 4, 6]", "[S, H, K, Dv] = [2, 3, 4, 5]"],
                 id="S-Dv"),
    pytest.param((f32(B + 1, H, K, DV), f32(B + 1, H, K)), errors.ShapeError,
                 ["initial_state[0] (S) has shape [3, 3, 4, 5]", "batch size"], id="S-rows"),
    pytest.param((f32(B, H, K, DV), f32(B, H, K + 1)), errors.ShapeError,
                 ["initial_state[1] (n) has shape [2, 3, 5]", "[S, H, K] = [2, 3, 4]"],
                 id="n-K"),
    pytest.param((np.zeros((B, H, K, DV), np.int64), f32(B, H, K)), errors.DTypeError,
                 ["initial_state[0] (S) has dtype int64", "float32, float64"], id="int"),
])
def test_initial_state_errors(state, cls, needles, base):
    _raises(cls, needles, kernel(causal=True), **base, initial_state=state)


def test_initial_state_is_causal_only(base):
    state = (f32(B, H, K, DV), f32(B, H, K))
    _raises(errors.FrameworkError, ["unexpected argument 'initial_state'"], kernel(), **base,
            initial_state=state)


def test_return_state_without_state(base):
    kern = gmagen.compile(responsibilities_program(), backend="numpy")
    _raises(errors.FrameworkError, ["has no state"], kern, base["q"], base["mean"],
            base["log_var"], base["logit"], return_state=True)


# -- backends and options -----------------------------------------------------

def test_unknown_backend():
    msg = _raises(errors.UnknownBackend, ["unknown backend 'nope'", "numpy"], gmagen.compile,
                  gmagen.gma(), backend="nope")
    for name in registry.BACKENDS:
        assert name in msg


def test_unavailable_registered_backend():
    """Whatever cannot run on this machine says so with a reason."""
    unavailable = {n: a for n, a in gmagen.available_backends().items() if not a}
    if not unavailable:
        pytest.skip("every registered backend is available here")
    for name, avail in unavailable.items():
        assert avail.reason
        _raises(errors.BackendUnavailable, [f"backend {name!r} cannot run here", avail.reason],
                gmagen.compile, gmagen.gma(), backend=name)


# module name -> source: each registered under its own backend name by the test
FAKE_MODULES = {
    "gmagen_fake_needs_dep": "import gmagen_no_such_dependency\n",
    "gmagen_fake_no_device": textwrap.dedent("""
        from gmagen.backends.base import Availability, Backend

        class NoDevice(Backend):
            name = "fake_no_device"
            def availability(self):
                return Availability(False, "no CUDA device (fake)")
            def lower(self, kernel, binding, config, options):
                raise AssertionError("never lowered")

        BACKEND = NoDevice()
    """),
    "gmagen_fake_no_backend": "# an unfinished backend package: no BACKEND yet\n",
    "gmagen_fake_broken_lib": "raise ImportError('libcuda.so.1: cannot open shared object')\n",
}


@pytest.fixture
def fake_backend(tmp_path, monkeypatch):
    """register(name, module): a registry entry pointing at a module written here."""
    for module, source in FAKE_MODULES.items():
        (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))

    def register(name: str, module: str) -> None:
        monkeypatch.setitem(registry.BACKENDS, name, module)

    yield register
    registry._load.cache_clear()  # forget the fakes' cached availability
    for module in FAKE_MODULES:
        sys.modules.pop(module, None)


@pytest.mark.parametrize("name, module, reason", [
    ("fake_missing", "gmagen.backends.fake_missing", "not implemented"),
    ("fake_needs_dep", "gmagen_fake_needs_dep", "cannot import 'gmagen_no_such_dependency'"),
    ("fake_no_device", "gmagen_fake_no_device", "no CUDA device (fake)"),
    # an unfinished backend package or a shared library that fails to load must
    # not crash compile() or available_backends()
    ("fake_no_backend", "gmagen_fake_no_backend", "BACKEND"),
    ("fake_broken_lib", "gmagen_fake_broken_lib", "libcuda.so.1"),
])
def test_backend_unavailable_says_why(name, module, reason, fake_backend):
    fake_backend(name, module)
    _raises(errors.BackendUnavailable, [f"backend {name!r}", reason], gmagen.compile,
            gmagen.gma(), backend=name)
    avail = gmagen.available_backends()[name]
    assert not avail and reason in avail.reason


def test_per_kernel_config_names_checked():
    _raises(errors.OptionError, ["gma_raed", "gma_read", "gma_write"], gmagen.compile,
            gmagen.gma(), config={"gma_raed": {"block_n": 32}})


def test_unknown_backend_option():
    _raises(errors.OptionError, ["backend 'numpy' has no option 'precision'", "valid options"],
            gmagen.compile, gmagen.gma(), backend="numpy", precision="tf32")


def test_compile_needs_a_program():
    _raises(errors.OptionError, ["program must be a gmagen Program", "got str"], gmagen.compile,
            "gma")


def test_bad_config_string():
    _raises(errors.OptionError, ["config", "Config(key=value, ...)"], gmagen.compile,
            gmagen.gma(), config="block_n=")


def test_error_classes():
    """Callers may catch ValueError / TypeError as well as GMAError."""
    value = (errors.ShapeError, errors.DeviceError, errors.LayoutError, errors.OptionError,
             errors.VerifyError, errors.ParseError, errors.UnknownBackend,
             errors.BackendUnavailable, errors.UnsupportedFeature)
    for cls in value:
        assert issubclass(cls, errors.GMAError) and issubclass(cls, ValueError), cls
    for cls in (errors.DTypeError, errors.FrameworkError):
        assert issubclass(cls, errors.GMAError) and issubclass(cls, TypeError), cls
    assert issubclass(errors.CompileError, errors.GMAError)


def test_fixed_dims(base):
    """Dims fixed when the program is built are checked like symbolic ones."""
    kern = gmagen.compile(gmagen.gma(D=D, Dv=DV + 1, K=K), backend="numpy")
    _raises(errors.ShapeError, ["v has shape [2, 9, 3, 5]", "[B, N, H, 6] = [2, 9, 3, 6]"],
            kern, **base)

"""gmagen's exception tree: one class per kind of failure.

Every error says what went wrong, where (op, argument), what was expected and
what was got.  Classes subclass ``ValueError`` (bad values, shapes, options) or
``TypeError`` (wrong kinds of objects, dtypes) so callers can catch either way.
"""

from __future__ import annotations


class GMAError(Exception):
    """Base class of every error gmagen raises on purpose."""


class ShapeError(GMAError, ValueError):
    """An array or IR value has the wrong shape."""


class DTypeError(GMAError, TypeError):
    """An array or IR value has a dtype the op or backend does not take."""


class DeviceError(GMAError, ValueError):
    """Arrays live on different devices, or on one the backend cannot use."""


class LayoutError(GMAError, ValueError):
    """Unknown layout name, or strides the backend cannot address."""


class FrameworkError(GMAError, TypeError):
    """An argument is not an array gmagen knows, or frameworks are mixed."""


class OptionError(GMAError, ValueError):
    """An option (norm, covariance, eps, config key, ...) has a bad value."""


class VerifyError(GMAError, ValueError):
    """An IR program is malformed: names the op, the operand and the rule."""


class ParseError(GMAError, ValueError):
    """The text form of a program could not be read; names the line."""


class UnknownBackend(GMAError, ValueError):
    """A backend name that is not registered; lists the known ones."""


class BackendUnavailable(GMAError, ValueError):
    """A known backend that cannot run here; says why (package, device)."""


class UnsupportedFeature(GMAError, ValueError):
    """A backend cannot lower a program feature yet (e.g. varlen); says which."""


class CompileError(GMAError, RuntimeError):
    """A backend compiler rejected generated code; says where source and log are."""


def format_shape(shape: object) -> str:
    """``(2, 9, 3)`` -> ``[2, 9, 3]``, the way error messages print shapes."""
    return "[" + ", ".join(str(s) for s in shape) + "]"  # type: ignore[union-attr]

"""Array exchange (``dlpack``) and call-time argument checks (``checks``)."""

from .checks import Binding, bind
from .dlpack import framework_of, from_native, to_native

__all__ = ["Binding", "bind", "framework_of", "from_native", "to_native"]

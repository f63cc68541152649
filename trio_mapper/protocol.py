"""Transitional: the wire protocol moved to `trio_mapper.wire`; the client modules still import it here."""

from trio_mapper.wire import *  # noqa: F403
from trio_mapper.wire import __all__ as __all__

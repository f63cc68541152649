"""Large documents are decoded with Python's cyclic garbage collector paused.

msgspec builds a decoded document's lists and dicts one by one, and the collector tracks each: every 700 new
ones it walks the young generation, and the older ones as they grow, again and again while the document is
being built. A 4 MiB request body of a million one-element arrays held the engine's event loop 366 ms with
the collector running, 124 ms with it paused, the pass it owes afterwards included (`bench/decoding.py`). A
decoded document holds no reference cycles, so nothing is lost by not collecting while it is built; its
objects are walked once, by the collector's next pass.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

#: Smaller documents are decoded as they come: too few objects for the collector to matter.
LARGE_DOCUMENT_BYTES: Final = 64 * 1024


@contextmanager
def paused_for(size: int) -> Iterator[None]:
    """Pause the collector while a document of ``size`` bytes is decoded, when it is large."""
    if size < LARGE_DOCUMENT_BYTES or not gc.isenabled():
        # Small, or paused already (by another thread's decode, or by the program): leave the collector be.
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()

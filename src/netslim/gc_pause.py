"""paused_gc: Python's cyclic garbage collector off for a block or a function call.

A leaf module (imports nothing of netslim), so any module can use it without an import cycle.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic GC off for the block (back on after, if it was on). Also a decorator:
    `@paused_gc()` pauses it for each call of the function."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()

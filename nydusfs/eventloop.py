"""The event loop every long-running dfnydus process runs on: uvloop's when installed.

Mount daemons, dfagent peers and the supernode spend most of their CPU in event-loop steps
rather than in their own code: pyfuse3 takes several loop steps per FUSE request, and a peer
on a shaped link wakes for every few packets of every transfer. uvloop's steps are cheaper
than asyncio's: 15-25% less wall time for a ``find`` of 100k entries through a mount, and
less CPU per byte for a peer (docs/benchmarks.md). Without uvloop, asyncio's loop works the
same, only slower.

:func:`run` also tunes the cyclic garbage collector for such processes
(:func:`tune_gc`).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["GC_YOUNG", "new_event_loop", "run", "tune_gc"]

T = TypeVar("T")

# Allocations of container objects (net) between young-generation collections; CPython's
# default is 700. A busy peer makes tens of thousands of short-lived containers a second
# (futures, frames' dicts, parsed JSON of lookups); most die before a collection at this
# threshold and are never traversed.
GC_YOUNG = 20_000


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def tune_gc() -> None:
    """Collect garbage cycles less often, and never walk what start-up made again.

    Why: the 8 peers of the fan-out benchmark each spent ~0.5 s of a ~20 s sample in about
    180 collections (``gc.callbacks``), on a machine whose two cores were busy throughout.
    ``gc.freeze`` moves every object alive now (imported modules, classes, config) to a
    permanent generation that collections skip; :data:`GC_YOUNG` makes young collections
    rarer. Cycles are still collected; they only live a little longer."""
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG), middle, old)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on :func:`new_event_loop`, after :func:`tune_gc`."""
    tune_gc()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)

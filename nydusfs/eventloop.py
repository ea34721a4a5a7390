"""The event loop every long-running dfnydus process runs on: uvloop's when installed.

Mount daemons, dfagent peers and the supernode spend most of their CPU in event-loop steps
rather than in their own code: pyfuse3 takes several loop steps per FUSE request, and a peer
on a shaped link wakes for every few packets of every transfer. uvloop's steps are cheaper
than asyncio's: 15-25% less wall time for a ``find`` of 100k entries through a mount, and
less CPU per byte for a peer (docs/benchmarks.md). Without uvloop, asyncio's loop works the
same, only slower.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["new_event_loop", "run"]

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on :func:`new_event_loop`."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)

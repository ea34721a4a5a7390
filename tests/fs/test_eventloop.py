"""The event loop runner of every long-running process: it tunes the garbage collector."""

from __future__ import annotations

import gc

from nydusfs import eventloop


def test_run_freezes_start_up_objects_and_collects_young_ones_less_often() -> None:
    threshold = gc.get_threshold()
    try:
        async def seen() -> tuple[int, int]:
            return gc.get_threshold()[0], gc.get_freeze_count()

        young, frozen = eventloop.run(seen())
        assert young >= eventloop.GC_YOUNG > threshold[0]
        assert frozen > 1000  # the modules and classes this test process imported
        # cycles are still collected
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)

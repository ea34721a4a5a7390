"""A traced prefetch list at a container's start: fetched beside its reads, in small batches.

The list of an image converted with ``--prefetch TRACE`` is what the container reads as it
starts. The mount fetches it with ``list_priority`` (not behind on-demand reads: a starting
program reads nearly all the time, and the list would wait for the whole start) and in
``list_batch_bytes`` batches (a reader waiting for a listed chunk waits for a small batch).
Everything outside the list (``all``) still waits for on-demand reads.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from nydusfs.fs.prefetch import Prefetcher

from .test_prefetch import BATCH, BOOT_FILE, CHUNK, ROLE, _rig, _until, image

__all__ = ["image"]  # the module-scoped image fixture, shared with test_prefetch


def test_the_list_is_fetched_while_an_on_demand_read_is_in_progress(image: Path) -> None:
    rig = _rig(image)
    p = Prefetcher(rig.fs, all=True, bandwidth=0, concurrency=2, batch_bytes=BATCH,
                   list_batch_bytes=CHUNK, list_priority=True)
    listed = {r.digest for r in rig.chunks_of(BOOT_FILE)}
    target = "a/f1"
    size = rig.fs.getattr(rig.ino(target)).size

    async def main() -> None:
        rig.backend.hold = gate = asyncio.Event()
        fg = asyncio.create_task(rig.fs.read(rig.ino(target), 0, size))
        await _until(lambda: rig.backend.held == 1, "the on-demand request")

        async def background() -> None:
            ROLE.set("bg")
            await p.run()

        bg = asyncio.create_task(background())
        # The list's first batches go out although the on-demand read is still waiting.
        await _until(lambda: rig.backend.held == 3, "two list batches beside the read")
        assert [s.role for s in rig.backend.seen] == ["fg", "bg", "bg"]
        assert all(s.foreground == 1 for s in rig.backend.seen[1:])
        rig.backend.hold = None
        gate.set()
        assert len(await fg) == size
        await bg

    asyncio.run(main())
    assert p.state == "done"
    background = [s for s in rig.backend.seen if s.role == "bg"]
    # Batches of one chunk (CHUNK bytes at most): every listed chunk has its own request.
    in_list = [s for s in background if s.request.size <= CHUNK]
    assert len(in_list) >= len(listed)
    # The rest of the image ("all") still waited for on-demand reads to end.
    rest = background[len(listed):]
    assert rest and all(s.foreground == 0 for s in rest)


def test_list_batches_are_small_and_in_list_order(image: Path) -> None:
    rig = _rig(image)
    p = Prefetcher(rig.fs, all=False, bandwidth=0, concurrency=1, batch_bytes=BATCH,
                   list_batch_bytes=CHUNK, list_priority=True)
    listed = rig.chunks_of(BOOT_FILE)
    assert len(listed) >= 3

    async def main() -> None:
        ROLE.set("bg")
        await p.run()

    asyncio.run(main())
    assert p.state == "done" and p.done_chunks == len(listed)
    offsets = [s.request.offset for s in rig.backend.seen]
    assert offsets == [r.compressed_offset for r in listed]  # one request per chunk, in order
    # Without list_batch_bytes the same list goes in BATCH-sized batches: fewer requests.
    rig2 = _rig(image)
    p2 = Prefetcher(rig2.fs, all=False, bandwidth=0, concurrency=1, batch_bytes=BATCH)
    asyncio.run(p2.run())
    assert len(rig2.backend.seen) < len(rig.backend.seen)

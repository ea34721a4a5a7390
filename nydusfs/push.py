"""Push a nydusfs image to a registry: blobs, bootstrap, config, then the manifest.

Used by ``nydusfs push OUT REF``, ``nydusfs build --push REF`` and ``nydusfs convert``. What is
uploaded is only what the registry does not have: every layer is checked first (HEAD) and,
when the caller knows a repository on the same registry that holds it (a chunk dictionary's
image), mounted from there instead of uploaded. The manifest goes last, so a reader never sees
a manifest whose layers are missing.

Blobs are read from a directory (``OUT/blobs/<hex>``, streamed from disk by the client). A blob
the bootstrap references but the directory lacks (one of a chunk dictionary's, when that
dictionary's blobs live in a registry) must already be in the destination repository, be
mountable from ``mount_from``, or be fetched by ``fetch_missing``; otherwise the push fails
with ``NotFoundError`` before any manifest is written.

Errors: the client's (``RegistryError``, ``AuthError``, ``UnavailableError`` after retries,
``NotFoundError``); ``FormatError`` for an unusable OUT directory.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nydusfs.errors import FormatError, NotFoundError
from nydusfs.format.reader import Bootstrap
from nydusfs.oci.client import ClientOptions, RegistryClient
from nydusfs.oci.image import PackedImage, pack_image
from nydusfs.oci.manifest import Descriptor
from nydusfs.oci.reference import Reference

__all__ = ["PushResult", "UploadProgress", "push_local", "push_packed", "read_local_image"]

BLOB_CONCURRENCY = 3

# fetch_missing(digest, dest): put the blob's bytes at dest (verified), for blobs not on disk
FetchMissing = Callable[[str, Path], Awaitable[None]]


@dataclass(slots=True)
class PushResult:
    reference: str  # registry/repository:tag@digest as pushed
    manifest_digest: str
    layers: int
    blobs_uploaded: int = 0  # layers (blobs, bootstrap) whose bytes were sent
    blobs_skipped: int = 0  # layers the registry had already, or mounted from another repo
    bytes_uploaded: int = 0  # layer + config + manifest bytes sent
    seconds: float = 0.0
    uploaded: list[str] = field(default_factory=list)  # digests of the layers sent

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


class UploadProgress:
    """A bytes-uploaded bar on stderr when it is a terminal (tqdm); silent otherwise."""

    def __init__(self, enabled: bool, total: int, desc: str = "push") -> None:
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(desc=desc, total=total, unit="B", unit_scale=True,
                             unit_divisor=1024, leave=False, file=sys.stderr)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def read_local_image(out: Path) -> tuple[Bootstrap, bytes]:
    """``OUT/bootstrap`` of a ``nydusfs build`` output: the parsed view and its bytes."""
    path = out / "bootstrap"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FormatError(f"{out}: not a nydusfs build output ({path}: {exc.strerror})") from exc
    return Bootstrap.from_bytes(data, name=str(path)), data


async def push_packed(
    client: RegistryClient,
    ref: Reference,
    packed: PackedImage,
    blob_dir: Path | None,
    *,
    mount_from: Sequence[str] = (),
    fetch_missing: FetchMissing | None = None,
    progress: bool = False,
    work_dir: Path | None = None,
) -> PushResult:
    """Upload what ``ref``'s repository lacks of ``packed``, then put the manifest at ``ref``.

    ``ref`` must carry a tag (the manifest is put by tag) or a digest, which must then be the
    manifest's digest.
    """
    t0 = time.monotonic()
    repo = ref.repository
    if ref.tag is None and ref.digest is not None and ref.digest != packed.manifest_digest:
        raise FormatError(f"{ref}: the image's manifest digest is {packed.manifest_digest}; "
                          "push to a tag, or to that digest")
    result = PushResult(reference="", manifest_digest=packed.manifest_digest,
                        layers=len(packed.blobs) + 1)
    start_bytes = client.bytes_uploaded
    local = {d.digest: blob_dir / d.digest.split(":", 1)[1] for d in packed.blobs
             if blob_dir is not None and (blob_dir / d.digest.split(":", 1)[1]).is_file()}
    total = sum(d.size for d in packed.blobs) + packed.bootstrap.size
    bar = UploadProgress(progress, total)
    sem = asyncio.Semaphore(BLOB_CONCURRENCY)

    async def one(desc: Descriptor, source: Path | bytes | None) -> None:
        async with sem:
            sent = await _push_layer(client, repo, desc, source, mount_from, fetch_missing,
                                     bar.update, work_dir)
        if sent:
            result.blobs_uploaded += 1
            result.uploaded.append(desc.digest)
        else:
            result.blobs_skipped += 1
            bar.update(desc.size)

    try:
        tasks = [one(d, local.get(d.digest)) for d in packed.blobs]
        tasks.append(one(packed.bootstrap, packed.bootstrap_layer))
        await _gather_all(tasks)
        await client.push_blob(repo, packed.config.digest, packed.config_bytes)
        tag = ref.tag if ref.tag is not None else packed.manifest_digest
        digest = await client.put_manifest(repo, tag, packed.manifest_bytes, packed.media_type)
    finally:
        bar.close()
    if digest != packed.manifest_digest:  # the registry stored other bytes than we sent
        raise FormatError(f"{ref}: registry reports manifest digest {digest}, expected "
                          f"{packed.manifest_digest}")
    result.reference = str(Reference(ref.registry, ref.repository, ref.tag, digest))
    result.bytes_uploaded = client.bytes_uploaded - start_bytes
    result.seconds = round(time.monotonic() - t0, 3)
    return result


async def _gather_all(coros: Sequence[Awaitable[None]]) -> None:
    """Run all; on the first failure cancel the rest and raise it (no orphaned uploads)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _push_layer(
    client: RegistryClient, repo: str, desc: Descriptor, source: Path | bytes | None,
    mount_from: Sequence[str], fetch_missing: FetchMissing | None,
    progress: Callable[[int], None], work_dir: Path | None,
) -> bool:
    """Upload one layer unless the repository has it; True if bytes were sent."""
    if source is not None:
        return await client.push_blob(repo, desc.digest, source, mount_from=mount_from,
                                      progress=progress)
    # Not on disk: a chunk dictionary's blob. Present already, or mounted from the
    # dictionary's repository (no bytes move), or else fetched and uploaded.
    if await client.blob_exists(repo, desc.digest):
        return False
    for source_repo in mount_from:
        if source_repo != repo and await client.mount_blob(repo, desc.digest, source_repo):
            return False
    if fetch_missing is None:
        raise NotFoundError(f"blob {desc.digest} is referenced by the bootstrap but is neither "
                            f"on disk nor in {client.registry}/{repo}")
    with tempfile.TemporaryDirectory(prefix=".nydusfs-blob-", dir=work_dir) as tmp:
        dest = Path(tmp) / desc.digest.split(":", 1)[1]
        await fetch_missing(desc.digest, dest)
        return await client.push_blob(repo, desc.digest, dest, progress=progress)


def push_local(out: Path, ref: Reference, options: ClientOptions, *,
               platform: str | None = None, progress: bool = False) -> PushResult:
    """``nydusfs push OUT REF``: pack ``OUT`` (a minimal image config) and push it."""
    boot, data = read_local_image(out)
    try:
        boot.check()
        packed = pack_image(boot, data, platform=platform, history="nydusfs build")
    finally:
        boot.close()
    blob_dir = out / "blobs"
    # No digest check here: the registry computes the digest of what it receives and refuses
    # a blob that does not match its name.

    async def run() -> PushResult:
        async with RegistryClient(ref.registry, options) as client:
            return await push_packed(client, ref, packed, blob_dir, progress=progress,
                                     work_dir=out)

    return asyncio.run(run())

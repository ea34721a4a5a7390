"""``nydusfs convert SRC DST``: an OCI/Docker image in a registry → a nydusfs image in a registry.

Pull, build, push, with layers processed as they download and memory bounded whatever the
image's size:

- **Download** runs on an asyncio event loop: each layer is read by consecutive ranged GETs of
  ``PIECE`` bytes into a bounded queue (``QUEUE_PIECES``); at most ``LAYERS_AHEAD`` layers are
  downloading at a time (the one being applied and the next), so memory holds at most
  ``LAYERS_AHEAD x (QUEUE_PIECES + 1) x PIECE`` bytes of layer data. Every layer's sha256 is
  computed as it streams and checked against the manifest at its end (``IntegrityError``; the
  build is abandoned and nothing is pushed).
- **Build** runs in a worker thread (``builder.build_layers``, the same code as ``nydusfs build
  oci:LAYOUT``: layers flattened, whiteouts applied, deleted data not stored), reading each
  layer's queue as a file. Its output goes to a temporary directory (or ``--output``).
- **Push** (``nydusfs.push``) uploads the blob and the bootstrap as layers, an image config
  that keeps the source's runtime config, and the manifest last (docs/oci.md).

With ``--chunk-dict`` (a previous nydusfs image by reference, or a local bootstrap), chunks the
dictionary already has are referenced, not stored: only the new blob holds new chunks, and the
dictionary's blobs become layers of the new image too — found present by HEAD or mounted
from the dictionary's repository (same registry: no bytes move, the blobs are not even
downloaded), and only fetched and uploaded when the registry can do neither.

Errors: the OCI client's (``AuthError``, ``RegistryError``, ``NotFoundError``,
``UnavailableError``), ``FormatError`` for a source that is not an image (or already a nydusfs
image), ``SourceError``/``IntegrityError`` for bad layers, ``BuildError``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nydusfs.builder.build import BuildOptions, BuildResult, LayerInput, build_layers
from nydusfs.builder.ocisource import LAYER_TYPES
from nydusfs.errors import BuildError, FormatError, IntegrityError, NydusfsError, SourceError
from nydusfs.format.reader import Bootstrap
from nydusfs.oci.client import ClientOptions, RegistryClient
from nydusfs.oci.image import (
    MEDIA_BLOB,
    MEDIA_BOOTSTRAP,
    MEDIA_BOOTSTRAP_ZSTD,
    fetch_image,
    pack_image,
)
from nydusfs.oci.manifest import Descriptor, Manifest
from nydusfs.oci.reference import Reference
from nydusfs.push import PushResult, push_packed

__all__ = ["ConvertOptions", "ConvertResult", "convert"]

PIECE = 4 << 20  # bytes per ranged GET of a layer
QUEUE_PIECES = 4  # pieces buffered per layer between download and build
LAYERS_AHEAD = 2  # layers downloading at once
MAX_CONFIG_SIZE = 4 << 20


@dataclass(slots=True)
class ConvertOptions:
    build: BuildOptions = field(default_factory=BuildOptions)
    # Destination registry options; the source gets the same TLS/auth-file settings, and the
    # explicit username/password only when it is on the same registry host.
    client: ClientOptions = field(default_factory=ClientOptions)
    platform: str = "linux/amd64"
    chunk_dict: str | None = None  # an image reference, or a local bootstrap path
    output: Path | None = None  # keep the built image here (default: a temporary directory)
    work_dir: Path | None = None  # where temporary files go (default: $TMPDIR)
    progress: bool = False


@dataclass(slots=True)
class ConvertResult:
    source: str  # registry/repository@digest actually converted
    reference: str  # registry/repository:tag@digest pushed
    manifest_digest: str
    root_digest: str
    source_layers: int
    source_bytes: int  # compressed size of the source layers
    bytes_downloaded: int  # from the source registry (layers, config, manifest, dictionary)
    bytes_uploaded: int  # to the destination registry
    layers: int  # layers of the new image (blobs + bootstrap)
    blobs_uploaded: int
    blobs_skipped: int
    chunk_dict: str | None
    build: dict[str, Any]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def convert(src: Reference, dst: Reference, options: ConvertOptions) -> ConvertResult:
    """Convert ``src`` into a nydusfs image pushed at ``dst``; see the module docstring."""
    return asyncio.run(_convert(src, dst, options))


def _src_options(src: Reference, dst: Reference, opts: ClientOptions) -> ClientOptions:
    if src.registry == dst.registry:
        return opts
    return dataclasses.replace(opts, username=None, password=None)


async def _convert(src: Reference, dst: Reference, options: ConvertOptions) -> ConvertResult:
    t0 = time.monotonic()
    if options.work_dir is not None:
        options.work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="nydusfs-convert-", dir=options.work_dir))
    try:
        async with contextlib.AsyncExitStack() as stack:
            dst_client = await stack.enter_async_context(
                RegistryClient(dst.registry, options.client))
            if src.registry == dst.registry:
                src_client = dst_client
            else:
                src_client = await stack.enter_async_context(RegistryClient(
                    src.registry, _src_options(src, dst, options.client)))
            dl0 = src_client.bytes_downloaded
            manifest = await src_client.get_manifest(src.repository, src.reference,
                                                     platform=options.platform)
            _check_source(manifest, src)
            config = await _source_config(src_client, src, manifest)

            build_opts = dataclasses.replace(options.build, progress=options.progress)
            dict_info = await _chunk_dict(options.chunk_dict, dst, options.client, stack, tmp,
                                          build_opts)
            out = options.output if options.output is not None else tmp / "image"
            result = await _build_streaming(src_client, src, manifest.layers, out, build_opts,
                                            options.progress)
            for w in result.warnings:
                print(f"nydusfs: warning: {w}", file=sys.stderr)
            data = result.bootstrap.read_bytes()
            boot = Bootstrap.from_bytes(data, name=str(result.bootstrap))
            source = f"{src.name}@{manifest.digest}"
            packed = pack_image(boot, data, source_config=config, source=source,
                                history=f"nydusfs convert {source}")
            pushed: PushResult = await push_packed(
                dst_client, dst, packed, out / "blobs", mount_from=dict_info.mount_from,
                fetch_missing=dict_info.fetch, progress=options.progress, work_dir=tmp)
            downloaded = src_client.bytes_downloaded - dl0
            if dict_info.client is not None and dict_info.client is not src_client:
                downloaded += dict_info.client.bytes_downloaded
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ConvertResult(
        source=source, reference=pushed.reference, manifest_digest=pushed.manifest_digest,
        root_digest=result.root_digest, source_layers=len(manifest.layers),
        source_bytes=sum(d.size for d in manifest.layers), bytes_downloaded=downloaded,
        bytes_uploaded=pushed.bytes_uploaded, layers=pushed.layers,
        blobs_uploaded=pushed.blobs_uploaded, blobs_skipped=pushed.blobs_skipped,
        chunk_dict=options.chunk_dict, build=_build_json(result, options.output),
        seconds=round(time.monotonic() - t0, 3))


def _build_json(result: BuildResult, output: Path | None) -> dict[str, Any]:
    doc = result.to_json()
    if output is None:  # built in a temporary directory, gone by now
        doc["bootstrap"] = None
    return doc


def _check_source(manifest: Manifest, src: Reference) -> None:
    kinds = {d.media_type for d in manifest.layers}
    if kinds & {MEDIA_BLOB, MEDIA_BOOTSTRAP, MEDIA_BOOTSTRAP_ZSTD}:
        raise FormatError(f"{src}: is already a nydusfs image")
    for i, d in enumerate(manifest.layers):
        if d.media_type not in LAYER_TYPES:
            raise FormatError(f"{src}: layer {i} has media type {d.media_type!r}, not a tar "
                              "layer (tar, tar+gzip, tar+zstd)")


async def _source_config(client: RegistryClient, src: Reference,
                         manifest: Manifest) -> dict[str, Any]:
    desc = manifest.config
    if desc.size > MAX_CONFIG_SIZE:
        raise FormatError(f"{src}: image config of {desc.size} bytes is too large")
    raw = await client.get_blob(src.repository, desc.digest, max_size=MAX_CONFIG_SIZE)
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise FormatError(f"{src}: image config is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise FormatError(f"{src}: image config is not a JSON object")
    return doc


# -- chunk dictionary -------------------------------------------------------------------------


@dataclass(slots=True)
class _DictInfo:
    mount_from: list[str] = field(default_factory=list)
    fetch: Callable[[str, Path], Any] | None = None
    client: RegistryClient | None = None


async def _chunk_dict(arg: str | None, dst: Reference, opts: ClientOptions,
                      stack: contextlib.AsyncExitStack, tmp: Path,
                      build_opts: BuildOptions) -> _DictInfo:
    """Resolve ``--chunk-dict`` into ``build_opts.chunk_dict`` and how to get its blobs."""
    info = _DictInfo()
    if arg is None:
        return info
    if os.path.exists(arg):
        build_opts.chunk_dict = Path(arg)
        build_opts.dict_blobs_local = True
        # Blobs beside it are linked into OUT/blobs and pushed (skipped if present); others
        # must be in the destination repository already.
        return info
    ref = Reference.parse(arg)
    if ref.registry == dst.registry:
        client = await stack.enter_async_context(RegistryClient(ref.registry, opts))
        info.mount_from = [ref.repository]
    else:
        client = await stack.enter_async_context(
            RegistryClient(ref.registry, _src_options(ref, dst, opts)))
    _image, data = await fetch_image(client, ref)
    path = tmp / "chunk-dict.bootstrap"
    path.write_bytes(data)
    build_opts.chunk_dict = path
    build_opts.dict_blobs_local = False
    info.client = client

    async def fetch(digest: str, dest: Path) -> None:
        await client.download_blob(ref.repository, digest, dest)

    info.fetch = fetch
    return info


# -- streaming layers into the builder --------------------------------------------------------


class _Feed:
    """One layer's bytes: produced by ranged GETs on the loop, consumed by the builder thread.

    Items in the queue: ``bytes`` pieces in order, then ``None`` (end, digest verified) or an
    exception (raised in the builder thread where it reads).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, desc: Descriptor, index: int) -> None:
        self.loop = loop
        self.desc = desc
        self.label = f"layer {index} ({desc.digest[:19]})"
        self.queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(QUEUE_PIECES)
        self.failed = False
        self.aborted = False

    async def produce(self, client: RegistryClient, repo: str,
                      on_bytes: Callable[[int], None]) -> None:
        sha = hashlib.sha256()
        size, off = self.desc.size, 0
        try:
            while off < size:
                n = min(PIECE, size - off)
                data = await client.read_blob_range(repo, self.desc.digest, off, n)
                if len(data) != n:
                    raise IntegrityError(f"{self.label}: registry returned {len(data)} bytes "
                                         f"at offset {off}, expected {n}")
                sha.update(data)
                off += n
                on_bytes(n)
                await self.queue.put(data)
            if "sha256:" + sha.hexdigest() != self.desc.digest:
                raise IntegrityError(f"{self.label}: content does not match {self.desc.digest}")
            await self.queue.put(None)
        except NydusfsError as exc:
            self.failed = True
            await self.queue.put(exc)

    def abort(self) -> None:
        """Stop the reader: its pending and next reads raise (called on the loop)."""
        self.aborted = True
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(BuildError(f"{self.label}: conversion stopped"))

    def _get(self) -> bytes | BaseException | None:
        if self.aborted:
            raise BuildError(f"{self.label}: conversion stopped")
        try:
            return asyncio.run_coroutine_threadsafe(self.queue.get(), self.loop).result()
        except (RuntimeError, concurrent.futures.CancelledError) as exc:  # loop closing
            raise BuildError(f"{self.label}: conversion stopped") from exc

    @contextlib.contextmanager
    def open(self) -> Iterator[_FeedReader]:
        reader = _FeedReader(self)
        try:
            yield reader
        except SourceError as exc:
            # An unparsable layer may simply be corrupt: if its digest is wrong, say that.
            try:
                reader.drain()
            except IntegrityError as bad:
                raise bad from exc
            raise
        reader.drain()


class _FeedReader:
    """A read-only file over a ``_Feed`` (used on the builder thread only)."""

    def __init__(self, feed: _Feed) -> None:
        self._feed = feed
        self._buf = memoryview(b"")
        self._eof = False

    def _fill(self) -> bool:
        while not self._buf and not self._eof:
            item = self._feed._get()
            if item is None:
                self._eof = True
            elif isinstance(item, BaseException):
                self._eof = True
                raise item
            else:
                self._buf = memoryview(item)
        return bool(self._buf)

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        if n < 0:
            parts = []
            while self._fill():
                parts.append(bytes(self._buf))
                self._buf = memoryview(b"")
            return b"".join(parts)
        if not self._fill():
            return b""
        data = bytes(self._buf[:n])
        self._buf = self._buf[n:]
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self._fill():
            self._buf = memoryview(b"")


class _DownloadBar:
    def __init__(self, enabled: bool, total: int) -> None:
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(desc="pull", total=total, unit="B", unit_scale=True,
                             unit_divisor=1024, leave=False, file=sys.stderr)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def _build_streaming(client: RegistryClient, src: Reference,
                           layers: tuple[Descriptor, ...], out: Path, options: BuildOptions,
                           progress: bool) -> BuildResult:
    loop = asyncio.get_running_loop()
    feeds = [_Feed(loop, d, i) for i, d in enumerate(layers)]
    bar = _DownloadBar(progress, sum(d.size for d in layers))

    async def feed_all() -> None:
        sem = asyncio.Semaphore(LAYERS_AHEAD)
        tasks: list[asyncio.Task[None]] = []

        async def one(feed: _Feed) -> None:
            try:
                await feed.produce(client, src.repository, bar.update)
            finally:
                sem.release()

        try:
            for feed in feeds:
                await sem.acquire()
                if any(f.failed for f in feeds):
                    break  # the build will stop at that layer: do not download more
                tasks.append(asyncio.create_task(one(feed)))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    inputs = [LayerInput(f.label, f.open) for f in feeds]  # type: ignore[arg-type]
    producer = asyncio.create_task(feed_all())
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="convert-build")
    job = executor.submit(build_layers, inputs, out, options)
    try:
        return await asyncio.wrap_future(job)
    finally:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        if not job.done():  # interrupted: make the builder stop at its next read, and wait
            for f in feeds:  # for it, so its clean-up is done before the caller's
                f.abort()
            await asyncio.gather(asyncio.wrap_future(job), return_exceptions=True)
        executor.shutdown(wait=False)
        bar.close()

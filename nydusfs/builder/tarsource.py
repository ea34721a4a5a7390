"""Tar layer source: apply OCI layers, lowest first, into one ``Node`` tree — in one pass each.

Each layer is streamed once (plain, gzip, bzip2, xz or zstd; never seeked, so a layer can come
straight off the network later) and every regular file's data is chunked into the spool as it
passes. Whiteouts (``.wh.NAME``) and opaque markers (``.wh..wh..opq``) remove lower-layer
entries; data of removed or overwritten files stays only in the spool and never reaches the
blob, because the blob is assembled from the final tree.

Layers are untrusted. Nothing is ever written to disk from them (no extraction), and names are
interpreted the way container runtimes do, safely:

- ``/`` prefixes, ``.`` and empty components are dropped; ``..`` cannot climb above the root
  (``../../etc/passwd`` is ``etc/passwd``), the same clamping containerd applies;
- a parent component that is a symlink in the tree is followed *within the tree* (as
  containerd's ``RootPath`` does: Debian's ``/lib -> usr/lib`` is common), with a loop limit;
- hardlinks must name an existing non-directory in the tree, or the layer is rejected;
- duplicate entries: the later one wins (a directory keeps its children);
- truncated or corrupt archives, over-long names and out-of-range ids raise ``SourceError``.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, BinaryIO

import zstandard

from nydusfs.builder.pipeline import ChunkPipeline
from nydusfs.builder.tree import Node, new_dir
from nydusfs.errors import NydusfsError, SourceError
from nydusfs.format.layout import MAX_NAME_LEN, MAX_SYMLINK_LEN

__all__ = ["TarLayers", "open_layer_stream"]

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
_MAX_SYMLINK_HOPS = 40
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _b(s: str) -> bytes:
    """Undo tarfile's surrogateescape decoding: names and values are bytes to us."""
    return s.encode("utf-8", "surrogateescape")


def _components(name: bytes) -> list[bytes]:
    """Split a member name into safe components: no '', '.', and '..' clamped at the root."""
    out: list[bytes] = []
    for comp in name.split(b"/"):
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            if out:
                out.pop()
            continue
        out.append(comp)
    return out


class _Peek:
    """A read-only stream with the first bytes already consumed for format sniffing."""

    def __init__(self, raw: BinaryIO, head: bytes) -> None:
        self._raw = raw
        self._head = head

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0:
                data, self._head = self._head + self._raw.read(), b""
                return data
            data, self._head = self._head[:n], self._head[n:]
            if len(data) < n:
                data += self._raw.read(n - len(data))
            return data
        return self._raw.read(n)


class _ZstdReader:
    """Decompresses concatenated zstd frames; a frame cut short raises instead of ending quietly.

    (``zstandard``'s ``stream_reader`` returns a short stream for truncated input.)
    """

    def __init__(self, raw: _Peek) -> None:
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._started = False
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        want = n if n >= 0 else 1 << 62
        while len(self._buf) < want:
            data = self._raw.read(1 << 16)
            if not data:
                if self._started and not self._obj.eof:
                    raise SourceError("zstd stream truncated")
                break
            while data:
                if self._obj.eof:
                    self._obj = self._dctx.decompressobj()
                self._started = True
                self._buf += self._obj.decompress(data)
                data = self._obj.unused_data if self._obj.eof else b""
        out, self._buf = self._buf[:want], self._buf[want:]
        return out


class _Counting:
    """Counts the bytes of the uncompressed tar stream, to detect a missing end-of-archive."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._raw.read(n)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def open_layer_stream(raw: BinaryIO) -> Any:
    """Wrap a layer stream in the right decompressor, sniffed from its first bytes.

    Every decompressor used here fails loudly on a truncated stream (gzip, bz2 and xz raise
    ``EOFError``; zstd is handled by ``_ZstdReader``), and gzip checks its CRC at the end.
    """
    head = raw.read(6)
    peek = _Peek(raw, head)
    if head[:4] == _ZSTD_MAGIC:
        return _ZstdReader(peek)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=peek, mode="rb")  # type: ignore[call-overload]
    if head[:3] == b"BZh":
        return bz2.BZ2File(peek)  # type: ignore[call-overload]
    if head == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(peek)  # type: ignore[arg-type]
    return peek


class TarLayers:
    """Applies layers to ``self.root`` in order; regular file data goes through ``pipeline``."""

    def __init__(self, pipeline: ChunkPipeline) -> None:
        self.root = new_dir(layer=-1)
        self.pipeline = pipeline
        self.layer = -1
        self.skipped: list[str] = []  # entry kinds we cannot represent (e.g. tar volume labels)

    # ---- tree navigation ----------------------------------------------------------------

    def _walk_dirs(self, comps: list[bytes], what: str) -> Node:
        """The directory at ``comps``: missing ones created, symlinks followed in the tree."""
        stack: list[Node] = [self.root]
        todo = list(comps)
        hops = 0
        while todo:
            comp = todo.pop(0)
            if comp == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            if comp in (b"", b"."):
                continue
            cur = stack[-1]
            child = cur.kids().get(comp)
            if child is None:
                child = cur.kids()[comp] = new_dir(layer=self.layer)
            elif stat.S_ISLNK(child.mode):
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise SourceError(f"{what}: too many levels of symbolic links")
                if child.target.startswith(b"/"):
                    stack = [self.root]
                todo = child.target.split(b"/") + todo
                continue
            elif not child.is_dir():
                # A file where a directory is needed: the later entry wins, as on extraction.
                child = cur.kids()[comp] = new_dir(layer=self.layer)
            stack.append(child)
        return stack[-1]

    def _lookup(self, comps: list[bytes], what: str) -> Node | None:
        """The node at ``comps`` (final component not followed), or None."""
        if not comps:
            return self.root
        parent = self._walk_dirs(comps[:-1], what)
        return parent.kids().get(comps[-1])

    # ---- applying a layer ---------------------------------------------------------------

    def apply(self, raw: BinaryIO, label: str,
              on_member: Callable[[tarfile.TarInfo], None] | None = None) -> None:
        """Apply one layer. ``label`` names it in errors."""
        self.layer += 1
        try:
            stream = _Counting(open_layer_stream(raw))
            with tarfile.open(fileobj=stream, mode="r|",  # type: ignore[call-overload]
                              encoding="utf-8", errors="surrogateescape") as tar:
                for member in tar:
                    self._apply_member(tar, member, label)
                    if on_member is not None:
                        on_member(member)
                end_of_members = tar.offset
            # Drain the rest: makes the decompressor check its trailer (CRC, frame end).
            stream.drain()
        except NydusfsError as exc:
            if isinstance(exc, SourceError) and not str(exc).startswith(label):
                raise SourceError(f"{label}: {exc}") from exc
            raise
        except (tarfile.TarError, EOFError, OSError, zlib.error, zstandard.ZstdError,
                lzma.LZMAError, ValueError) as exc:
            raise SourceError(f"{label}: unreadable tar layer: {exc}") from exc
        # tarfile ends quietly when the data stops at a header; a real archive always ends
        # with zero blocks, so their absence means the layer was cut short.
        if stream.count < end_of_members + tarfile.BLOCKSIZE:
            raise SourceError(f"{label}: truncated tar layer (no end-of-archive marker)")

    def _apply_member(self, tar: tarfile.TarFile, m: tarfile.TarInfo, label: str) -> None:
        raw_name = _b(m.name)
        what = f"{label}: {raw_name.decode('utf-8', 'backslashreplace')}"
        comps = _components(raw_name)
        if any(len(c) > MAX_NAME_LEN for c in comps):
            raise SourceError(f"{what}: a name component is longer than {MAX_NAME_LEN} bytes")
        base = comps[-1] if comps else b""

        if base.startswith(WHITEOUT):
            parent = self._walk_dirs(comps[:-1], what)
            if base == OPAQUE:
                self._make_opaque(parent)
            elif not base.startswith(WHITEOUT + WHITEOUT):  # .wh..wh.* are aufs metadata
                victim = parent.kids().get(base[len(WHITEOUT):])
                # Whiteouts hide lower layers only, never an entry of their own layer.
                if victim is not None and victim.layer < self.layer:
                    del parent.kids()[base[len(WHITEOUT):]]
            return

        if not comps:  # the root itself ("./")
            if m.isdir():
                self._set_attrs(self.root, m, what)
            return

        parent = self._walk_dirs(comps[:-1], what)
        existing = parent.kids().get(base)

        if m.islnk():
            target_comps = _components(_b(m.linkname))
            target = self._lookup(target_comps, what)
            if target is None or target.is_dir():
                raise SourceError(f"{what}: hardlink target {m.linkname!r} is missing or a dir")
            parent.kids()[base] = target
            return

        if m.isdir():
            if existing is not None and existing.is_dir():
                self._set_attrs(existing, m, what)
                existing.layer = self.layer
                return
            node = Node(stat.S_IFDIR, layer=self.layer)
        elif m.isreg():
            node = Node(stat.S_IFREG, layer=self.layer)
        elif m.issym():
            target_b = _b(m.linkname)
            if not 0 < len(target_b) <= MAX_SYMLINK_LEN or b"\x00" in target_b:
                raise SourceError(f"{what}: invalid symlink target")
            node = Node(stat.S_IFLNK, layer=self.layer, target=target_b)
        elif m.ischr() or m.isblk():
            node = Node(stat.S_IFCHR if m.ischr() else stat.S_IFBLK, layer=self.layer)
            node.rdev = os.makedev(m.devmajor, m.devminor)
        elif m.isfifo():
            node = Node(stat.S_IFIFO, layer=self.layer)
        else:
            self.skipped.append(f"{what} (tar type {m.type!r})")
            return
        self._set_attrs(node, m, what)
        parent.kids()[base] = node
        if m.isreg():
            node.size = m.size
            f = tar.extractfile(m)
            assert f is not None
            if self.pipeline.add(node, f) != m.size:  # type: ignore[arg-type]
                raise SourceError(f"{what}: archive truncated inside the file")

    def _set_attrs(self, node: Node, m: tarfile.TarInfo, what: str) -> None:
        if not (0 <= m.uid <= 0xFFFFFFFF and 0 <= m.gid <= 0xFFFFFFFF):
            raise SourceError(f"{what}: uid/gid out of range")
        # Symlink permissions are meaningless on Linux and always read back as 0777.
        perms = 0o777 if stat.S_ISLNK(node.mode) else m.mode & 0o7777
        node.mode = stat.S_IFMT(node.mode) | perms
        node.uid, node.gid = m.uid, m.gid
        node.mtime_ns = _mtime_ns(m)
        node.xattrs = _pax_xattrs(m.pax_headers)

    def _make_opaque(self, d: Node) -> None:
        """Hide everything below ``d`` that came from lower layers (this layer's entries stay)."""
        _prune_lower(d, self.layer)


def _prune_lower(d: Node, layer: int) -> bool:
    """Remove lower-layer entries under ``d``; True if anything of ``layer`` remains below."""
    keep = False
    for name, child in list(d.kids().items()):
        if child.is_dir():
            has_current = _prune_lower(child, layer)
            if child.layer < layer and not has_current:
                del d.kids()[name]
            else:
                keep = True
        elif child.layer < layer:
            del d.kids()[name]
        else:
            keep = True
    return keep


def _mtime_ns(m: tarfile.TarInfo) -> int:
    text = m.pax_headers.get("mtime")
    if text is not None:
        try:
            return int(Decimal(text) * 1_000_000_000)
        except InvalidOperation:
            pass
    return int(m.mtime) * 1_000_000_000


def _pax_xattrs(pax: Mapping[str, Any]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            out[_b(key[len("SCHILY.xattr."):])] = _b(value) if isinstance(value, str) else value
    return out

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
import stat
import tarfile
import zlib
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, BinaryIO

import zstandard

from nydusfs.builder.pipeline import ChunkPipeline
from nydusfs.builder.tree import Node, check_xattrs, new_dir, resolve
from nydusfs.errors import NydusfsError, SourceError
from nydusfs.format.layout import MAX_NAME_LEN, MAX_SYMLINK_LEN

__all__ = ["TarLayers", "open_layer_stream"]

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
AUFS_META = b".wh..wh."  # .wh..wh.plnk/, .wh..wh.orph/: aufs bookkeeping
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


class _LayerStream:
    """The uncompressed tar stream as tarfile reads it, watched for the ways archives go wrong.

    - Remembers the last bytes served, so the block where tarfile stopped can be inspected
      (tarfile ends quietly on a corrupt or missing header mid-archive).
    - Refuses to be read past its end over and over: tarfile "skips" a hostile member's
      declared size by reading, and at EOF it would spin forever.
    - ``pad_eof``: serve the zero padding and end-of-archive blocks some writers omit (Debian
      12's umoci writes layers that stop right after the last member's data). Only used for
      digest-verified layers, and ``real_eof`` lets the caller reject data that was cut short.
    """

    _TAIL = 64 * 1024
    _EOF_PAD = 3 * tarfile.BLOCKSIZE
    _MAX_EOF_READS = 64

    def __init__(self, raw: Any, pad_eof: bool) -> None:
        self._raw = raw
        self._pad_eof = pad_eof
        self.count = 0  # bytes served, padding included
        self.real_eof: int | None = None  # offset where the real data ended
        self._tail = bytearray()
        self._eof_reads = 0

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        data: bytes = b"" if self.real_eof is not None else self._raw.read(n)
        if not data:
            if self.real_eof is None:
                self.real_eof = self.count
            pad = self.real_eof + self._EOF_PAD - self.count if self._pad_eof else 0
            if pad > 0:
                data = bytes(pad if n < 0 else min(n, pad))
            else:
                self._eof_reads += 1
                if self._eof_reads > self._MAX_EOF_READS:
                    raise SourceError("layer ends inside an entry (declared size too large)")
                return b""
        self.count += len(data)
        self._tail += data
        if len(self._tail) > 2 * self._TAIL:
            del self._tail[: len(self._tail) - self._TAIL]
        return data

    def block(self, offset: int, size: int = tarfile.BLOCKSIZE) -> bytes | None:
        """Bytes [offset, offset+size) if served recently (reading on if needed), else None."""
        while self.count < offset + size:
            if not self.read(offset + size - self.count):
                break
        start = offset - (self.count - len(self._tail))
        if start < 0 or offset + size > self.count:
            return None
        return bytes(self._tail[start : start + size])

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def open_layer_stream(raw: BinaryIO) -> Any:
    """Wrap a layer stream in the right decompressor, sniffed from its first bytes.

    Output is read in bounded pieces whatever the compression ratio. gzip, bz2 and xz raise on
    a truncated stream and gzip checks its CRC; the zstd reader ends quietly on truncation,
    which the tar-level end-of-archive check then catches (cut-off data never goes unnoticed).
    """
    head = raw.read(6)
    peek = _Peek(raw, head)
    if head[:4] == _ZSTD_MAGIC:
        return zstandard.ZstdDecompressor().stream_reader(
            peek, read_across_frames=True  # type: ignore[arg-type]
        )
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
        try:
            node = resolve(self.root, comps, create_layer=self.layer)
        except SourceError as exc:
            raise SourceError(f"{what}: {exc}") from exc
        assert node is not None  # creating never fails to find
        return node

    def _lookup(self, comps: list[bytes], what: str) -> Node | None:
        """The node at ``comps`` (final component not followed), or None. Changes nothing."""
        if not comps:
            return self.root
        try:
            parent = resolve(self.root, comps[:-1])
        except SourceError as exc:
            raise SourceError(f"{what}: {exc}") from exc
        return parent.kids().get(comps[-1]) if parent is not None and parent.is_dir() else None

    # ---- applying a layer ---------------------------------------------------------------

    def apply(self, raw: BinaryIO, label: str, *, verified: bool = False,
              on_member: Callable[[tarfile.TarInfo], None] | None = None) -> None:
        """Apply one layer; ``label`` names it in errors.

        ``verified``: the layer's bytes are checked against a digest by the caller (an OCI
        layer), so a missing end-of-archive marker is tolerated as Go's tar reader does; a
        plain tar file must end with one, or it counts as truncated.
        """
        self.layer += 1
        try:
            stream = _LayerStream(open_layer_stream(raw), pad_eof=verified)
            with tarfile.open(fileobj=stream, mode="r|",  # type: ignore[call-overload]
                              encoding="utf-8", errors="surrogateescape") as tar:
                for member in tar:
                    self._apply_member(tar, member, label)
                    if stream.real_eof is not None and stream.real_eof < (
                        member.offset_data + (member.size if member.isreg() else 0)
                    ):
                        raise SourceError(f"{member.name!r}: layer ends inside this entry")
                    if on_member is not None:
                        on_member(member)
                end = tar.offset
            # tarfile also stops quietly at a corrupt header or at a cut, mid-archive: only a
            # zero block where it stopped is a real end of archive.
            if stream.block(end) != bytes(tarfile.BLOCKSIZE):
                raise SourceError("corrupt or truncated tar layer (no end-of-archive marker "
                                  f"at offset {end})")
            # Drain the rest: makes the decompressor check its trailer (CRC, frame end).
            stream.drain()
        except NydusfsError as exc:
            if isinstance(exc, SourceError) and not str(exc).startswith(label):
                raise SourceError(f"{label}: {exc}") from exc
            raise
        except (tarfile.TarError, EOFError, OSError, zlib.error, zstandard.ZstdError,
                lzma.LZMAError, ValueError, OverflowError) as exc:
            raise SourceError(f"{label}: unreadable tar layer: {exc}") from exc

    def _apply_member(self, tar: tarfile.TarFile, m: tarfile.TarInfo, label: str) -> None:
        raw_name = _b(m.name)
        what = f"{label}: {raw_name.decode('utf-8', 'backslashreplace')}"
        comps = _components(raw_name)
        if any(len(c) > MAX_NAME_LEN for c in comps):
            raise SourceError(f"{what}: a name component is longer than {MAX_NAME_LEN} bytes")
        base = comps[-1] if comps else b""

        if any(c.startswith(AUFS_META) for c in comps[:-1]):
            return  # inside .wh..wh.plnk/ and the like: aufs bookkeeping, not image content
        if base.startswith(WHITEOUT):
            parent = self._walk_dirs(comps[:-1], what)
            if base == OPAQUE:
                _prune_lower(parent, self.layer)
            elif not base.startswith(AUFS_META):
                self._whiteout(parent, base[len(WHITEOUT):])
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
            if not (0 <= m.devmajor <= 0xFFFFFFFF and 0 <= m.devminor <= 0xFFFFFFFF):
                raise SourceError(f"{what}: device number out of range")
            node.rdev = _makedev(m.devmajor, m.devminor)
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
        node.mtime_ns = _mtime_ns(m, what)
        node.xattrs = check_xattrs(_pax_xattrs(m.pax_headers), what)

    def _whiteout(self, parent: Node, name: bytes) -> None:
        """Hide ``name`` as lower layers made it; what this layer put there stays (OCI spec:
        whiteouts apply to lower layers only, whatever the order within the layer)."""
        victim = parent.kids().get(name)
        if victim is None:
            return
        if victim.is_dir():
            has_current = _prune_lower(victim, self.layer)
            keep = has_current or victim.layer == self.layer
        else:
            keep = victim.layer == self.layer
        if not keep:
            del parent.kids()[name]
        elif victim.layer < self.layer:
            _as_implicit_dir(victim, self.layer)


def _makedev(major: int, minor: int) -> int:
    """glibc's ``makedev`` for 32-bit major and minor (``os.makedev`` stops at 2**31)."""
    return (((major & 0xFFFFF000) << 32) | ((major & 0xFFF) << 8)
            | ((minor & 0xFFFFFF00) << 12) | (minor & 0xFF))


def _prune_lower(d: Node, layer: int) -> bool:
    """Remove lower-layer entries under ``d``; True if anything of ``layer`` remains below.

    A lower directory kept only because this layer put something inside it is, after the
    hiding, a directory this layer created implicitly: it gets an implicit directory's
    attributes, exactly as if the layer's entries had come after the whiteout.
    """
    keep = False
    for name, child in list(d.kids().items()):
        if child.is_dir():
            has_current = _prune_lower(child, layer)
            if child.layer < layer and not has_current:
                del d.kids()[name]
            else:
                if child.layer < layer:
                    _as_implicit_dir(child, layer)
                keep = True
        elif child.layer < layer:
            del d.kids()[name]
        else:
            keep = True
    return keep


_MTIME_LIMIT = 1 << 63  # seconds must fit the format's i64


def _as_implicit_dir(node: Node, layer: int) -> None:
    fresh = new_dir(layer=layer)
    node.mode, node.uid, node.gid, node.mtime_ns = fresh.mode, fresh.uid, fresh.gid, 0
    node.xattrs = {}
    node.layer = layer


def _mtime_ns(m: tarfile.TarInfo, what: str) -> int:
    text = m.pax_headers.get("mtime")
    try:
        seconds = Decimal(text) if text is not None else Decimal(m.mtime)
        if not seconds.is_finite() or not -_MTIME_LIMIT <= seconds < _MTIME_LIMIT:
            raise SourceError(f"{what}: mtime {text or m.mtime} out of range")
        return int(seconds * 1_000_000_000)
    except (InvalidOperation, ValueError, TypeError) as exc:
        raise SourceError(f"{what}: invalid mtime {text!r}") from exc


def _pax_xattrs(pax: Mapping[str, Any]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            out[_b(key[len("SCHILY.xattr."):])] = _b(value) if isinstance(value, str) else value
    return out

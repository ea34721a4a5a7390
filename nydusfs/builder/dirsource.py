"""Directory source: read a tree's metadata from disk into ``Node``s without following symlinks.

Data is not read here: each regular file keeps its path relative to the root and the build
reads it later, in blob layout order. Names and paths are bytes end to end (any name but ``/``
and NUL works), the walk is iterative, and paths longer than ``PATH_MAX`` are reached through
directory file descriptors, so trees of any depth build. Hardlinks are detected by
(st_dev, st_ino) and become one ``Node``; link counts are recomputed from the tree, not copied
from ``st_nlink`` (a link outside the tree does not count).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from nydusfs.builder.tree import Node, check_xattrs
from nydusfs.errors import SourceError

__all__ = ["open_file", "scan_directory"]

# Stay well under PATH_MAX (4096) when building paths, leaving room for /proc/self/fd/N/.
_SHORT_PATH = 3000


@contextmanager
def _dir_fd(root: bytes, rel: bytes) -> Iterator[int]:
    """An O_DIRECTORY fd for ``root/rel``, walking in pieces when the path is too long."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        parts = [p for p in rel.split(b"/") if p]
        while parts:
            piece: list[bytes] = []
            length = 0
            while parts and (not piece or length + len(parts[0]) + 1 < _SHORT_PATH):
                length += len(parts[0]) + 1
                piece.append(parts.pop(0))
            nfd = os.open(b"/".join(piece), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                          dir_fd=fd)
            os.close(fd)
            fd = nfd
        yield fd
    finally:
        os.close(fd)


def open_file(root: bytes, rel: bytes) -> int:
    """Open a regular file of the source for reading (no symlink in the last component)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW
    if len(root) + len(rel) < _SHORT_PATH:
        return os.open(root + b"/" + rel, flags)
    head, _, name = rel.rpartition(b"/")
    with _dir_fd(root, head) as dfd:
        return os.open(name, flags, dir_fd=dfd)


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for name in sorted(names):
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed meanwhile
                raise
    return out


def _node(st: os.stat_result, xattrs: dict[bytes, bytes], target: bytes, rel: bytes) -> Node:
    mode = st.st_mode
    fmt = stat.S_IFMT(mode)
    return Node(
        mode,
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        rdev=st.st_rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0,
        size=st.st_size if fmt in (stat.S_IFREG, stat.S_IFDIR) else 0,
        target=target,
        xattrs=xattrs,
        data=rel if fmt == stat.S_IFREG else None,
    )


def scan_directory(
    root_path: str | bytes, exclude: set[tuple[int, int]] | None = None
) -> tuple[Node, list[bytes]]:
    """Read the metadata of the tree at ``root_path`` into a ``Node`` tree.

    Directories whose (st_dev, st_ino) is in ``exclude`` (the build's own output, when it lies
    inside the source) are left out; their paths are returned so the caller can say so.
    """
    excluded: list[bytes] = []
    root = os.fsencode(os.path.abspath(root_path))
    try:
        st = os.stat(root)
        if not stat.S_ISDIR(st.st_mode):
            raise SourceError(f"{os.fsdecode(root)}: not a directory")
        tree = _node(st, _xattrs(root), b"", b"")
        links: dict[tuple[int, int], Node] = {}
        todo: list[tuple[bytes, Node]] = [(b"", tree)]
        while todo:
            rel, dnode = todo.pop()
            with _dir_fd(root, rel) as dfd:
                proc = b"/proc/self/fd/%d/" % dfd
                with os.scandir(dfd) as it:
                    names = sorted(os.fsencode(e.name) for e in it)
                for name in names:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    child_rel = rel + b"/" + name if rel else name
                    key = (st.st_dev, st.st_ino)
                    if exclude and stat.S_ISDIR(st.st_mode) and key in exclude:
                        excluded.append(child_rel)
                        continue
                    if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in links:
                        dnode.kids()[name] = links[key]
                        continue
                    target = (os.readlink(name, dir_fd=dfd)
                              if stat.S_ISLNK(st.st_mode) else b"")
                    xattrs = check_xattrs(_xattrs(proc + name), os.fsdecode(child_rel))
                    node = _node(st, xattrs, os.fsencode(target), child_rel)
                    if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                        links[key] = node
                    dnode.kids()[name] = node
                    if node.is_dir():
                        todo.append((child_rel, node))
    except OSError as exc:
        raise SourceError(f"{os.fsdecode(root)}: cannot read source tree: {exc}") from exc
    return tree, excluded

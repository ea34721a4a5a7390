"""The builder's in-memory tree: what every source (directory, tar layers, OCI image) produces.

Only metadata lives here; file data stays on disk (a directory source keeps the path) or is
chunked into the spool as a tar streams past (a tar source fills ``Node.chunks``). A hardlink is
one ``Node`` object named by several directory entries, so link counts fall out of the shape.

This module also fixes the two orders the format depends on, both pure functions of the tree:
inode numbers (depth-first, names in byte order, so a directory's subdirectories always get
larger numbers) and blob layout (prefetch files first, then each directory's regular files
together, so a ranged read of neighbours fetches what the next ``open`` wants).
"""

from __future__ import annotations

import stat
from collections.abc import Iterator

from nydusfs.errors import SourceError
from nydusfs.format import layout as L

__all__ = ["Node", "check_xattrs", "inode_order", "layout_order", "new_dir", "resolve"]

MAX_SYMLINK_HOPS = 40  # as Linux's path walk


class Node:
    """One inode. ``children`` is set for directories only; ``chunks`` once data is chunked."""

    __slots__ = (
        "children", "chunks", "data", "gid", "layer", "mode", "mtime_ns", "rdev", "size",
        "target", "uid", "xattrs",
    )

    def __init__(
        self,
        mode: int,
        *,
        uid: int = 0,
        gid: int = 0,
        mtime_ns: int = 0,
        rdev: int = 0,
        size: int = 0,
        target: bytes = b"",
        xattrs: dict[bytes, bytes] | None = None,
        data: bytes | None = None,
        layer: int = 0,
    ) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.rdev = rdev
        self.size = size
        self.target = target
        self.xattrs: dict[bytes, bytes] = xattrs if xattrs is not None else {}
        # Where a directory source finds the file's bytes (path relative to the source root).
        self.data = data
        self.layer = layer
        self.children: dict[bytes, Node] | None = {} if stat.S_ISDIR(mode) else None
        self.chunks: list[bytes] | None = None

    def is_dir(self) -> bool:
        return self.children is not None

    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def kids(self) -> dict[bytes, Node]:
        """Children of a directory (raises for anything else: a builder bug, not bad input)."""
        assert self.children is not None, "not a directory"
        return self.children


def new_dir(mode: int = 0o755, layer: int = 0) -> Node:
    """A directory created implicitly (a tar names ``a/b/c`` without ``a/``): root-owned, 0755."""
    return Node(stat.S_IFDIR | (mode & 0o7777), layer=layer)


def check_xattrs(xattrs: dict[bytes, bytes], what: str) -> dict[bytes, bytes]:
    """Reject, naming the path, xattrs the format cannot hold (Linux could not either)."""
    total = 0
    for name, value in xattrs.items():
        if not 0 < len(name) <= L.MAX_XATTR_NAME_LEN or b"\x00" in name:
            raise SourceError(f"{what}: invalid xattr name {name[:40]!r}")
        if len(value) > L.MAX_XATTR_VALUE_LEN:
            raise SourceError(f"{what}: xattr {name!r} value longer than 64 KiB")
        total += len(name) + len(value)
    if total > L.MAX_XATTR_TOTAL:
        raise SourceError(f"{what}: xattrs exceed {L.MAX_XATTR_TOTAL} bytes in all")
    return xattrs


def resolve(root: Node, comps: list[bytes], *, create_layer: int | None = None) -> Node | None:
    """Follow ``comps`` from ``root`` the way containerd's RootPath does: symlinks are resolved
    *inside the tree* (absolute targets from ``root``), ``..`` never climbs above ``root``.

    With ``create_layer`` every component must end up a directory, as on extraction: missing
    ones are created (implicit directories of that layer) and non-directories replaced.
    Without it, nothing changes: None if a component is missing or not a directory, and the
    last component may be any file (symlinks included are followed).
    Raises ``SourceError`` for a symlink loop.
    """
    stack = [root]
    todo = list(comps)
    hops = 0
    while todo:
        comp = todo.pop(0)
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            if len(stack) > 1:
                stack.pop()
            continue
        cur = stack[-1]
        if not cur.is_dir():
            return None  # a file in the middle of a path (never when creating)
        child = cur.kids().get(comp)
        if child is not None and stat.S_ISLNK(child.mode):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise SourceError("too many levels of symbolic links")
            if child.target.startswith(b"/"):
                stack = [root]
            todo = child.target.split(b"/") + todo
            continue
        if create_layer is not None and (child is None or not child.is_dir()):
            child = cur.kids()[comp] = new_dir(layer=create_layer)
        elif child is None:
            return None
        stack.append(child)
    return stack[-1]


def _sorted_items(d: Node) -> list[tuple[bytes, Node]]:
    return sorted(d.kids().items(), key=lambda kv: kv[0])


def inode_order(root: Node) -> Iterator[tuple[Node, Node, bytes]]:
    """Yield (node, parent, name) in inode-number order, each node once (hardlinks: first name).

    Depth-first pre-order with names in byte order; iterative so any depth works.
    """
    seen: set[int] = {id(root)}
    yield root, root, b""
    stack: list[Iterator[tuple[bytes, Node]]] = [iter(_sorted_items(root))]
    parents = [root]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            parents.pop()
            continue
        name, node = item
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node, parents[-1], name
        if node.is_dir():
            stack.append(iter(_sorted_items(node)))
            parents.append(node)


def layout_order(root: Node, first: list[Node]) -> list[Node]:
    """Regular files in blob order: ``first`` (the prefetch list), then directory by directory.

    Within a directory its files come together in name order, before any subdirectory's files.
    Each file appears once (a hardlinked file where first met).
    """
    out: list[Node] = []
    seen: set[int] = set()
    for node in first:
        if id(node) not in seen:
            seen.add(id(node))
            out.append(node)
    dirs = [root]
    while dirs:
        d = dirs.pop()
        subdirs = []
        for _name, node in _sorted_items(d):
            if node.is_dir():
                subdirs.append(node)
            elif node.is_reg() and id(node) not in seen:
                seen.add(id(node))
                out.append(node)
        dirs.extend(reversed(subdirs))
    return out

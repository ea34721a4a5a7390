"""A rootfs-like tree with every inode type, and a snapshot of what a reader observes in it.

``build_full_tree`` (and its ``None``-returning alias ``make_full_tree``) creates, as root, a
tree meant for builder round trips: regular files (empty, small, multi-MiB random content over
several 1 MiB chunks, sparse, duplicated), a directory chain ~300 levels deep whose full path is
longer than PATH_MAX, symlinks (relative, absolute, dangling, escaping the tree, long, looping,
hardlinked), a file with three names in three directories, character and block devices, a FIFO,
a UNIX socket, setuid/setgid/sticky modes, assorted owners, nanosecond mtimes (before 1970 and
after 2038 too) and xattrs (``user.*``, ``trusted.*``, ``security.capability``), plus names that
are arbitrary bytes (non-UTF-8, spaces, newlines, control bytes, 255 bytes long).

Everything is done relative to directory file descriptors, so nothing depends on the length of
the full path; xattrs, which have no ``*at`` syscalls, go through ``/proc/self/fd/N/name``.

``snapshot_tree`` is the observation side: for every path, in ``Bootstrap.walk`` notation
(``b"/"`` for the root, ``b"/a/b"`` below it), a dict of what ``lstat``/``readlink``/
``getxattr``/``read`` report. Two trees that a reader cannot tell apart have equal snapshots.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CAP_NET_BIND_SERVICE_V2",
    "DEEP_DEPTH",
    "FullTreeInfo",
    "Snapshot",
    "build_full_tree",
    "make_full_tree",
    "read_file_at",
    "snapshot_tree",
]

MiB = 1 << 20
SEED = 0x6466_6E79  # "dfny"
DEEP_DEPTH = 300

# A valid VFS_CAP_REVISION_2 blob: magic_etc (revision 2 | effective), then permitted/inheritable
# for the low and high 32 capabilities. Permitted: CAP_NET_BIND_SERVICE (bit 10).
CAP_NET_BIND_SERVICE_V2 = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)

Snapshot = dict[bytes, dict[str, Any]]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class FullTreeInfo:
    """What ``build_full_tree`` made; paths are in walk notation (``b"/files/small.txt"``)."""

    root: Path
    # xattr namespaces actually set ("user", "trusted", "security") and those the fs refused.
    xattr_kinds: frozenset[str]
    xattr_refused: frozenset[str]
    deep_dir: bytes  # the deepest directory of the chain
    deep_depth: int  # number of components of deep_dir
    hardlinks: tuple[bytes, ...]  # three names of one regular file
    symlink_hardlinks: tuple[bytes, ...]  # two names of one symlink inode
    dedup_pair: tuple[bytes, bytes]  # two distinct inodes with identical multi-chunk content
    big_files: tuple[bytes, ...]  # random content spanning several 1 MiB chunks
    sparse_file: bytes
    sparse_has_holes: bool  # st_blocks shows unallocated ranges
    devices: tuple[bytes, ...]
    fifo: bytes
    sock: bytes
    odd_names: tuple[bytes, ...]
    paths: dict[str, bytes] = field(default_factory=dict)  # role -> path, everything else


class _Clock:
    """Deterministic, distinct nanosecond mtimes (nanoseconds vary, never a whole second)."""

    def __init__(self) -> None:
        self.ns = 1_700_000_000_123_456_789

    def next(self) -> int:
        self.ns += 1_000_003_007
        return self.ns


class _Maker:
    """Create entries relative to the tree root's fd; remembers what needs an mtime later."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(root, _DIR_FLAGS)
        self.rng = random.Random(SEED)
        self.clock = _Clock()
        self.dirs: list[bytes] = []  # relative paths, for the final mtime pass
        self.xattr_kinds: set[str] = set()
        self.xattr_refused: set[str] = set()

    def close(self) -> None:
        os.close(self.fd)

    # -- attributes ---------------------------------------------------------------------

    def own(self, rel: bytes, uid: int, gid: int, fd: int | None = None) -> None:
        os.chown(rel, uid, gid, dir_fd=self.fd if fd is None else fd, follow_symlinks=False)

    def chmod(self, rel: bytes, mode: int, fd: int | None = None) -> None:
        # chown clears setuid/setgid, so callers chmod after chown.
        os.chmod(rel, mode, dir_fd=self.fd if fd is None else fd)

    def mtime(self, rel: bytes, ns: int | None = None, fd: int | None = None) -> None:
        t = self.clock.next() if ns is None else ns
        os.utime(rel, ns=(t, t), dir_fd=self.fd if fd is None else fd, follow_symlinks=False)

    def xattr(self, rel: bytes, name: str, value: bytes, fd: int | None = None) -> bool:
        """Set one xattr (never following symlinks); False if the fs does not support it."""
        kind = name.split(".", 1)[0]
        if kind in self.xattr_refused:
            return False
        path = b"/proc/self/fd/%d/%s" % (self.fd if fd is None else fd, rel)
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            self.xattr_refused.add(kind)
            return False
        self.xattr_kinds.add(kind)
        return True

    # -- entries ------------------------------------------------------------------------

    def mkdir(self, rel: bytes, mode: int = 0o755) -> bytes:
        os.mkdir(rel, dir_fd=self.fd)
        self.chmod(rel, mode)  # umask-free
        self.dirs.append(rel)
        return rel

    def file(self, rel: bytes, data: bytes = b"", mode: int = 0o644) -> bytes:
        fd = os.open(rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                     dir_fd=self.fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        self.chmod(rel, mode)
        return rel

    def random_bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def symlink(self, rel: bytes, target: bytes) -> bytes:
        os.symlink(target, rel, dir_fd=self.fd)
        return rel

    def link(self, existing: bytes, rel: bytes) -> bytes:
        os.link(existing, rel, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)
        return rel


def _walk(rel: bytes) -> bytes:
    return b"/" + rel


def build_full_tree(root: Path) -> FullTreeInfo:
    """Create the tree at ``root`` (created if missing, must be empty); needs root privileges."""
    m = _Maker(root)
    try:
        return _build(m, root)
    finally:
        m.close()


def make_full_tree(root: Path) -> None:
    """Create the full test tree at ``root``; see ``build_full_tree`` for what it returns."""
    build_full_tree(root)


def _build(m: _Maker, root: Path) -> FullTreeInfo:
    paths: dict[str, bytes] = {}
    mtimed: list[bytes] = []  # non-directories, in creation order

    for d in (b"files", b"files/sub", b"links", b"links/a", b"links/b", b"dev", b"run",
              b"modes", b"owners", b"names", b"xattrs", b"empty_dir", b"deep"):
        m.mkdir(d)

    # ---- regular files ------------------------------------------------------------------
    paths["empty"] = m.file(b"files/empty")
    paths["small"] = m.file(b"files/small.txt", b"hello, nydus\n")
    paths["one_chunk"] = m.file(b"files/exactly_1MiB.bin", m.random_bytes(MiB))
    big = (
        m.file(b"files/big1.bin", m.random_bytes(3 * MiB + 12345)),
        m.file(b"files/big2.bin", m.random_bytes(2 * MiB)),
        m.file(b"files/sub/big3.bin", m.random_bytes(4 * MiB + 1)),
    )
    line = b"the quick brown fox jumps over the lazy dog %d\n"
    text = b"".join(line % i for i in range(60_000))  # ~2.8 MiB, compresses well
    paths["text"] = m.file(b"files/compressible.txt", text)
    dup = m.random_bytes(MiB + MiB // 2 + 7)
    dedup = (m.file(b"files/dup_a.bin", dup), m.file(b"files/sub/dup_b.bin", dup))
    # Sparse: data islands between holes, and a trailing hole made by truncate.
    sparse = b"files/sparse.img"
    fd = os.open(sparse, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644,
                 dir_fd=m.fd)
    try:
        os.pwrite(fd, m.random_bytes(5000), MiB + 100)
        os.pwrite(fd, m.random_bytes(4096), 6 * MiB)
        os.ftruncate(fd, 10 * MiB + 3)
        sparse_st = os.fstat(fd)
    finally:
        os.close(fd)
    mtimed += [paths["empty"], paths["small"], paths["one_chunk"], *big, paths["text"],
               *dedup, sparse]
    paths["epoch"] = m.file(b"files/epoch", b"1970\n")
    paths["pre_epoch"] = m.file(b"files/pre_epoch", b"1969\n")
    paths["y2100"] = m.file(b"files/y2100", b"2100\n")
    paths["whole_second"] = m.file(b"files/whole_second", b"0 ns\n")
    m.mtime(paths["epoch"], 0)
    m.mtime(paths["pre_epoch"], -1_500_000_000)  # 1969-12-31T23:59:58.5
    m.mtime(paths["y2100"], 4_102_444_800_987_654_321)
    m.mtime(paths["whole_second"], 1_600_000_000 * 10**9)

    # ---- symlinks -----------------------------------------------------------------------
    paths["sym_rel"] = m.symlink(b"links/rel", b"../files/small.txt")
    paths["sym_abs"] = m.symlink(b"links/abs", b"/etc/passwd")
    paths["sym_dangling"] = m.symlink(b"links/dangling", b"does/not/exist")
    paths["sym_outside"] = m.symlink(b"links/outside", b"../../etc/passwd")
    paths["sym_dir"] = m.symlink(b"links/dir", b"../files")
    paths["sym_loop"] = m.symlink(b"links/loop", b"loop")
    paths["sym_long"] = m.symlink(b"links/long", b"/".join([b"c" * 99] * 40))  # 3999 bytes
    paths["sym_binary"] = m.symlink(b"links/binary", b"\xff\xfe/tar get\n")
    sym_hl = (m.symlink(b"links/sym_hl", b"small.txt"), m.link(b"links/sym_hl", b"links/a/sym_hl"))
    mtimed += [v for k, v in paths.items() if k.startswith("sym_")] + [sym_hl[0]]

    # ---- hardlinks: one inode, three names, three directories ----------------------------
    first = m.file(b"links/a/hardlink", b"one inode, three names\n")
    hl = (first, m.link(first, b"links/b/hardlink2"), m.link(first, b"hardlink3"))
    mtimed.append(first)

    # ---- devices, FIFO, socket ----------------------------------------------------------
    devices = (b"dev/null", b"dev/sda", b"dev/bigdev")
    os.mknod(devices[0], stat.S_IFCHR | 0o666, os.makedev(1, 3), dir_fd=m.fd)
    os.mknod(devices[1], stat.S_IFBLK | 0o660, os.makedev(8, 0), dir_fd=m.fd)
    os.mknod(devices[2], stat.S_IFCHR | 0o600, os.makedev(511, 300_000), dir_fd=m.fd)
    m.own(devices[1], 0, 6)
    m.chmod(devices[0], 0o666)
    m.chmod(devices[1], 0o660)
    fifo = b"run/fifo"
    os.mkfifo(fifo, 0o640, dir_fd=m.fd)
    m.own(fifo, 1000, 1000)
    m.chmod(fifo, 0o640)
    sock = b"run/sock"
    _bind_unix_socket(m.fd, b"run", b"sock")
    m.chmod(sock, 0o755)
    mtimed += [*devices, fifo, sock]

    # ---- special mode bits (chown before chmod: chown clears setuid/setgid) --------------
    paths["setuid"] = m.file(b"modes/setuid_bin", b"\x7fELF-ish setuid\n")
    m.chmod(paths["setuid"], 0o4755)
    paths["setgid_file"] = m.file(b"modes/setgid_bin", b"setgid\n")
    m.own(paths["setgid_file"], 0, 50)
    m.chmod(paths["setgid_file"], 0o2711)
    paths["all_bits"] = m.file(b"modes/all_bits", b"7777\n")
    m.chmod(paths["all_bits"], 0o7777)
    paths["no_perms"] = m.file(b"modes/no_perms", b"0000\n", mode=0o000)
    paths["setgid_dir"] = m.mkdir(b"modes/setgid_dir", 0o2755)
    m.own(paths["setgid_dir"], 0, 50)
    m.chmod(paths["setgid_dir"], 0o2755)
    paths["sticky_dir"] = m.mkdir(b"modes/sticky_tmp", 0o1777)
    paths["private_dir"] = m.mkdir(b"modes/private", 0o700)
    m.file(b"modes/sticky_tmp/inside", b"in /tmp\n", mode=0o600)
    mtimed += [paths["setuid"], paths["setgid_file"], paths["all_bits"], paths["no_perms"],
               b"modes/sticky_tmp/inside"]

    # ---- owners -------------------------------------------------------------------------
    for rel, uid, gid in ((b"owners/user1000", 1000, 1000), (b"owners/nobody", 65534, 65534),
                          (b"owners/big_ids", 123456, 654321)):
        paths[os.fsdecode(rel)] = m.file(rel, b"owned by %d:%d\n" % (uid, gid))
        m.own(rel, uid, gid)
        mtimed.append(rel)
    paths["owned_dir"] = m.mkdir(b"owners/dir1000")
    m.own(b"owners/dir1000", 1000, 1000)
    paths["owned_symlink"] = m.symlink(b"owners/link1000", b"user1000")
    m.own(b"owners/link1000", 1000, 1001)
    mtimed.append(b"owners/link1000")

    # ---- names: any bytes but "/" and NUL ------------------------------------------------
    odd = (b"\xff\xfe", b"with space", b" ", b"new\nline", b"tab\there", b"\x01\x7f\x1b[0m",
           "ünïcødé".encode(), b"-leading-dash", b".hidden", b"...", b"L" * 255,
           b"\xe9" * 255, b"a", b"a\x80", b"B")
    for name in odd:
        m.file(b"names/" + name, b"name %r\n" % name)
        mtimed.append(b"names/" + name)
    m.mkdir(b"names/dir\xff\n")
    m.file(b"names/dir\xff\n/\xc3\x28", b"invalid 2-byte sequence\n")
    mtimed.append(b"names/dir\xff\n/\xc3\x28")

    # ---- xattrs -------------------------------------------------------------------------
    xf = m.file(b"xattrs/file", b"xattrs here\n")
    m.xattr(xf, "user.mime_type", b"text/plain")
    m.xattr(xf, "user.empty", b"")
    m.xattr(xf, "user.binary", bytes(range(256)))
    m.xattr(xf, "user.big", m.random_bytes(2000))
    m.xattr(xf, "trusted.note", b"root only")
    xd = m.mkdir(b"xattrs/dir")
    m.xattr(xd, "user.dirattr", b"d")
    m.xattr(xd, "trusted.overlay.opaque", b"y")
    cap = m.file(b"xattrs/ping", b"\x7fELF-ish ping\n", mode=0o755)
    m.xattr(cap, "security.capability", CAP_NET_BIND_SERVICE_V2)
    m.xattr(paths["sym_rel"], "trusted.on_symlink", b"link")  # user.* is refused on symlinks
    m.xattr(fifo, "trusted.on_fifo", b"fifo")
    m.xattr(hl[0], "user.shared_by_hardlinks", b"3")
    m.xattr(b".", "user.root", b"r")
    paths.update(xattr_file=xf, xattr_dir=xd, xattr_cap=cap)
    mtimed += [xf, cap]

    # ---- deep chain (full path > PATH_MAX): fds all the way down -------------------------
    deep_rel = _build_deep_chain(m, b"deep")

    # ---- mtimes: non-directories, then directories deepest first, the root last ----------
    for rel in mtimed:
        m.mtime(rel)
    for rel in sorted(m.dirs, key=lambda p: p.count(b"/"), reverse=True):
        m.mtime(rel)
    os.utime(m.fd, ns=(m.clock.next(), m.clock.ns))
    m.chmod(b".", 0o755)

    return FullTreeInfo(
        root=root,
        xattr_kinds=frozenset(m.xattr_kinds),
        xattr_refused=frozenset(m.xattr_refused),
        deep_dir=_walk(deep_rel),
        deep_depth=deep_rel.count(b"/") + 1,
        hardlinks=tuple(_walk(p) for p in hl),
        symlink_hardlinks=tuple(_walk(p) for p in sym_hl),
        dedup_pair=(_walk(dedup[0]), _walk(dedup[1])),
        big_files=tuple(_walk(p) for p in big),
        sparse_file=_walk(sparse),
        sparse_has_holes=sparse_st.st_blocks * 512 < sparse_st.st_size,
        devices=tuple(_walk(p) for p in devices),
        fifo=_walk(fifo),
        sock=_walk(sock),
        odd_names=tuple(_walk(b"names/" + n) for n in odd),
        paths={k: _walk(v) for k, v in paths.items()},
    )


def _bind_unix_socket(dir_fd: int, rel_dir: bytes, name: bytes) -> None:
    """Bind (then close) an AF_UNIX socket at rel_dir/name; binds relative so sun_path is short."""
    target = os.open(rel_dir, _DIR_FLAGS, dir_fd=dir_fd)
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fchdir(target)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(name)
    finally:
        os.fchdir(cwd)
        os.close(cwd)
        os.close(target)


def _build_deep_chain(m: _Maker, base: bytes) -> bytes:
    """``DEEP_DEPTH - 1`` nested directories under ``base`` with a file and symlink at the bottom.

    Returns the relative path of the deepest directory. Only two fds are open at any time; the
    bottom-up mtime pass climbs back with ``..``.
    """
    names = [b"level%03d-%s" % (i, b"x" * 12) for i in range(DEEP_DEPTH - 1)]
    fd = os.open(base, _DIR_FLAGS, dir_fd=m.fd)
    try:
        for name in names:
            os.mkdir(name, 0o755, dir_fd=fd)
            os.chmod(name, 0o755, dir_fd=fd)
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        # The bottom: a file with an owner and an xattr, and a relative symlink.
        bottom = os.open(b"bottom.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         0o644, dir_fd=fd)
        try:
            os.write(bottom, b"%d levels down\n" % DEEP_DEPTH)
        finally:
            os.close(bottom)
        os.chmod(b"bottom.txt", 0o644, dir_fd=fd)
        os.chown(b"bottom.txt", 1000, 1000, dir_fd=fd, follow_symlinks=False)
        m.xattr(b"bottom.txt", "user.depth", str(DEEP_DEPTH).encode(), fd=fd)
        os.symlink(b"../" * 5 + b"x", b"up", dir_fd=fd)
        m.mtime(b"bottom.txt", fd=fd)
        m.mtime(b"up", fd=fd)
        # Directory mtimes, deepest first, climbing with "..".
        for _ in names:
            t = m.clock.next()
            os.utime(fd, ns=(t, t))
            parent = os.open(b"..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
    finally:
        os.close(fd)
    return base + b"/" + b"/".join(names)


# ---- observation --------------------------------------------------------------------------

_TYPES = {
    stat.S_IFDIR: "dir", stat.S_IFREG: "reg", stat.S_IFLNK: "lnk", stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "sock",
}


def _xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise
    return tuple(sorted(
        (os.fsencode(n), os.getxattr(path, n, follow_symlinks=False)) for n in names
    ))


def _describe(st: os.stat_result, xattr_path: bytes) -> dict[str, Any]:
    ftype = stat.S_IFMT(st.st_mode)
    d: dict[str, Any] = {
        "type": _TYPES[ftype],
        "mode": st.st_mode,  # file type and permission bits, incl. setuid/setgid/sticky
        "uid": st.st_uid,
        "gid": st.st_gid,
        "nlink": st.st_nlink,
        "mtime_ns": st.st_mtime_ns,
        "xattrs": _xattrs(xattr_path),
    }
    if ftype != stat.S_IFDIR:
        d["size"] = st.st_size
    if ftype in (stat.S_IFCHR, stat.S_IFBLK):
        d["rdev"] = st.st_rdev
    return d


def _sha256_at(dir_fd: int, name: bytes) -> str:
    h = hashlib.sha256()
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        while block := os.read(fd, MiB):
            h.update(block)
    finally:
        os.close(fd)
    return h.hexdigest()


def snapshot_tree(root: Path) -> Snapshot:
    """What a reader observes at every path under ``root`` (walk notation, ``b"/"`` = root).

    Keys of each entry: ``type`` ("dir", "reg", "lnk", "chr", "blk", "fifo", "sock"), ``mode``
    (full ``st_mode``), ``uid``, ``gid``, ``nlink``, ``mtime_ns``, ``xattrs`` (sorted tuple of
    (name, value) bytes pairs), ``size`` (not for directories), ``rdev`` (devices), ``target``
    (symlinks), ``sha256`` (hex, regular files) and ``link_group`` (non-directories: the
    smallest path naming the same inode, so names of one inode share it). Iterative with dir
    fds: works at any depth.
    """
    out: Snapshot = {}
    groups: dict[tuple[int, int], list[bytes]] = {}
    root_fd = os.open(root, _DIR_FLAGS)
    out[b"/"] = _describe(os.fstat(root_fd), b"/proc/self/fd/%d/." % root_fd)
    stack: list[tuple[bytes, int]] = [(b"/", root_fd)]
    try:
        while stack:
            path, fd = stack.pop()
            try:
                with os.scandir(fd) as it:
                    names = sorted(os.fsencode(e.name) for e in it)
                prefix = path if path == b"/" else path + b"/"
                for name in names:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    child = prefix + name
                    d = out[child] = _describe(st, b"/proc/self/fd/%d/%s" % (fd, name))
                    if stat.S_ISDIR(st.st_mode):
                        stack.append((child, os.open(name, _DIR_FLAGS, dir_fd=fd)))
                        continue
                    groups.setdefault((st.st_dev, st.st_ino), []).append(child)
                    if stat.S_ISLNK(st.st_mode):
                        d["target"] = os.readlink(name, dir_fd=fd)
                    elif stat.S_ISREG(st.st_mode):
                        d["sha256"] = _sha256_at(fd, name)
            finally:
                os.close(fd)
    finally:
        for _, fd in stack:
            os.close(fd)
    for names in groups.values():
        group = min(names)
        for p in names:
            out[p]["link_group"] = group
    return out


def read_file_at(root: Path, path: bytes) -> bytes:
    """Content of the regular file at walk-notation ``path`` under ``root``, at any depth."""
    parts = [p for p in path.split(b"/") if p]
    if not parts:
        raise IsADirectoryError(path)
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        f = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)
    with os.fdopen(f, "rb") as fh:
        return fh.read()

"""Fixture helpers for the builder tests: tar layers made in memory, images read back, the CLI.

Tar members are built with ``tarfile`` from byte names (``surrogateescape`` round-trips any
byte), so a test states a layer as a list of ``reg``/``dir_``/``sym``/``whiteout``... calls.
An image is read back only through the format API (``Bootstrap``) plus the blob files, the way a
mount would: ``image_snapshot`` gives the same shape as ``treegen.snapshot_tree`` so a built
image and a directory on disk compare with one ``==``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import zstandard

from nydusfs.builder import BuildOptions, BuildResult, build
from nydusfs.format.chunk import decode
from nydusfs.format.reader import Bootstrap
from nydusfs.format.records import ChunkRecord, Inode

MiB = 1 << 20
NYDUSFS = Path(sys.executable).with_name("nydusfs")
DEFAULT_MTIME = 1_700_000_000

# VFS_CAP_REVISION_2, CAP_NET_RAW (bit 13) permitted+effective: binary, with NUL bytes.
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")

Member = tuple[tarfile.TarInfo, bytes | None]
Snapshot = dict[bytes, dict[str, Any]]

# ---- tar layers -----------------------------------------------------------------------------


def _s(name: str | bytes) -> str:
    return name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name


def _info(
    name: str | bytes,
    kind: bytes,
    *,
    mode: int,
    uid: int = 0,
    gid: int = 0,
    mtime: int = DEFAULT_MTIME,
    mtime_pax: str | None = None,
    xattrs: Mapping[str, bytes] | None = None,
) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(_s(name))
    ti.type = kind
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.uname = ti.gname = ""
    ti.mtime = mtime
    pax: dict[str, str] = {}
    if mtime_pax is not None:
        pax["mtime"] = mtime_pax
    for key, value in (xattrs or {}).items():
        pax["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
    ti.pax_headers = pax
    return ti


def reg(name: str | bytes, data: bytes = b"", *, mode: int = 0o644, uid: int = 0, gid: int = 0,
        mtime: int = DEFAULT_MTIME, mtime_pax: str | None = None,
        xattrs: Mapping[str, bytes] | None = None) -> Member:
    ti = _info(name, tarfile.REGTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime,
               mtime_pax=mtime_pax, xattrs=xattrs)
    ti.size = len(data)
    return ti, data


def dir_(name: str | bytes, *, mode: int = 0o755, uid: int = 0, gid: int = 0,
         mtime: int = DEFAULT_MTIME, xattrs: Mapping[str, bytes] | None = None) -> Member:
    return _info(name, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime,
                 xattrs=xattrs), None


def sym(name: str | bytes, target: str | bytes, *, uid: int = 0, gid: int = 0,
        mtime: int = DEFAULT_MTIME) -> Member:
    ti = _info(name, tarfile.SYMTYPE, mode=0o777, uid=uid, gid=gid, mtime=mtime)
    ti.linkname = _s(target)
    return ti, None


def hardlink(name: str | bytes, target: str | bytes) -> Member:
    ti = _info(name, tarfile.LNKTYPE, mode=0o644)
    ti.linkname = _s(target)
    return ti, None


def device(name: str | bytes, kind: str, major: int, minor: int, *, mode: int = 0o660,
           uid: int = 0, gid: int = 0) -> Member:
    ti = _info(name, tarfile.CHRTYPE if kind == "c" else tarfile.BLKTYPE, mode=mode, uid=uid,
               gid=gid)
    ti.devmajor, ti.devminor = major, minor
    return ti, None


def fifo(name: str | bytes, *, mode: int = 0o600) -> Member:
    return _info(name, tarfile.FIFOTYPE, mode=mode), None


def whiteout(path: str | bytes) -> Member:
    """``dir/.wh.name``: hides ``dir/name`` of the lower layers."""
    p = path.encode() if isinstance(path, str) else path
    head, _, base = p.rpartition(b"/")
    return reg((head + b"/" if head else b"") + b".wh." + base, mode=0o600)


def opaque(dirpath: str | bytes) -> Member:
    """``dir/.wh..wh..opq``: hides everything lower layers put in ``dir``."""
    p = dirpath.encode() if isinstance(dirpath, str) else dirpath
    return reg(p.rstrip(b"/") + b"/.wh..wh..opq", mode=0o600)


def tar_bytes(members: Iterable[Member], *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


COMPRESSIONS = ("tar", "gz", "zst", "bz2", "xz")


def compress(data: bytes, kind: str) -> bytes:
    if kind == "tar":
        return data
    if kind == "gz":
        return gzip.compress(data, mtime=0)
    if kind == "zst":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if kind == "bz2":
        return bz2.compress(data)
    if kind == "xz":
        return lzma.compress(data)
    raise ValueError(kind)


def write_layer(path: Path, members: Iterable[Member], kind: str = "tar") -> Path:
    path.write_bytes(compress(tar_bytes(members), kind))
    return path


# ---- directories on disk ---------------------------------------------------------------------


def write_tree(root: Path, files: Mapping[str | bytes, bytes]) -> None:
    """Create regular files (and their parent directories) under ``root``."""
    rootb = os.fsencode(root)
    for rel, data in files.items():
        p = rootb + b"/" + (rel.encode() if isinstance(rel, str) else rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)


def dir_listing(root: Path) -> dict[bytes, tuple[int, int, int]]:
    """Every path under ``root`` (not following symlinks) → (mode, size, mtime_ns)."""
    out: dict[bytes, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


# ---- building and reading images -------------------------------------------------------------


def build_image(sources: Sequence[str | Path], out: Path, **options: Any) -> BuildResult:
    return build([os.fspath(s) for s in sources], out, BuildOptions(**options))


def read_chunk(boot: Bootstrap, blob_dir: Path, rec: ChunkRecord) -> bytes:
    """One chunk, read the way a mount would: pread its extent and decode (digest checked)."""
    with open(blob_dir / boot.blob(rec.blob_index).hex, "rb") as f:
        payload = os.pread(f.fileno(), rec.compressed_size, rec.compressed_offset)
    return decode(payload, rec.flags, rec.uncompressed_size, rec.digest)


def read_file(boot: Bootstrap, blob_dir: Path, node: Inode | int | str | bytes) -> bytes:
    """A regular file's bytes, reassembled from its chunks."""
    ino = boot.resolve(node) if isinstance(node, str | bytes) else node
    parts: list[bytes] = []
    for ref in boot.file_chunks(ino):
        assert ref.file_offset == sum(len(p) for p in parts)
        parts.append(read_chunk(boot, blob_dir, ref.chunk))
    data = b"".join(parts)
    size = boot.inode(ino).size if isinstance(ino, int) else ino.size
    assert len(data) == size
    return data


_TYPES = {
    stat.S_IFDIR: "dir", stat.S_IFREG: "reg", stat.S_IFLNK: "lnk", stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "sock",
}


def image_snapshot(boot: Bootstrap, blob_dir: Path | None) -> Snapshot:
    """What a reader of the image observes at every path, keyed as ``treegen.snapshot_tree``.

    Without ``blob_dir`` regular files get no ``sha256``.
    """
    out: Snapshot = {}
    names: dict[int, list[bytes]] = {}
    for path, node in boot.walk():
        ftype = stat.S_IFMT(node.mode)
        d: dict[str, Any] = {
            "type": _TYPES[ftype],
            "mode": node.mode,
            "uid": node.uid,
            "gid": node.gid,
            "nlink": node.nlink,
            "mtime_ns": node.mtime_ns,
            "xattrs": tuple(sorted((x.name, x.value) for x in boot.xattrs(node))),
        }
        if ftype != stat.S_IFDIR:
            d["size"] = node.size
            names.setdefault(node.ino, []).append(path)
        if ftype in (stat.S_IFCHR, stat.S_IFBLK):
            d["rdev"] = node.rdev
        if ftype == stat.S_IFLNK:
            d["target"] = boot.readlink(node)
        if ftype == stat.S_IFREG and blob_dir is not None:
            d["sha256"] = hashlib.sha256(read_file(boot, blob_dir, node)).hexdigest()
        out[path] = d
    for group in names.values():
        first = min(group)
        for p in group:
            out[p]["link_group"] = first
    return out


def blob_plaintext(boot: Bootstrap, blob_dir: Path, blob_index: int = 0) -> bytes:
    """All data stored in one blob, decoded, in blob order.

    Asserts that the chunk extents of the blob tile it exactly, so no byte of the blob file
    escapes the search (nothing stored beside the referenced chunks).
    """
    blob = boot.blob(blob_index)
    recs = sorted((c for c in boot.chunks() if c.blob_index == blob_index),
                  key=lambda c: c.compressed_offset)
    pos = 0
    parts: list[bytes] = []
    for c in recs:
        assert c.compressed_offset == pos, f"gap or overlap in blob at {pos}"
        pos += c.compressed_size
        parts.append(read_chunk(boot, blob_dir, c))
    assert pos == blob.size == (blob_dir / blob.hex).stat().st_size
    return b"".join(parts)


def chunk_extents(boot: Bootstrap, node: Inode | int | str | bytes) -> list[tuple[int, int]]:
    """(compressed_offset, compressed_size) of a file's chunks, in file order."""
    ino = boot.resolve(node) if isinstance(node, str | bytes) else node
    return [(r.chunk.compressed_offset, r.chunk.compressed_size) for r in boot.file_chunks(ino)]


# ---- the command line ------------------------------------------------------------------------


def run_cli(*args: str | bytes | Path, check: bool = False, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    """Run the installed ``nydusfs`` script; output decoded with ``surrogateescape``.

    On timeout the process is killed and ``subprocess.TimeoutExpired`` raised.
    """
    proc = subprocess.run([NYDUSFS, *args], capture_output=True, timeout=timeout, check=False)
    res = subprocess.CompletedProcess(
        proc.args, proc.returncode,
        proc.stdout.decode("utf-8", "surrogateescape"),
        proc.stderr.decode("utf-8", "surrogateescape"),
    )
    if check and res.returncode != 0:
        raise AssertionError(f"nydusfs {args} failed ({res.returncode}): {res.stderr}")
    return res


def assert_clean_error(res: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit status 1 and one ``nydusfs: error:`` line on stderr (no traceback); returns it."""
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("nydusfs: error:")]
    others = [ln for ln in res.stderr.splitlines()
              if ln.strip() and not ln.startswith(("nydusfs: error:", "nydusfs: warning:"))]
    assert len(errors) == 1 and not others, res.stderr
    for frag in fragments:
        assert frag in errors[0], (frag, errors[0])
    return errors[0]


def assert_no_image(out: Path) -> None:
    """A failed build leaves no bootstrap, no blob and no temporary file in ``out``."""
    if not out.exists():
        return
    leftovers = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())
    assert leftovers == [], leftovers


def assert_snapshots_equal(got: Snapshot, want: Snapshot) -> None:
    """``got == want``, failing with the missing/extra paths and the first differing entries."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    diffs = [
        (p, {k: (got[p].get(k), want[p].get(k))
             for k in set(got[p]) | set(want[p]) if got[p].get(k) != want[p].get(k)})
        for p in sorted(set(got) & set(want)) if got[p] != want[p]
    ]
    assert not (missing or extra or diffs), (
        f"missing {missing[:10]}, extra {extra[:10]}, "
        f"{len(diffs)} differ (got, want): {diffs[:10]}"
    )


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def clone_tree(src: Path, dst: Path) -> None:
    """Copy a tree with every attribute (like ``cp -a``), at any depth, in reverse name order.

    ``cp -a`` cannot: it names files by full path and fails past PATH_MAX. Everything here is
    relative to directory fds. Entries are created in the opposite order to the source's, so
    inode numbers and creation order differ while everything a reader sees is the same.
    """
    os.mkdir(dst)
    root_src, root_dst = os.open(src, _DIR), os.open(dst, _DIR)
    dirs: list[tuple[int, int]] = []  # (dst fd, mtime_ns), fixed up after all entries exist
    links: dict[tuple[int, int], tuple[int, bytes]] = {}
    dup_fds: list[int] = []

    def attrs(sfd: int, dfd: int, name: bytes | None, st: os.stat_result) -> None:
        target: bytes | int = name if name is not None else dfd
        kw: dict[str, Any] = {"dir_fd": dfd} if name is not None else {}
        if name is not None:
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dfd)
        else:
            os.fchown(dfd, st.st_uid, st.st_gid)
            os.fchmod(dfd, stat.S_IMODE(st.st_mode))
        # xattrs have no *at calls: a name goes through /proc/self/fd/N/, a directory by fd.
        sx: bytes | int = b"/proc/self/fd/%d/%s" % (sfd, name) if name is not None else sfd
        dx: bytes | int = b"/proc/self/fd/%d/%s" % (dfd, name) if name is not None else dfd
        nofollow = name is not None  # (an fd has nothing to follow)
        for xname in os.listxattr(sx, follow_symlinks=not nofollow):
            value = os.getxattr(sx, xname, follow_symlinks=not nofollow)
            os.setxattr(dx, xname, value, follow_symlinks=not nofollow)
        if not stat.S_ISDIR(st.st_mode):
            assert isinstance(target, bytes)
            os.utime(target, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False, **kw)

    attrs(root_src, root_dst, None, os.fstat(root_src))
    dirs.append((root_dst, os.fstat(root_src).st_mtime_ns))
    stack = [(root_src, root_dst)]
    try:
        while stack:
            sfd, dfd = stack.pop()
            with os.scandir(sfd) as it:
                names = sorted((os.fsencode(e.name) for e in it), reverse=True)
            for name in names:
                st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
                fmt = stat.S_IFMT(st.st_mode)
                key = (st.st_dev, st.st_ino)
                if fmt != stat.S_IFDIR and key in links:
                    first_fd, first_name = links[key]
                    os.link(first_name, name, src_dir_fd=first_fd, dst_dir_fd=dfd,
                            follow_symlinks=False)
                    continue
                if fmt == stat.S_IFDIR:
                    os.mkdir(name, 0o700, dir_fd=dfd)
                elif fmt == stat.S_IFREG:
                    fin = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=sfd)
                    fout = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dfd)
                    try:
                        while data := os.read(fin, MiB):
                            os.write(fout, data)
                    finally:
                        os.close(fin)
                        os.close(fout)
                elif fmt == stat.S_IFLNK:
                    os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
                else:
                    os.mknod(name, fmt | 0o600, st.st_rdev, dir_fd=dfd)
                if fmt == stat.S_IFDIR:
                    s2 = os.open(name, _DIR, dir_fd=sfd)
                    d2 = os.open(name, _DIR, dir_fd=dfd)
                    attrs(s2, d2, None, st)
                    dirs.append((d2, st.st_mtime_ns))
                    stack.append((s2, d2))
                else:
                    attrs(sfd, dfd, name, st)
                    if st.st_nlink > 1:
                        keep = os.dup(dfd)
                        dup_fds.append(keep)
                        links[key] = (keep, name)
            os.close(sfd)
        for fd, ns in dirs:
            os.utime(fd, ns=(ns, ns))
    finally:
        for fd, _ns in dirs:
            os.close(fd)
        for fd in dup_fds:
            os.close(fd)

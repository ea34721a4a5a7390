"""The ``nydusfs`` command line: build, inspect, check, mount, umount, stat.

A thin edge: parse arguments, call the library, print. Every deliberate error is a
``NydusfsError`` and becomes one line on stderr and exit status 1 (usage errors: 2), never a
traceback. SIGTERM is turned into the same clean exit as Ctrl-C, removing temporary files.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from nydusfs import __version__
from nydusfs.builder.build import BuildOptions, build, read_prefetch_file
from nydusfs.builder.chunker import parse_size
from nydusfs.errors import NydusfsError
from nydusfs.format.reader import Bootstrap
from nydusfs.format.records import Inode
from nydusfs.verify import check_image

__all__ = ["main"]

_TYPES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydusfs", description="Lazy, verified container images.")
    p.add_argument("--version", action="version", version=f"nydusfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build an image from a directory, tar layers or OCI layout")
    b.add_argument("sources", nargs="+", metavar="SRC",
                   help="a directory; tar files (lowest layer first); or oci:PATH[:TAG]")
    b.add_argument("-o", "--output", required=True, type=Path, metavar="OUT")
    b.add_argument("--chunk-size", default="1M", help="power of two, 64K..16M (default 1M)")
    b.add_argument("--chunker", choices=["fixed", "cdc"], default="fixed")
    b.add_argument("--compression", choices=["zstd", "none"], default="zstd")
    b.add_argument("--zstd-level", type=int, default=3)
    b.add_argument("--chunk-dict", type=Path, metavar="BOOTSTRAP",
                   help="reference chunks already in this image's blobs instead of storing them")
    b.add_argument("--prefetch", type=Path, metavar="FILE",
                   help="file listing image paths (one per line) whose data goes first")
    b.add_argument("--workers", type=int, default=None, help="hash/compress threads")
    b.add_argument("--json", action="store_true", help="print a JSON summary")

    i = sub.add_parser("inspect", help="show a bootstrap's header, counts, or one inode")
    i.add_argument("bootstrap", type=Path)
    i.add_argument("path", nargs="?", help="show this path's inode")
    i.add_argument("--json", action="store_true")

    m = sub.add_parser("mount", help="mount an image lazily (read-only FUSE)")
    m.add_argument("bootstrap", type=Path)
    m.add_argument("mountpoint", type=Path)
    m.add_argument("--config", type=Path,
                   help="mount configuration (YAML); see docs/configuration.md")
    m.add_argument("--background", action="store_true",
                   help="return once the mount is ready, leaving a daemon serving it")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # used by --background
    m.add_argument("--log-file", type=Path, help=argparse.SUPPRESS)  # used by --background

    u = sub.add_parser("umount", help="unmount a nydusfs mount (the daemon then exits)")
    u.add_argument("mountpoint", type=Path)

    st = sub.add_parser("stat", help="show a mount's status: reads, fetches, cache, prefetch")
    st.add_argument("mountpoint", type=Path)
    st.add_argument("--json", action="store_true")

    c = sub.add_parser("check", help="verify a bootstrap (and its blobs)")
    c.add_argument("bootstrap", type=Path)
    c.add_argument("--blob-dir", type=Path, help="verify every blob and chunk in this directory")
    c.add_argument("--json", action="store_true")
    return p


def _cmd_build(args: argparse.Namespace) -> int:
    options = BuildOptions(
        chunk_size=parse_size(args.chunk_size),
        chunker=args.chunker,
        compression=args.compression,
        zstd_level=args.zstd_level,
        chunk_dict=args.chunk_dict,
        prefetch=read_prefetch_file(args.prefetch) if args.prefetch else [],
        progress=not args.json,
    )
    if args.workers is not None:
        options.workers = max(1, args.workers)
    result = build(args.sources, args.output, options)
    for w in result.warnings:
        print(f"nydusfs: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        saved = result.dedup_saved_bytes
        print(f"root digest   {result.root_digest}")
        print(f"bootstrap     {result.bootstrap} (sha256:{result.bootstrap_sha256})")
        for blob in result.blobs:
            print(f"blob          {blob['digest']} {blob['size']} bytes"
                  f"{'' if blob['new'] else ' (from chunk dict)'}")
        print(f"inodes        {result.inodes} ({result.files} files, "
              f"{result.directories} dirs, {result.symlinks} symlinks)")
        print(f"chunks        {result.chunks} unique, {result.chunks_new} new, "
              f"{result.chunks_from_dict} from dict")
        print(f"data          {result.bytes_in} bytes in, {result.bytes_out} bytes out, "
              f"{saved} deduplicated")
        print(f"time          {result.seconds:.2f} s")
    return 0


def _inode_json(boot: Bootstrap, path: str, node: Inode) -> dict[str, Any]:
    d: dict[str, Any] = {
        "path": path, "ino": node.ino, "type": _TYPES.get(stat.S_IFMT(node.mode), "?"),
        "mode": f"{stat.S_IMODE(node.mode):04o}", "uid": node.uid, "gid": node.gid,
        "nlink": node.nlink, "size": node.size,
        "mtime": f"{node.mtime_sec}.{node.mtime_nsec:09d}", "digest": node.digest.hex(),
        "xattrs": {x.name.decode("utf-8", "backslashreplace"): x.value.hex()
                   for x in boot.xattrs(node)},
    }
    if node.is_symlink():
        d["target"] = boot.readlink(node).decode("utf-8", "backslashreplace")
    if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
        d["rdev"] = [os.major(node.rdev), os.minor(node.rdev)]
    if node.is_dir():
        d["entries"] = node.data_count
    if node.is_reg():
        d["chunks"] = [
            {"offset": r.file_offset, "digest": r.chunk.hex, "size": r.chunk.uncompressed_size,
             "blob": r.chunk.blob_index, "compressed_offset": r.chunk.compressed_offset,
             "compressed_size": r.chunk.compressed_size}
            for r in boot.file_chunks(node)
        ]
    return d


def _cmd_inspect(args: argparse.Namespace) -> int:
    with Bootstrap.open(args.bootstrap) as boot:
        if args.path is not None:
            try:
                node = boot.resolve(args.path)
            except FileNotFoundError as exc:
                raise NydusfsError(str(exc)) from exc
            info = _inode_json(boot, args.path, node)
        else:
            h = boot.header
            info = {
                "version": h.version,
                "chunker": "cdc" if h.cdc else "fixed",
                "chunk_size": h.chunk_size,
                "digest": "blake3",
                "compression": "zstd" if h.compression else "none",
                "root_digest": h.root_digest.hex(),
                "counts": {name: cnt for name, (_off, cnt) in h.tables.items()},
                "blobs": [{"digest": b.oci_digest, "size": b.size} for b in boot.blobs()],
                "prefetch": len(boot.prefetch()),
            }
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for key, value in info.items():
                if isinstance(value, list) and value and isinstance(value[0], dict):
                    print(f"{key}:")
                    for item in value:
                        print("  " + " ".join(f"{k}={v}" for k, v in item.items()))
                elif isinstance(value, dict):
                    print(f"{key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
                else:
                    print(f"{key}: {value}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    with Bootstrap.open(args.bootstrap) as boot:
        report = check_image(boot, args.blob_dir)
    report["seconds"] = round(time.monotonic() - t0, 3)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        what = "bootstrap and blobs" if args.blob_dir else "bootstrap"
        print(f"ok: {what} valid; " + ", ".join(f"{k}={v}" for k, v in report.items()))
    return 0


def _cmd_mount(args: argparse.Namespace) -> int:
    from nydusfs.mount import mount_background, mount_foreground

    if args.background:
        return mount_background(args.bootstrap, args.mountpoint, args.config)
    return mount_foreground(args.bootstrap, args.mountpoint, args.config, args.ready_fd,
                            args.log_file)


def _cmd_umount(args: argparse.Namespace) -> int:
    from nydusfs.mount import unmount

    unmount(args.mountpoint)
    return 0


def _cmd_stat(args: argparse.Namespace) -> int:
    from nydusfs.status import format_status, query_status

    status = query_status(args.mountpoint)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "mount":  # the mount daemon handles SIGTERM itself: unmount, exit 0
        signal.signal(signal.SIGTERM, _on_sigterm)
    handler = {
        "build": _cmd_build, "inspect": _cmd_inspect, "check": _cmd_check, "mount": _cmd_mount,
        "umount": _cmd_umount, "stat": _cmd_stat,
    }[args.command]
    try:
        return handler(args)
    except NydusfsError as exc:
        print(f"nydusfs: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `nydusfs inspect ... | head`: not an error worth a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # disk full, permissions on OUT, ...: still one clear line
        print(f"nydusfs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nydusfs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

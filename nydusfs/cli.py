"""The ``nydusfs`` command line: build, convert, push, inspect, check, mount, umount, stat,
service.

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
from typing import TYPE_CHECKING, Any

from nydusfs import __version__
from nydusfs.errors import NydusfsError

if TYPE_CHECKING:
    from nydusfs.builder.build import BuildOptions
    from nydusfs.format.reader import Bootstrap
    from nydusfs.format.records import Inode

# Each command imports what it needs when it runs: `nydusfs mount` is on a container's start
# path, and the builder, the verifier or the OCI client would only slow it down.

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
    b.add_argument("--push", metavar="REF",
                   help="then push the image to a registry (REF) or s3://BUCKET/PREFIX")
    _add_push_flags(b)

    cv = sub.add_parser("convert", help="convert a registry image into a nydusfs image and "
                                        "push it")
    cv.add_argument("source", metavar="SRC_REF", help="an OCI/Docker image in a registry")
    cv.add_argument("dest", metavar="DST_REF", help="where to push the nydusfs image")
    cv.add_argument("--chunk-dict", metavar="REF_OR_BOOTSTRAP",
                    help="a previous nydusfs image (reference or local bootstrap): its chunks "
                         "are referenced, only new ones uploaded")
    _add_build_flags(cv)
    cv.add_argument("-o", "--output", type=Path, metavar="OUT",
                    help="keep the built image (bootstrap, blobs/) in this directory")
    cv.add_argument("--work-dir", type=Path, metavar="DIR",
                    help="directory for temporary files (default: $TMPDIR)")
    cv.add_argument("--platform", default="linux/amd64",
                    help="platform to pick from a multi-platform source (default linux/amd64)")
    _add_registry_flags(cv)
    cv.add_argument("--json", action="store_true", help="print a JSON summary")

    ps = sub.add_parser("push", help="push a local build (OUT) to a registry or S3")
    ps.add_argument("output", type=Path, metavar="OUT", help="a `nydusfs build` output directory")
    ps.add_argument("dest", metavar="REF", help="registry/repository:tag or s3://BUCKET/PREFIX")
    _add_push_flags(ps)
    ps.add_argument("--json", action="store_true", help="print a JSON summary")

    i = sub.add_parser("inspect", help="show a bootstrap's header, counts, or one inode")
    i.add_argument("bootstrap", metavar="BOOTSTRAP|REF",
                   help="a bootstrap file, or a nydusfs image in a registry")
    i.add_argument("path", nargs="?", help="show this path's inode")
    i.add_argument("--json", action="store_true")
    _add_registry_flags(i, platform=True)

    m = sub.add_parser("mount", help="mount an image lazily (read-only FUSE)")
    m.add_argument("bootstrap", metavar="BOOTSTRAP|REF",
                   help="a bootstrap file, or a nydusfs image in a registry")
    m.add_argument("mountpoint", type=Path)
    m.add_argument("--config", type=Path,
                   help="mount configuration (YAML); see docs/configuration.md")
    m.add_argument("--background", action="store_true",
                   help="return once the mount is ready, leaving a daemon serving it")
    m.add_argument("--service", choices=["auto", "always", "never"], default=None,
                   help="with --background: have the mount service (`nydusfs service`) fork "
                        "the daemon: auto (default; $NYDUSFS_SERVICE) when its socket answers, "
                        "else fork one here; always; never")
    m.add_argument("--service-socket", type=Path, metavar="PATH",
                   help="the mount service's socket (default: $NYDUSFS_SERVICE_SOCKET or "
                        "/run/nydusfs/service.sock)")
    # For a supervisor that runs the daemon itself: "1" on this fd once the mount is ready;
    # a log file to remove at exit if it stayed empty.
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--log-file", type=Path, help=argparse.SUPPRESS)
    _add_registry_flags(m, platform=True)

    sv = sub.add_parser("service", help="run the resident mount service: `mount --background` "
                                         "then starts in milliseconds")
    sv.add_argument("--socket", type=Path, metavar="PATH",
                    help="listen here (default: $NYDUSFS_SERVICE_SOCKET or "
                         "/run/nydusfs/service.sock; made mode 0600)")

    u = sub.add_parser("umount", help="unmount a nydusfs mount (the daemon then exits)")
    u.add_argument("mountpoint", type=Path)

    st = sub.add_parser("stat", help="show a mount's status: reads, fetches, cache, prefetch")
    st.add_argument("mountpoint", type=Path)
    st.add_argument("--json", action="store_true")

    c = sub.add_parser("check", help="verify a bootstrap (and its blobs)")
    c.add_argument("bootstrap", metavar="BOOTSTRAP|REF",
                   help="a bootstrap file, or a nydusfs image in a registry")
    c.add_argument("--blob-dir", type=Path, help="verify every blob and chunk in this directory")
    c.add_argument("--blobs", action="store_true",
                   help="REF: download and verify every blob and chunk of the image")
    c.add_argument("--json", action="store_true")
    _add_registry_flags(c, platform=True)
    return p


def _add_build_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-size", default="1M", help="power of two, 64K..16M (default 1M)")
    p.add_argument("--chunker", choices=["fixed", "cdc"], default="fixed")
    p.add_argument("--compression", choices=["zstd", "none"], default="zstd")
    p.add_argument("--zstd-level", type=int, default=3)
    p.add_argument("--prefetch", type=Path, metavar="FILE",
                   help="file listing image paths (one per line) whose data goes first")
    p.add_argument("--workers", type=int, default=None, help="hash/compress threads")


def _add_registry_flags(p: argparse.ArgumentParser, *, platform: bool = False) -> None:
    g = p.add_argument_group("registry access")
    g.add_argument("--plain-http", action="store_true", default=None,
                   help="HTTP instead of HTTPS (default: HTTP only for loopback registries)")
    g.add_argument("--insecure-skip-verify", action="store_true",
                   help="do not verify the registry's TLS certificate")
    g.add_argument("--ca-file", type=Path, help="extra CA bundle (PEM) for TLS")
    g.add_argument("--auth-file", type=Path,
                   help="docker-style config.json with credentials (default: the usual places)")
    g.add_argument("--username", help="registry user name (with --password-stdin)")
    g.add_argument("--password-stdin", action="store_true",
                   help="read the registry password from standard input")
    if platform:
        g.add_argument("--platform", default="linux/amd64",
                       help="platform to pick from a multi-platform image (default linux/amd64)")


def _add_push_flags(p: argparse.ArgumentParser) -> None:
    _add_registry_flags(p)
    p.add_argument("--platform", default=None,
                   help="platform recorded in the image config (default: this machine's)")
    g = p.add_argument_group("s3 (for s3://BUCKET/PREFIX)")
    g.add_argument("--s3-endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    g.add_argument("--s3-region", help="region (default: AWS_REGION or us-east-1)")
    g.add_argument("--s3-addressing", choices=["path", "virtual"],
                   help="bucket in the path or the host name (default: path with an endpoint)")


def _credentials(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """``--username`` and the password from stdin (``--password-stdin``); a background mount's
    forked daemon keeps it in memory, never in its command line or environment."""
    password: str | None = None
    if getattr(args, "password_stdin", False):
        if args.username is None:
            raise NydusfsError("--password-stdin needs --username")
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise NydusfsError("--password-stdin: no password on standard input")
    if args.username is not None and password is None:
        raise NydusfsError("--username needs --password-stdin")
    return args.username, password


def _client_options(args: argparse.Namespace) -> Any:
    from nydusfs.oci.client import ClientOptions

    username, password = _credentials(args)
    return ClientOptions(plain_http=args.plain_http, insecure_skip_verify=args.insecure_skip_verify,
                         ca_file=args.ca_file, auth_file=args.auth_file, username=username,
                         password=password)


def _remote_options(args: argparse.Namespace) -> Any:
    from nydusfs.mount import RemoteOptions

    username, password = _credentials(args)
    return RemoteOptions(platform=args.platform, plain_http=args.plain_http,
                         insecure_skip_verify=args.insecure_skip_verify, ca_file=args.ca_file,
                         auth_file=args.auth_file, username=username, password=password)


def _build_options(args: argparse.Namespace, chunk_dict: Path | None) -> BuildOptions:
    from nydusfs.builder.build import BuildOptions, read_prefetch_file
    from nydusfs.builder.chunker import parse_size

    options = BuildOptions(
        chunk_size=parse_size(args.chunk_size),
        chunker=args.chunker,
        compression=args.compression,
        zstd_level=args.zstd_level,
        chunk_dict=chunk_dict,
        prefetch=read_prefetch_file(args.prefetch) if args.prefetch else [],
        progress=not args.json,
    )
    if args.workers is not None:
        options.workers = max(1, args.workers)
    return options


def _cmd_build(args: argparse.Namespace) -> int:
    from nydusfs.builder.build import build

    push_to = _parse_push_target(args.push) if args.push is not None else None
    options = _build_options(args, args.chunk_dict)
    result = build(args.sources, args.output, options)
    for w in result.warnings:
        print(f"nydusfs: warning: {w}", file=sys.stderr)
    pushed = _push(args, args.output, push_to) if push_to is not None else None
    if args.json:
        doc = result.to_json()
        if pushed is not None:
            doc["push"] = pushed
        print(json.dumps(doc, indent=2))
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
        if pushed is not None:
            _print_push(pushed)
    return 0


def _parse_push_target(text: str) -> Any:
    """A registry ``Reference``, or the ``s3://`` URL as a string."""
    if text.startswith("s3://"):
        from nydusfs.storage.s3 import parse_s3_url

        parse_s3_url(text)  # validate now, before a long build
        return text
    from nydusfs.oci.reference import Reference

    return Reference.parse(text)


def _push(args: argparse.Namespace, out: Path, target: Any) -> dict[str, Any]:
    """Push ``out`` to ``target`` (a Reference or an s3:// URL); the JSON summary."""
    if isinstance(target, str):
        return _push_s3(args, out, target)
    from nydusfs.push import push_local

    result = push_local(out, target, _client_options(args), platform=args.platform,
                        progress=not args.json)
    return result.to_json()


def _push_s3(args: argparse.Namespace, out: Path, url: str) -> dict[str, Any]:
    import asyncio

    from nydusfs.push import UploadProgress, read_local_image
    from nydusfs.storage.s3 import S3Client, s3_config_from_url, upload_image

    boot, _data = read_local_image(out)
    with boot:
        boot.check()
        total = sum(b.size for b in boot.blobs()) + len(_data)
    cfg = s3_config_from_url(url, endpoint=args.s3_endpoint, region=args.s3_region,
                             addressing=args.s3_addressing,
                             insecure_skip_verify=args.insecure_skip_verify,
                             ca_file=args.ca_file)
    bar = UploadProgress(not args.json, total)

    async def run() -> dict[str, Any]:
        async with S3Client(cfg) as client:
            result = await upload_image(client, out, progress=bar.update)
            doc = result.to_json()
            doc["destination"] = url
            doc["bootstrap_url"] = (f"s3://{cfg.bucket}/{result.bootstrap_key}"
                                    if result.bootstrap_key else None)
            return doc

    try:
        return asyncio.run(run())
    finally:
        bar.close()


def _print_push(doc: dict[str, Any]) -> None:
    if "manifest_digest" in doc:
        print(f"pushed        {doc['reference']}")
        print(f"uploaded      {doc['bytes_uploaded']} bytes, {doc['blobs_uploaded']} of "
              f"{doc['layers']} layers ({doc['blobs_skipped']} already there)")
    else:
        print(f"pushed        {doc['destination']} (bootstrap {doc['bootstrap_url']})")
        print(f"uploaded      {doc['bytes_uploaded']} bytes, {len(doc['uploaded'])} objects "
              f"({len(doc['skipped'])} already there)")


def _cmd_push(args: argparse.Namespace) -> int:
    doc = _push(args, args.output, _parse_push_target(args.dest))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_push(doc)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from nydusfs.convert import ConvertOptions, convert
    from nydusfs.oci.reference import Reference

    src, dst = Reference.parse(args.source), Reference.parse(args.dest)
    options = ConvertOptions(build=_build_options(args, None), client=_client_options(args),
                             platform=args.platform, chunk_dict=args.chunk_dict,
                             output=args.output, work_dir=args.work_dir,
                             progress=not args.json)
    result = convert(src, dst, options)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        b = result.build
        print(f"source        {result.source} ({result.source_layers} layers, "
              f"{result.source_bytes} bytes)")
        print(f"pushed        {result.reference}")
        print(f"root digest   {result.root_digest}")
        print(f"chunks        {b['chunks']} unique, {b['chunks_new']} new, "
              f"{b['chunks_from_dict']} from dict")
        print(f"layers        {result.layers} ({result.blobs_uploaded} uploaded, "
              f"{result.blobs_skipped} already there)")
        print(f"transfer      {result.bytes_downloaded} bytes down, "
              f"{result.bytes_uploaded} bytes up")
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


def _open_image(args: argparse.Namespace) -> tuple[Bootstrap, dict[str, Any] | None, Any]:
    """The bootstrap named by ``args.bootstrap`` (a file, or fetched for an image reference),
    the manifest's view of the image (``None`` for a file), and the reference (or ``None``)."""
    from nydusfs.format.reader import Bootstrap
    from nydusfs.mount import resolve_image_arg

    target = resolve_image_arg(args.bootstrap)
    if isinstance(target, Path):
        return Bootstrap.open(target), None, None
    import asyncio

    from nydusfs.oci.client import RegistryClient
    from nydusfs.oci.image import fetch_image

    options = _client_options(args)

    async def run() -> tuple[Any, bytes]:
        async with RegistryClient(target.registry, options) as client:
            return await fetch_image(client, target, platform=args.platform)

    image, data = asyncio.run(run())
    return Bootstrap.from_bytes(data, name=str(target)), image.summary(), target


def _cmd_inspect(args: argparse.Namespace) -> int:
    boot, image, _ref = _open_image(args)
    with boot:
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
            if image is not None:
                info["image"] = image
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            _print_info(info, "")
    return 0


def _print_info(info: dict[str, Any], indent: str) -> None:
    for key, value in info.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{indent}{key}:")
            for item in value:
                print(f"{indent}  " + " ".join(f"{k}={v}" for k, v in item.items()))
        elif isinstance(value, dict) and any(isinstance(v, dict | list) for v in value.values()):
            print(f"{indent}{key}:")
            _print_info(value, indent + "  ")
        elif isinstance(value, dict):
            print(f"{indent}{key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        else:
            print(f"{indent}{key}: {value}")


def _cmd_check(args: argparse.Namespace) -> int:
    from nydusfs.verify import check_image

    t0 = time.monotonic()
    boot, image, ref = _open_image(args)
    with boot:
        if ref is not None and args.blobs:
            if args.blob_dir is not None:
                raise NydusfsError("--blobs and --blob-dir: give one")
            report = _check_remote_blobs(args, boot, ref)
        else:
            report = check_image(boot, args.blob_dir)
    if image is not None:
        report["manifest_digest"] = image["manifest_digest"]
    report["seconds"] = round(time.monotonic() - t0, 3)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        what = "bootstrap and blobs" if args.blob_dir or "chunks_verified" in report \
            else "bootstrap"
        print(f"ok: {what} valid; " + ", ".join(f"{k}={v}" for k, v in report.items()))
    return 0


def _check_remote_blobs(args: argparse.Namespace, boot: Bootstrap, ref: Any) -> dict[str, Any]:
    """``check REF --blobs``: download every blob to a temporary directory, verify them all."""
    import asyncio
    import tempfile

    from nydusfs.oci.client import RegistryClient
    from nydusfs.verify import check_image

    options = _client_options(args)
    with tempfile.TemporaryDirectory(prefix="nydusfs-check-") as tmp:
        async def run() -> None:
            async with RegistryClient(ref.registry, options) as client:
                for b in boot.blobs():
                    await client.download_blob(ref.repository, b.oci_digest, Path(tmp) / b.hex)

        asyncio.run(run())
        return check_image(boot, Path(tmp))


def _cmd_mount(args: argparse.Namespace) -> int:
    remote = _remote_options(args)  # once: --password-stdin consumes stdin
    if args.background:
        mode = args.service or os.environ.get("NYDUSFS_SERVICE") or "auto"
        if mode not in ("auto", "always", "never"):
            raise NydusfsError(f"NYDUSFS_SERVICE: expected auto, always or never, got {mode!r}")
        if mode != "never":
            # Only the standard library's socket and json until the service answers: this
            # is all a mount through the service costs the client (`python -X importtime`).
            from nydusfs.mount import process_start_time
            from nydusfs.service import ServiceUnavailable, mount_via_service, socket_path

            try:
                return mount_via_service(socket_path(args.service_socket), args.bootstrap,
                                         args.mountpoint, args.config, remote,
                                         started=process_start_time())
            except ServiceUnavailable:
                if mode == "always":
                    raise
        from nydusfs.mount import mount_background

        return mount_background(args.bootstrap, args.mountpoint, args.config, remote)
    from nydusfs.mount import mount_foreground

    return mount_foreground(args.bootstrap, args.mountpoint, args.config, args.ready_fd,
                            args.log_file, remote)


def _cmd_service(args: argparse.Namespace) -> int:
    from nydusfs.service import run_service, socket_path

    return run_service(socket_path(args.socket))


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
    if args.command not in ("mount", "service"):  # those handle SIGTERM themselves
        signal.signal(signal.SIGTERM, _on_sigterm)
    handler = {
        "build": _cmd_build, "convert": _cmd_convert, "push": _cmd_push,
        "inspect": _cmd_inspect, "check": _cmd_check, "mount": _cmd_mount,
        "umount": _cmd_umount, "stat": _cmd_stat, "service": _cmd_service,
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

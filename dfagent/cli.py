"""The ``dfagent`` command line: ``supernode``, ``peer``, ``get`` and ``preheat``.

A thin edge: parse arguments, load the config, run the service. Every deliberate error is a
``NydusfsError`` (dfagent's errors are too) and becomes one line on stderr and exit status 1
(usage errors: 2), never a traceback. SIGTERM and SIGINT stop a server cleanly: it stops
accepting, finishes in-flight requests, closes its store, and exits 0.

Subcommands are entries in :data:`_COMMANDS` (name → parser setup, handler), so the peer agent's
``peer``, ``get`` and ``preheat`` join by adding theirs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from dfagent import __version__
from nydusfs.errors import NydusfsError

if TYPE_CHECKING:
    from dfagent.peer.config import PeerConfig
    from dfagent.supernode.config import SupernodeConfig

__all__ = ["main"]

log = logging.getLogger("dfagent")


# -- supernode ------------------------------------------------------------------------------

def _setup_supernode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="YAML config (see docs/dfagent.md); default: every default")
    p.add_argument("--listen", metavar="HOST:PORT", help="override the config's listen address")


def _cmd_supernode(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dfagent.supernode.config import load_config, parse_config

    cfg = load_config(args.config)
    if args.listen is not None:
        cfg = replace(cfg, listen=parse_config({"listen": args.listen}, base_dir=Path()).listen)
    from nydusfs.eventloop import run

    return run(_serve_supernode(cfg))


async def _serve_supernode(cfg: SupernodeConfig) -> int:
    from dfagent.supernode.server import start_supernode

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await start_supernode(cfg)
    try:
        log.info("supernode listening on %s (store: %s, token: %s)", server.url,
                 cfg.store.type, "required" if cfg.token else "off")
        await stop.wait()
        log.info("stopping")
    finally:
        await server.close()
    return 0


# -- peer, get, preheat --------------------------------------------------------------------

def _setup_peer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="YAML config (see docs/dfagent.md); default: every default")


def _cmd_peer(args: argparse.Namespace) -> int:
    from dfagent.peer.config import load_config
    from nydusfs.eventloop import run

    return run(_serve_peer(load_config(args.config)))


async def _serve_peer(cfg: PeerConfig) -> int:
    from dfagent.peer.agent import start_peer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    peer = await start_peer(cfg)
    try:
        log.info("peer %s listening on %s (advertised as %s), local API on %s, supernodes: %s",
                 peer.peer_id, peer.url, peer.advertise, peer.socket,
                 ", ".join(cfg.supernodes) or "none")
        await stop.wait()
        log.info("stopping")
    finally:
        await peer.close()
    return 0


def _image_flags(p: argparse.ArgumentParser) -> None:
    from nydusfs.config import DEFAULT_DRAGONFLY_SOCKET

    p.add_argument("--socket", type=Path, default=DEFAULT_DRAGONFLY_SOCKET,
                   help=f"the agent's local API socket (default {DEFAULT_DRAGONFLY_SOCKET})")
    p.add_argument("--blobs", type=Path, metavar="DIR",
                   help="for a bootstrap file: its blob directory (default: blobs/ beside it)")
    p.add_argument("--plain-http", action="store_true", default=None,
                   help="reach the registry over plain HTTP (default: only on loopback)")
    p.add_argument("--platform", default="linux/amd64")


def _setup_get(p: argparse.ArgumentParser) -> None:
    p.add_argument("digests", nargs="+", metavar="DIGEST", help="chunk digests (blake3 hex)")
    p.add_argument("--source", required=True, metavar="IMAGE",
                   help="the image holding the chunks: a reference or a bootstrap file")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                   help="write each chunk's bytes to DIR/DIGEST")
    _image_flags(p)


def _cmd_get(args: argparse.Namespace) -> int:
    from dfagent.peer.client import AgentClient, open_image

    src = open_image(args.source, blobs=args.blobs, plain_http=args.plain_http,
                     platform=args.platform)
    try:
        items = []
        for d in dict.fromkeys(args.digests):
            rec = None
            try:
                rec = src.boot.find_chunk(bytes.fromhex(d)) if len(d) == 64 else None
            except ValueError:
                rec = None
            if rec is None:
                raise NydusfsError(f"{d}: not a chunk of {args.source}")
            items.append(src.item(rec))

        async def run() -> dict[str, bytes | str]:
            out: dict[str, bytes | str] = {}
            async with AgentClient(args.socket) as agent:
                for i in range(0, len(items), 64):
                    out.update(await agent.fetch([src.location], items[i:i + 64]))
            return out

        got = asyncio.run(run())
    finally:
        src.close()
    args.output.mkdir(parents=True, exist_ok=True)
    failed = 0
    total = 0
    for item in items:
        d = item["digest"]
        data = got.get(d, "no answer")
        if isinstance(data, str):
            print(f"dfagent: {d}: {data}", file=sys.stderr)
            failed += 1
            continue
        tmp = args.output / f".{d}.tmp"
        tmp.write_bytes(data)
        tmp.replace(args.output / d)
        total += len(data)
    print(f"{len(items) - failed} chunk(s), {total} bytes in {args.output}"
          + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def _setup_preheat(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="an image reference or a bootstrap file")
    p.add_argument("--concurrency", type=int, default=4, help="batches in flight (default 4)")
    p.add_argument("--batch", type=int, default=128, help="chunks per request (default 128)")
    _image_flags(p)


def _cmd_preheat(args: argparse.Namespace) -> int:
    from dfagent.peer.client import AgentClient, open_image

    src = open_image(args.image, blobs=args.blobs, plain_http=args.plain_http,
                     platform=args.platform)
    try:
        items = [src.item(rec) for rec in src.boot.chunks()]
        total_bytes = sum(i["size"] for i in items)
        step = max(1, args.batch)
        batches = [items[i:i + step] for i in range(0, len(items), step)]
        origins: dict[str, int] = {}
        errors: list[str] = []

        async def run() -> None:
            from tqdm import tqdm

            slots = asyncio.Semaphore(max(1, args.concurrency))
            bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preheat",
                       disable=not sys.stderr.isatty())
            async with AgentClient(args.socket) as agent:
                async def one(batch: list[dict[str, object]]) -> None:
                    async with slots:
                        entries = await agent.ensure([src.location], batch)
                    for e in entries:
                        if e.get("status") == "ok":
                            origins[e["origin"]] = origins.get(e["origin"], 0) + 1
                        else:
                            errors.append(f"{e.get('digest')}: {e.get('message')}")
                    bar.update(sum(int(str(i["size"])) for i in batch))

                await asyncio.gather(*(one(b) for b in batches))
            bar.close()

        asyncio.run(run())
    finally:
        src.close()
    for line in errors[:10]:
        print(f"dfagent: {line}", file=sys.stderr)
    shown = ", ".join(f"{n} from {o}" for o, n in sorted(origins.items())) or "none"
    print(f"preheated {len(items) - len(errors)}/{len(items)} chunk(s) ({total_bytes} bytes): "
          f"{shown}")
    return 1 if errors else 0


# -- the table of subcommands ---------------------------------------------------------------

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                           Callable[[argparse.Namespace], int]]] = {
    "supernode": ("run the supernode (scheduler) API", _setup_supernode, _cmd_supernode),
    "peer": ("run the peer agent (chunk store, uploads, local API)", _setup_peer, _cmd_peer),
    "get": ("fetch chunks of an image through the local agent", _setup_get, _cmd_get),
    "preheat": ("have the local agent fetch a whole image ahead of time", _setup_preheat,
                _cmd_preheat),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfagent",
                                description="Peer-to-peer distribution of nydusfs chunks.")
    p.add_argument("--version", action="version", version=f"dfagent {__version__}")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)
    for name, (help_, setup, _) in _COMMANDS.items():
        setup(sub.add_parser(name, help=help_))
    return p


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)  # until a server installs its own handlers
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="dfagent: %(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command][2](args)
    except NydusfsError as exc:
        print(f"dfagent: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"dfagent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a signal before the server installed its handlers
        print("dfagent: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

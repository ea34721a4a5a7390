"""The ``dfagent`` command line: ``dfagent supernode [--config FILE]``.

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
    return asyncio.run(_serve_supernode(cfg))


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


# -- the table of subcommands ---------------------------------------------------------------

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                           Callable[[argparse.Namespace], int]]] = {
    "supernode": ("run the supernode (scheduler) API", _setup_supernode, _cmd_supernode),
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

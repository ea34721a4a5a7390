"""Fixture helpers for supernode tests: value builders, a fake clock, real processes.

pytest-asyncio is not a dependency; each test drives its coroutine with :func:`run`. Every
process started here is stopped by its PID (``stop_process``), with bounded waits.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import blake3

from dfagent.supernode.model import PeerInfo

T = TypeVar("T")

START_TIMEOUT = 20.0  # seconds for a process to say it is ready (a loaded 2-core machine)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def digest(i: int | str) -> str:
    """A real chunk digest: blake3 of some bytes named by ``i``."""
    return blake3.blake3(f"chunk-{i}".encode()).hexdigest()


def digests(n: int, start: int = 0) -> list[str]:
    return [digest(i) for i in range(start, start + n)]


def peer(name: str, *, zone: str = "", port: int = 9000, capacity: int = 8,
         labels: dict[str, str] | None = None) -> PeerInfo:
    return PeerInfo(id=name, address=f"http://127.0.0.1:{port}", zone=zone,
                    labels=labels or {}, capacity=capacity)


class FakeClock:
    """A clock that moves only when told to (``advance``); starts at a realistic epoch time so
    stores that format it (Redis) see the magnitudes production does."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM,
                 timeout: float = 10.0) -> int | None:
    """Send ``sig`` to ``proc`` by PID (SIGCONT too, in case it was stopped); SIGKILL if it
    has not exited within ``timeout``. Returns its exit status."""
    if proc.poll() is None:
        for s in (sig, signal.SIGCONT):
            try:
                os.kill(proc.pid, s)
            except ProcessLookupError:
                break
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    return proc.returncode


# -- redis-server ---------------------------------------------------------------------------

@dataclass
class RedisServer:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis(workdir: Path) -> RedisServer:
    """A private redis-server on a free loopback port, no persistence (RECIPES §8)."""
    last = ""
    for _ in range(3):  # the port could be taken between free_port() and bind
        port = free_port()
        log = open(workdir / f"redis-{port}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return RedisServer(proc, port)
            except OSError:
                time.sleep(0.02)
        stop_process(proc)
        last = (workdir / f"redis-{port}.log").read_text(errors="replace")[-500:]
    raise RuntimeError(f"redis-server did not start: {last}")


# -- dfagent supernode processes --------------------------------------------------------

def _dfagent_cmd() -> list[str]:
    script = Path(sys.executable).parent / "dfagent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dfagent.cli"]


@dataclass
class SupernodeProcess:
    """A ``dfagent supernode`` process; ``url`` is read from its "listening on" log line."""

    proc: subprocess.Popen[str]
    url: str
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_supernode_process(config: Path, *extra: str) -> SupernodeProcess:
    """Run ``dfagent supernode --config CONFIG`` and wait (bounded) until it listens."""
    proc = subprocess.Popen([*_dfagent_cmd(), "supernode", "--config", str(config), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    q: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:  # keeps reading so the pipe never fills, until the process exits
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            q.put(line)
        q.put(None)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        try:
            line = q.get(timeout=max(0.01, remaining)) if remaining > 0 else None
        except queue.Empty:
            line = None
        if line is None:
            stop_process(proc)
            raise RuntimeError("dfagent supernode did not start: " + "".join(lines)[-2000:])
        if "listening on " in line:
            url = line.split("listening on ", 1)[1].split()[0]
            return SupernodeProcess(proc=proc, url=url, lines=lines)

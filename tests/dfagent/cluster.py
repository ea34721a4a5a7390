"""Start a dfagent cluster as real processes: supernodes and peers with config files.

Used by the peer and end-to-end tests, and meant for the netns test, ``make demo`` and the
fan-out benchmark: every process is a real ``dfagent`` command started with a YAML config,
ready when it logs its "listening on" line (a bounded wait; the log tail is in the error
otherwise), and stopped by its PID (SIGTERM, then SIGKILL after a grace period). Peers are
reached over their local-API Unix socket with plain ``http.client`` (no event loop needed in
tests): :meth:`PeerProcess.status`, :meth:`PeerProcess.metrics`, :meth:`PeerProcess.chunks`.

Example::

    with Cluster(tmp_path) as c:
        sn = c.supernode()
        a, b = c.peer("a"), c.peer("b")
        ...   # everything is stopped when the block ends
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supernode.helpers import stop_process

from nydusfs.status import UnixHTTPConnection

__all__ = ["Cluster", "PeerProcess", "SupernodeProcess", "assert_same_tree", "free_port", "metric",
           "wait_until"]

START_TIMEOUT = 30.0  # seconds for a process to log that it listens (a loaded 2-core machine)
STOP_GRACE = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dfagent_cmd() -> list[str]:
    script = Path(sys.executable).parent / "dfagent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dfagent.cli"]


def wait_until(pred: Callable[[], bool], what: str, timeout: float = 20.0,
               step: float = 0.05) -> None:
    """Poll ``pred`` until true; ``AssertionError`` naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def metric(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in (labels or {}).items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
    m = re.search("^" + pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


@dataclass
class _Process:
    """A started process, its stderr lines (drained by a thread), and how to stop it."""

    cmd: list[str]
    log: Path
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready: str) -> str:
        """Start, wait for a stderr line containing ``ready``; return that line."""
        self.lines = []
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        q: queue.Queue[str | None] = queue.Queue()
        proc, lines, log = self.proc, self.lines, self.log

        def drain() -> None:
            assert proc.stderr is not None
            with open(log, "a") as out:
                for line in proc.stderr:
                    lines.append(line)
                    out.write(line)
                    out.flush()
                    q.put(line)
            q.put(None)

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            try:
                line = q.get(timeout=left) if left > 0 else None
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise RuntimeError(f"{' '.join(self.cmd[:3])} did not start:\n"
                                   + "".join(self.lines)[-3000:])
            if ready in line:
                return line

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal by PID (SIGCONT too, in case it was stopped); SIGKILL after the grace."""
        if self.proc is None:
            return None
        return stop_process(self.proc, sig, STOP_GRACE)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@dataclass
class SupernodeProcess(_Process):
    url: str = ""

    def restart(self) -> None:
        self.start("listening on ")

    def peer(self, peer_id: str) -> dict[str, Any] | None:
        """The supernode's view of a peer (None: unknown)."""
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"{self.url}/api/v1/peers/{peer_id}")
        token = getattr(self, "token", None)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                doc: dict[str, Any] = json.loads(resp.read())
                return doc
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise


@dataclass
class PeerProcess(_Process):
    name: str = ""
    socket: Path = Path()
    data_dir: Path = Path()
    url: str = ""

    @property
    def id(self) -> str:
        return self.name

    def request(self, method: str, path: str, body: Any = None,
                timeout: float = 60.0) -> tuple[int, bytes]:
        conn = UnixHTTPConnection(self.socket, timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def status(self) -> dict[str, Any]:
        code, data = self.request("GET", "/api/v1/status")
        assert code == 200, data
        doc: dict[str, Any] = json.loads(data)
        return doc

    def metrics(self) -> str:
        code, data = self.request("GET", "/metrics")
        assert code == 200, data
        return data.decode()

    def chunks(self, sources: list[dict[str, Any]], items: list[dict[str, Any]],
               deliver: str = "none") -> tuple[int, bytes]:
        return self.request("POST", "/api/v1/chunks",
                            {"deliver": deliver, "sources": sources, "chunks": items})

    def chunk_files(self) -> list[Path]:
        return sorted((self.data_dir / "chunks").glob("*/*"))


class Cluster:
    """Supernodes and peers under one work directory; :meth:`close` stops them all by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.processes: list[_Process] = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for p in reversed(self.processes):
            p.stop()

    def _config(self, name: str, doc: Mapping[str, Any]) -> Path:
        path = self.workdir / f"{name}.yaml"
        path.write_text(json.dumps(doc, indent=1))  # JSON is YAML
        return path

    def supernode(self, name: str = "supernode", *, token: str | None = None,
                  **settings: Any) -> SupernodeProcess:
        """A ``dfagent supernode`` on a fixed free port (so a restart keeps its URL)."""
        port = free_port()
        doc: dict[str, Any] = {"listen": f"127.0.0.1:{port}", **settings}
        if token:
            doc["token"] = token
        cfg = self._config(name, doc)
        sn = SupernodeProcess(cmd=[*dfagent_cmd(), "supernode", "--config", str(cfg)],
                              log=self.workdir / f"{name}.log", url=f"http://127.0.0.1:{port}")
        sn.token = token  # type: ignore[attr-defined]
        self.processes.append(sn)
        sn.start("listening on ")
        return sn

    def peer(self, name: str, *, supernodes: list[str] | None = None,
             token: str | None = None, **settings: Any) -> PeerProcess:
        """A ``dfagent peer`` named ``name`` (its id) on a free loopback port, its socket and
        data dir under the work directory; ``settings`` go into its config as they are."""
        home = self.workdir / name
        home.mkdir(exist_ok=True)
        sock = home / "agent.sock"
        port = free_port()
        doc: dict[str, Any] = {"id": name, "listen": f"127.0.0.1:{port}",
                               "socket": str(sock), "data_dir": str(home / "data"),
                               "supernodes": supernodes or [], **settings}
        if token:
            doc["token"] = token
        cfg = self._config(name, doc)
        p = PeerProcess(cmd=[*dfagent_cmd(), "peer", "--config", str(cfg)],
                        log=self.workdir / f"{name}.log", name=name, socket=sock,
                        data_dir=home / "data", url=f"http://127.0.0.1:{port}")
        self.processes.append(p)
        p.start("listening on ")
        return p

    def peers(self) -> Iterator[PeerProcess]:
        return (p for p in self.processes if isinstance(p, PeerProcess))


def assert_same_tree(mnt: Path, tree: Path) -> int:
    """Every file under ``tree`` reads back identically under ``mnt``; bytes compared."""
    total = 0
    for path in sorted(tree.rglob("*")):
        if path.is_file():
            got = (mnt / path.relative_to(tree)).read_bytes()
            assert got == path.read_bytes(), f"{path.relative_to(tree)} differs"
            total += len(got)
    return total


def convert_sample_image(registry: Any, repo: str, tmp: Path
                         ) -> tuple[Path, Path, dict[str, int]]:
    """The end-to-end tests' image: a small tree (random libraries, compressible text, small
    config files) pushed to ``registry`` as ``REPO-src:1`` and converted to ``REPO:1`` with
    64 KiB chunks. Returns the tree, the conversion's output directory (its ``bootstrap``)
    and the nydusfs blob layers (digest -> size)."""
    from oci.images import nydusfs, pull_manifest
    from registry_server import push_oci_dirs

    tree = tmp / "tree"
    (tree / "usr" / "lib").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "usr" / "lib" / "big.so").write_bytes(os.urandom((2 << 20) + 12345))
    (tree / "usr" / "lib" / "mid.so").write_bytes(os.urandom(700_000))
    (tree / "usr" / "lib" / "text").write_bytes(b"compressible line\n" * 40_000)
    for i in range(20):
        (tree / "etc" / f"conf{i}").write_bytes(f"setting {i}\n".encode() * (i + 1))
    push_oci_dirs(registry.host, f"{repo}-src:1", [tree])
    out = tmp / "converted"
    proc = nydusfs("convert", f"{registry.host}/{repo}-src:1", f"{registry.host}/{repo}:1",
                   "--chunk-size", "64K", "-o", out)
    assert proc.returncode == 0, proc.stderr
    manifest = pull_manifest(registry, repo, "1")
    return tree, out, {layer["digest"]: layer["size"] for layer in manifest["layers"][:-1]}

"""Upload server throughput on loopback, 1 MiB chunks: ``dfagent peer`` vs a static file server.

What a peer can serve bounds what P2P can do for its neighbours: a 100 Mbit/s link needs
12.5 MB/s, a 10 Gbit/s one 1.25 GB/s. This measures the real ``dfagent peer`` process (its
upload server, ``docs/api.md`` "Peer upload API") serving chunks from its store:

- ``peer-get``: ``GET /chunks/{digest}``, one chunk per request;
- ``peer-batch``: ``POST /chunks`` with ``--batch`` digests per request (one framed response);
- ``static`` (baseline, same run): an aiohttp process serving the *same* chunk files with
  ``web.FileResponse`` (``sendfile``, no per-chunk checks, no limits) — the cost of handing a
  file to a client in the same framework, with nothing of the peer's work;

The store holds ``--chunks`` chunk files of 1 MiB of random bytes (what a compressed or
incompressible chunk looks like; the files are in the page cache, as hot chunks would be).
The load generator (this process, aiohttp, ``--concurrency`` connections) requests every
chunk ``--passes`` times in a shuffled order and discards the bytes. Servers have no rate
limit and ``upload.max_concurrent`` above the concurrency, so nothing is refused (checked).
*Wall* throughput = bytes ÷ elapsed time with the load generator sharing the machine's cores;
*per server CPU-second* = bytes ÷ the server process's utime + stime (``/proc``), which does
not depend on how fast the load generator is. Medians of ``--runs`` rounds, servers in
rotating order. Results go to ``bench/.cache/results/upload.json`` (rendered by
:mod:`fanout_report`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import blake3
from benchlib import CACHE_DIR, REPO_DIR, machine_info, median, save_result, stop_process

from nydusfs.format import chunkfile

__all__ = ["main"]

MiB = 1 << 20
WAIT = 30.0
STATIC_SERVER = '''
import sys
from aiohttp import web
root = sys.argv[1]
async def get(request):
    d = request.match_info["digest"]
    return web.FileResponse(f"{root}/{d[:2]}/{d}")
app = web.Application()
app.router.add_get(r"/chunks/{digest:[0-9a-f]{64}}", get)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=lambda *a: print(
    "listening on", sys.argv[2], flush=True), access_log=None)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_store(data_dir: Path, n: int, seed: int = 7) -> list[str]:
    """``n`` chunk files of 1 MiB random bytes in the peer store layout; their digests."""
    chunks = data_dir / "chunks"
    rng = random.Random(seed)
    digests = []
    for _ in range(n):
        payload = rng.randbytes(MiB)
        raw = blake3.blake3(payload).digest()
        d = raw.hex()
        (chunks / d[:2]).mkdir(parents=True, exist_ok=True)
        (chunks / d[:2] / d).write_bytes(chunkfile.pack(payload, 0, len(payload), raw))
        digests.append(d)
    return digests


class Server:
    """A server process on a loopback port, ready when its log says so; stopped by PID."""

    def __init__(self, name: str, cmd: list[str], log: Path, port: int) -> None:
        self.name, self.cmd, self.log, self.port = name, cmd, log, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT
        while "listening on" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"upload_bench: {self.name} did not start: "
                                 f"{self.log.read_text(errors='replace')[-500:]}")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, WAIT)


async def load(base: str, digests: list[str], mode: str, concurrency: int, batch: int,
               passes: int) -> tuple[int, float]:
    """Fetch every digest ``passes`` times; (body bytes, seconds)."""
    order = [d for _ in range(passes) for d in random.sample(digests, len(digests))]
    if mode == "batch":
        jobs: list[list[str]] = [order[i:i + batch] for i in range(0, len(order), batch)]
    else:
        jobs = [[d] for d in order]
    total = 0
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    conn = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        async def worker() -> None:
            nonlocal total
            while not queue.empty():
                job = queue.get_nowait()
                if mode == "batch":
                    req = session.post(f"{base}/chunks", json={"digests": job})
                else:
                    req = session.get(f"{base}/chunks/{job[0]}")
                async with req as resp:
                    if resp.status != 200:
                        raise SystemExit(f"upload_bench: HTTP {resp.status} from {base}")
                    async for piece in resp.content.iter_chunked(256 << 10):
                        total += len(piece)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=128, help="1 MiB chunks in the store")
    ap.add_argument("--passes", type=int, default=8, help="times each chunk is fetched")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16, help="digests per batched request")
    ap.add_argument("--workdir", type=Path, default=CACHE_DIR / "upload")
    args = ap.parse_args(argv)
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    digests = make_store(data, args.chunks)
    peer_port, static_port = free_port(), free_port()
    cfg = work / "peer.yaml"
    cfg.write_text(json.dumps({
        "id": "upload-bench", "listen": f"127.0.0.1:{peer_port}",
        "socket": str(work / "agent.sock"), "data_dir": str(data), "quota": "4GiB",
        "upload": {"max_concurrent": args.concurrency * 2, "rate": 0}}))
    servers = {
        "peer": Server("dfagent peer", [sys.executable, "-m", "dfagent.cli", "peer",
                                        "--config", str(cfg)], work / "peer.log", peer_port),
        "static": Server("aiohttp static", [sys.executable, "-c", STATIC_SERVER,
                                            str(data / "chunks"), str(static_port)],
                         work / "static.log", static_port),
    }
    methods = {"peer-get": ("peer", "get"), "peer-batch": ("peer", "batch"),
               "static": ("static", "get")}
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    try:
        for s in servers.values():
            s.start()
        # one warm-up pass each: page cache, connection setup, the peer's store index
        for srv, mode in methods.values():
            asyncio.run(load(f"http://127.0.0.1:{servers[srv].port}", digests[:16], mode,
                             args.concurrency, args.batch, 1))
        names = list(methods)
        for rnd in range(args.runs):
            for m in names[rnd % len(names):] + names[:rnd % len(names)]:
                srv, mode = methods[m]
                server = servers[srv]
                cpu0 = server.cpu_seconds()
                nbytes, secs = asyncio.run(load(f"http://127.0.0.1:{server.port}", digests,
                                                mode, args.concurrency, args.batch,
                                                args.passes))
                cpu = server.cpu_seconds() - cpu0
                want = args.chunks * args.passes * MiB
                if nbytes < want:
                    raise SystemExit(f"upload_bench: {m}: got {nbytes} of {want} bytes")
                samples[m].append({"bytes": nbytes, "seconds": secs, "server_cpu_s": cpu,
                                   "wall_mb_s": nbytes / secs / 1e6,
                                   "cpu_mb_s": nbytes / max(cpu, 1e-9) / 1e6})
                print(f"round {rnd + 1}/{args.runs} {m:10} {nbytes / secs / 1e6:7.0f} MB/s "
                      f"wall, {nbytes / max(cpu, 1e-9) / 1e6:7.0f} MB per server CPU-s",
                      file=sys.stderr)
    finally:
        for s in servers.values():
            s.stop()
    medians = {m: {k: median([s[k] for s in ss]) for k in ("wall_mb_s", "cpu_mb_s")}
               for m, ss in samples.items()}
    result: dict[str, Any] = {
        "machine": machine_info(),
        "command": "make bench-upload   # .venv/bin/python bench/upload_bench.py --runs N",
        "params": {"chunks": args.chunks, "chunk_bytes": MiB, "passes": args.passes,
                   "concurrency": args.concurrency, "batch": args.batch},
        "runs": args.runs,
        "samples": samples,
        "medians": medians,
    }
    path = save_result("upload", result)
    base = medians["static"]
    for m, x in medians.items():
        print(f"{m:10} {x['wall_mb_s']:7.0f} MB/s wall ({x['wall_mb_s'] / base['wall_mb_s']:.2f}x "
              f"static), {x['cpu_mb_s']:7.0f} MB per server CPU-s "
              f"({x['cpu_mb_s'] / base['cpu_mb_s']:.2f}x)", file=sys.stderr)
    print(f"raw results in {path.relative_to(REPO_DIR)}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

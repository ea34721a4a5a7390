"""Supernode throughput and memory: lookups/s and announces/s per core, bytes per index entry.

The supernode runs as users run it (``dfagent supernode --config``, one process, so one core
for the API); the load comes from this process over loopback HTTP with a pool of keep-alive
connections. "Per core" is measured, not assumed: digests served divided by the CPU seconds
the supernode process used (utime + stime from /proc), so a load generator that cannot
saturate the server does not lower the figure, and the wall-clock rate is reported beside it.
With the Redis store, Redis's own CPU seconds are reported separately (it is another process,
on the other core).

Per run and store (memory, redis):

1. announce: ``PEERS`` peers announce ``CHUNKS`` distinct digests, each held by ``HOLDERS``
   peers, in batches of ``ANNOUNCE_BATCH`` — this also builds the index the lookups use;
2. lookup at several batch sizes (1 and 100 digests per request by default), random digests
   from the index, requester = a registered peer, k = 4;
3. in-process ``Scheduler.lookup`` (no HTTP) over the same index: the data-structure cost alone.

Memory per (peer, chunk) entry: the memory store built in this process under ``tracemalloc``
(bytes allocated / entries) for 1 and 10 holders per chunk, and for Redis the growth of
``used_memory`` (INFO) over the announce phase divided by the entries announced.

Results: bench/.cache/results/supernode.json (medians of ``--runs``), read by report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import blake3
from benchlib import machine_info, median, save_result

from dfagent.supernode.config import SupernodeConfig
from dfagent.supernode.model import PeerInfo
from dfagent.supernode.peerstore.memory import MemoryPeerStore
from dfagent.supernode.scheduler import Scheduler

PEERS = 100
CHUNKS = 50_000
HOLDERS = 3
ANNOUNCE_BATCH = 1_000
LOOKUP_BATCHES = (1, 100)
LOOKUP_DIGESTS = {1: 4_000, 100: 200_000}  # digests looked up per measurement
CONCURRENCY = 16
K = 4
TICK = os.sysconf("SC_CLK_TCK")


def make_digests(n: int, salt: str = "") -> list[str]:
    return [blake3.blake3(f"{salt}chunk-{i}".encode()).hexdigest() for i in range(n)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes ----------------------------------------------------------------------------

def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.02)
    stop(proc)
    raise RuntimeError("redis-server did not start")


def redis_used_memory(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"INFO memory\r\n")
        data = b""
        while b"used_memory:" not in data or not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    for line in data.decode().splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    raise RuntimeError("no used_memory in INFO")


def start_supernode(config: Path) -> tuple[subprocess.Popen[str], str]:
    """``dfagent supernode --config CONFIG``; its URL from the "listening on" log line."""
    exe = Path(sys.executable).parent / "dfagent"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "dfagent.cli"]
    proc = subprocess.Popen([*cmd, "supernode", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True)
    found: list[str] = []
    ready = threading.Event()

    def drain() -> None:  # reads to the end, so the pipe never fills
        assert proc.stderr is not None
        for line in proc.stderr:
            if "listening on " in line and not found:
                found.append(line.split("listening on ", 1)[1].split()[0])
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(30) or not found:
        stop(proc)
        raise RuntimeError("dfagent supernode did not start")
    return proc, found[0]


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(15)


# -- load ----------------------------------------------------------------------------------

async def post_all(url: str, path_bodies: list[tuple[str, dict[str, Any]]]) -> None:
    """POST every (path, body) with CONCURRENCY workers over keep-alive connections."""
    it = iter(path_bodies)
    conn = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(base_url=url, connector=conn) as http:
        async def worker() -> None:
            for path, body in it:
                async with http.post(path, json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"{path}: HTTP {resp.status}: {await resp.text()}")
                    await resp.read()

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def measure(url: str, pid: int, redis_pid: int | None,
                  path_bodies: list[tuple[str, dict[str, Any]]], items: int) -> dict[str, float]:
    c0, r0, t0 = cpu_seconds(pid), cpu_seconds(redis_pid) if redis_pid else 0.0, time.perf_counter()
    await post_all(url, path_bodies)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - c0
    rcpu = (cpu_seconds(redis_pid) - r0) if redis_pid else 0.0
    return {"items": items, "requests": len(path_bodies), "wall_s": wall, "cpu_s": cpu,
            "redis_cpu_s": rcpu, "per_cpu_s": items / max(cpu, 1e-9), "per_wall_s": items / wall}


async def run_store(kind: str, workdir: Path, digests: list[str], seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    redis_proc = None
    redis_port = 0
    store = "{type: memory}"
    if kind == "redis":
        redis_proc, redis_port = start_redis(workdir)
        store = f"{{type: redis, url: 'redis://127.0.0.1:{redis_port}/0'}}"
    cfg = workdir / f"supernode-{kind}.yaml"
    cfg.write_text(f"listen: 127.0.0.1:{free_port()}\nstore: {store}\npeer_ttl: 1h\n")
    proc, url = start_supernode(cfg)
    out: dict[str, Any] = {}
    try:
        regs = [(f"/api/v1/peers/p{i}", {"address": f"http://10.0.{i // 250}.{i % 250}:8002",
                                         "zone": f"z{i % 4}"}) for i in range(PEERS)]
        async with aiohttp.ClientSession(base_url=url) as http:
            for path, body in regs:
                async with http.put(path, json=body) as resp:
                    assert resp.status == 200, await resp.text()
        # Each digest goes to HOLDERS distinct random peers; batches per peer.
        per_peer: dict[int, list[str]] = {i: [] for i in range(PEERS)}
        for d in digests:
            for p in rng.sample(range(PEERS), HOLDERS):
                per_peer[p].append(d)
        bodies = [(f"/api/v1/peers/p{p}/announce", {"digests": ds[i:i + ANNOUNCE_BATCH]})
                  for p, ds in per_peer.items() for i in range(0, len(ds), ANNOUNCE_BATCH)]
        rng.shuffle(bodies)
        mem0 = redis_used_memory(redis_port) if redis_proc else 0
        entries = len(digests) * HOLDERS
        out["announce"] = await measure(url, proc.pid, redis_proc.pid if redis_proc else None,
                                        bodies, entries)
        if redis_proc:
            out["redis_bytes_per_entry"] = (redis_used_memory(redis_port) - mem0) / entries
        for batch in LOOKUP_BATCHES:
            n = LOOKUP_DIGESTS[batch] // (4 if kind == "redis" and batch == 1 else 1)
            reqs = [("/api/v1/lookup", {"digests": rng.sample(digests, batch),
                                        "requester": f"p{rng.randrange(PEERS)}", "k": K})
                    for _ in range(n // batch)]
            out[f"lookup_{batch}"] = await measure(
                url, proc.pid, redis_proc.pid if redis_proc else None, reqs, n)
    finally:
        stop(proc)
        if redis_proc:
            stop(redis_proc)
    return out


async def in_process_lookups(digests: list[str], seed: int) -> dict[str, float]:
    """Scheduler.lookup on a memory store, no HTTP: the ranking + index cost alone."""
    rng = random.Random(seed)
    store = MemoryPeerStore()
    sched = Scheduler(store, SupernodeConfig(peer_ttl=3600), rng=random.Random(seed))
    for i in range(PEERS):
        await sched.register(PeerInfo(id=f"p{i}", address=f"http://10.0.0.{i}:8002",
                                      zone=f"z{i % 4}"))
    for d in digests:
        for p in rng.sample(range(PEERS), HOLDERS):
            await store.announce(f"p{p}", [d], alive_since=0)
    batches = [rng.sample(digests, 100) for _ in range(2_000)]
    t0 = time.process_time()
    for b in batches:
        await sched.lookup(b, requester=f"p{rng.randrange(PEERS)}", k=K)
    cpu = time.process_time() - t0
    return {"items": 200_000, "cpu_s": cpu, "per_cpu_s": 200_000 / cpu}


async def memory_per_entry(chunks: int, holders: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    digests = make_digests(chunks, salt=f"mem{holders}-")
    infos = [PeerInfo(id=f"peer-{i:04d}", address=f"http://10.1.{i // 250}.{i % 250}:8002")
             for i in range(max(PEERS, holders))]
    # Digests arrive as fresh strings from JSON, as in the server: copy them per announce.
    plan = {info.id: [] for info in infos}  # type: dict[str, list[str]]
    for d in digests:
        for info in rng.sample(infos, holders):
            plan[info.id].append(d)
    payloads = {pid: [(d + " ")[:-1] for d in ds] for pid, ds in plan.items()}
    del digests, plan
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    store = MemoryPeerStore()
    for info in infos:
        await store.register(info, now=0.0, reset=False)
    for pid, ds in payloads.items():
        await store.announce(pid, ds, alive_since=0.0)
    del payloads
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    entries = (await store.stats(now=0.0)).entries
    assert entries == chunks * holders
    return {"chunks": chunks, "holders": holders, "entries": entries, "bytes": used,
            "bytes_per_entry": used / entries, "bytes_per_chunk": used / chunks}


def summarize(runs: list[dict[str, Any]], key: str, field: str) -> float:
    return median([r[key][field] for r in runs])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--stores", default="memory,redis")
    args = ap.parse_args(argv)
    stores = [s for s in args.stores.split(",") if s]
    if "redis" in stores and shutil.which("redis-server") is None:
        print("redis-server not installed: skipping the redis store", file=sys.stderr)
        stores.remove("redis")
    digests = make_digests(CHUNKS)
    per_store: dict[str, list[dict[str, Any]]] = {s: [] for s in stores}
    in_proc: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="snbench-") as tmp:
        for run in range(args.runs):
            order = stores[run % len(stores):] + stores[:run % len(stores)]  # rotate
            for kind in order:
                print(f"run {run + 1}/{args.runs}: {kind}", file=sys.stderr)
                per_store[kind].append(asyncio.run(run_store(kind, Path(tmp), digests, run)))
            in_proc.append(asyncio.run(in_process_lookups(digests, run)))
    print("memory per entry", file=sys.stderr)
    mem = [asyncio.run(memory_per_entry(100_000, h, 0)) for h in (1, 10)]
    keys = ["announce", *(f"lookup_{b}" for b in LOOKUP_BATCHES)]
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for kind, runs in per_store.items():
        medians[kind] = {k: {f: summarize(runs, k, f) for f in
                             ("per_cpu_s", "per_wall_s", "cpu_s", "redis_cpu_s", "wall_s")}
                         for k in keys}
        if kind == "redis":
            medians[kind]["memory"] = {"bytes_per_entry": median(
                [r["redis_bytes_per_entry"] for r in runs])}
    result = {
        "machine": machine_info(),
        "command": "make bench-supernode   # .venv/bin/python bench/supernode_bench.py",
        "runs": args.runs,
        "params": {"peers": PEERS, "chunks": CHUNKS, "holders": HOLDERS,
                   "announce_batch": ANNOUNCE_BATCH, "lookup_batches": list(LOOKUP_BATCHES),
                   "lookup_digests": {str(k): v for k, v in LOOKUP_DIGESTS.items()},
                   "concurrency": CONCURRENCY, "k": K},
        "stores": per_store,
        "medians": medians,
        "in_process": {"runs": in_proc, "per_cpu_s": median([r["per_cpu_s"] for r in in_proc])},
        "memory": mem,
    }
    path = save_result("supernode", result)
    for kind, m in medians.items():
        for k in keys:
            print(f"{kind:6} {k:10} {m[k]['per_cpu_s']:>10,.0f}/CPU-s "
                  f"{m[k]['per_wall_s']:>10,.0f}/s", file=sys.stderr)
    print(f"in-process lookups: {result['in_process']['per_cpu_s']:,.0f}/CPU-s", file=sys.stderr)
    for mm in mem:
        print(f"memory: {mm['holders']} holder(s): {mm['bytes_per_entry']:.0f} B/entry",
              file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The supernode section of docs/benchmarks.md, from bench/.cache/results/supernode.json.

Kept out of report.py (which only calls :func:`supernode_section`) so benchmarks owned by
different people do not edit one function.
"""

from __future__ import annotations

from typing import Any

__all__ = ["REPRODUCE", "supernode_section"]

REPRODUCE = [
    "make bench-supernode          # supernode lookups/announces per core, memory per entry",
]

GOAL = 20_000  # lookups per second per core, memory store (DESIGN §6)


def _rate(x: float) -> str:
    return f"{x:,.0f}"


def supernode_section(r: dict[str, Any] | None, number: int) -> list[str]:
    out = [f"## {number}. Supernode: lookups and announces per core, memory per indexed entry",
           ""]
    if r is None:
        return [*out, "Not measured yet: run `make bench-supernode` "
                      "(`.venv/bin/python bench/supernode_bench.py`).", ""]
    p = r["params"]
    m = r["medians"]
    batches: list[int] = p["lookup_batches"]
    big = max(batches)
    headline = m["memory"][f"lookup_{big}"]["per_cpu_s"]
    verdict = "met" if headline >= GOAL else "**NOT met**"
    out += [
        f"`dfagent supernode` runs as a separate process (one core for the API); this process "
        f"loads it over loopback HTTP with {p['concurrency']} keep-alive connections. Index: "
        f"{p['peers']} registered peers, {p['chunks']:,} distinct chunk digests, each announced "
        f"by {p['holders']} random peers ({p['chunks'] * p['holders']:,} entries), announced in "
        f"batches of {p['announce_batch']:,}. Lookups: random indexed digests, a registered "
        f"requester, k = {p['k']}. *Per core* = digests served ÷ CPU seconds of the supernode "
        "process (utime + stime from /proc), so it does not depend on how fast the load "
        "generator is; *wall* = digests ÷ elapsed time with the generator sharing the "
        "machine's 2 cores (with Redis: three processes on 2 cores). Redis CPU is the "
        f"redis-server process's, reported apart. Medians of {r['runs']} runs, stores in "
        f"rotating order. Measured {r['machine']['date']}, {r['machine'].get('revision', '')}.",
        "",
        f"**Goal: ≥ {GOAL:,} lookups/s per core, memory store — {verdict}: "
        f"{_rate(headline)} lookups per CPU-second in batches of {big}** (how the client "
        "sends them: `SupernodeClient.lookup` takes any number of digests). One digest per "
        "request is bound by HTTP request handling, not by the index: "
        f"{_rate(m['memory']['lookup_1']['per_cpu_s'])}/CPU-s.",
        "",
        "| store | operation | per core (per supernode CPU-s) | wall rate | Redis CPU per "
        "1,000 |",
        "|---|---|---:|---:|---:|",
    ]
    ops = [("announce", f"announce, {p['announce_batch']:,} per request")] + [
        (f"lookup_{b}", f"lookup, {b} per request") for b in batches]
    for store in ("memory", "redis"):
        if store not in m:
            continue
        for key, label in ops:
            x = m[store][key]
            items = x["per_wall_s"] * x["wall_s"]
            redis_ms = (f"{x['redis_cpu_s'] / items * 1e6:.1f} ms" if store == "redis"
                        else "-")
            out.append(f"| {store} | {label} | {_rate(x['per_cpu_s'])}/s | "
                       f"{_rate(x['per_wall_s'])}/s | {redis_ms} |")
    inproc = r["in_process"]["per_cpu_s"]
    out += [
        "",
        f"Without HTTP (`Scheduler.lookup` called in-process on the memory store, batches of "
        f"100): {_rate(inproc)} lookups per CPU-second — the index and ranking alone; the rest "
        "of the per-request cost above is aiohttp and JSON.",
        "",
        "### Memory per indexed (peer, chunk) entry",
        "",
        "| store | holders per chunk | entries | bytes per entry | bytes per chunk |",
        "|---|---:|---:|---:|---:|",
    ]
    for e in r["memory"]:
        out.append(f"| memory | {e['holders']} | {e['entries']:,} | "
                   f"{e['bytes_per_entry']:.0f} | {e['bytes_per_chunk']:.0f} |")
    if "redis" in m:
        out.append(f"| redis | {p['holders']} | {p['chunks'] * p['holders']:,} | "
                   f"{m['redis']['memory']['bytes_per_entry']:.0f} | "
                   f"{m['redis']['memory']['bytes_per_entry'] * p['holders']:.0f} |")
    out += [
        "",
        "Memory store: bytes allocated while building the index, under `tracemalloc` (digest "
        "strings fresh per announce, as they arrive from JSON). Each digest costs its string "
        "and one holder set once; each entry one slot in the digest's holder set and one in the "
        "peer's held set, so the cost per entry falls as more peers hold the same chunk — the "
        "P2P case. Redis: growth of `used_memory` (INFO) over the announce phase ÷ entries. "
        "At these rates 1 GiB of supernode memory indexes millions of entries: "
        f"{2**30 / r['memory'][0]['bytes_per_entry'] / 1e6:.1f} M with one holder per chunk.",
        "",
    ]
    return out

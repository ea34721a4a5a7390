"""Compare code revisions (or peer configs) on the fan-out, P2P only, in interleaved single runs.

Why: on this shared 2-core machine a revision's fan-out time drifts by seconds from hour to
hour (docs/benchmarks.md, section 8, "Noise"), so two benchmarks taken at different times say
little about a change. Runs alternated round by round — A, B, A, B, ... — see the same hours.

Each variant is ``NAME=REV`` or ``NAME=.`` (the working tree as it is), optionally followed
by ``::YAML``, extra peer config for that variant (``fanout_bench.py --peer-config``). For a
git revision its ``dfagent`` and ``nydusfs`` are exported to ``bench/.cache/ab/NAME``, put
first on the ``PYTHONPATH`` of every process the benchmark starts, and the benchmark runs
from there (``python -m`` looks in the current directory first); the harness,
``fanout_bench.py``, is this checkout's, the same for all variants::

    bench/fanout_ab.py --rounds 4 before=HEAD~1 after=.
    bench/fanout_ab.py base=. 'hedge4=.::fetch: {hedge_after: 4s}'

Each run prints one line: all nodes done, machine CPU, when the registry had sent 99% of
what it served (``reg_end``), the bytes each node received twice (hedges), and where an
egress above 1.00 would come from (chunks read from the source other than under the node's
lease, and bad-peer reports, by reason, summed over the nodes); at the end the medians per
variant and the rounds each variant won. Raw lines go to
``bench/.cache/results/fanout-ab.json``, each run's whole result to
``fanout-ab-NAME-rROUND.json`` beside it. Needs what ``fanout_bench.py`` needs (root, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import BENCH_DIR, CACHE_DIR, REPO_DIR, RESULTS_DIR, median, save_result

PACKAGES = ("dfagent", "nydusfs")


@dataclass(frozen=True)
class Variant:
    name: str
    rev: str  # "." = the working tree
    peer_config: str = ""
    path: Path | None = None  # exported code, first on PYTHONPATH (None: the working tree)


def parse_variant(spec: str) -> Variant:
    """``NAME=REV[::YAML]``; raises ``ValueError`` with what is wrong."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"variant {spec!r}: expected NAME=REV or NAME=REV::YAML")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"variant {spec!r}: NAME must be letters, digits, - or _")
    rev, _, yaml = rest.partition("::")
    return Variant(name, rev, yaml)


def export(v: Variant) -> Variant:
    """The variant with its revision's packages exported under ``bench/.cache/ab/NAME``."""
    if v.rev == ".":
        return v
    dest = CACHE_DIR / "ab" / v.name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tempfile.TemporaryFile() as tmp:
        subprocess.run(["git", "-C", str(REPO_DIR), "archive", "--format=tar", v.rev,
                        *PACKAGES], stdout=tmp, check=True)
        tmp.seek(0)
        with tarfile.open(fileobj=tmp) as tar:
            tar.extractall(dest, filter="data")
    return Variant(v.name, v.rev, v.peer_config, dest)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of the one P2P sample in a ``fanout_bench.py`` result."""
    s = result["samples"]["p2p"][0]
    served = s["registry_served_bytes"]
    tl = s["timeline"]
    sent, reg_end = 0.0, float("nan")
    for t, b in zip(tl["t"], tl["tx"]["reg"], strict=True):
        sent += b
        if sent >= 0.99 * served:
            reg_end = t
            break
    pm = s["peer_metrics"]
    dup = [m.get("dfagent_peer_duplicate_bytes_total", 0.0) for m in pm.values()]
    # What an egress above 1.00 comes from: chunks read from the source other than under
    # this node's lease, and peers reported bad, summed over the nodes by reason.
    unleased: dict[str, float] = {}
    reports: dict[str, float] = {}
    for m in pm.values():
        for key, value in m.items():
            name, _, label = key.partition("{")
            reason = label.split('"')[1] if '"' in label else ""
            if name == "dfagent_peer_source_fetches_total" and reason != "leased" and value:
                unleased[reason] = unleased.get(reason, 0.0) + value
            elif name == "dfagent_peer_bad_peer_reports_total" and value:
                reports[reason] = reports.get(reason, 0.0) + value
    return {"seconds": s["seconds"], "bound_ratio": s["seconds"] / result["lower_bound_s"],
            "cpu_s": s["cpu_s"], "egress": served / result["image"]["blob_bytes"],
            "reg_end_s": reg_end, "dup_mb_per_node": median(dup) / 1e6 if dup else 0.0,
            "unleased_source_chunks": unleased, "bad_peer_reports": reports}


def _counts(by_reason: dict[str, float]) -> str:
    return ",".join(f"{k}={v:.0f}" for k, v in sorted(by_reason.items())) or "-"


def run_one(v: Variant, rnd: int, extra: list[str]) -> dict[str, Any]:
    env = dict(os.environ)
    if v.path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(v.path), env.get("PYTHONPATH", "")]).strip(
            os.pathsep)
    name = "fanout-ab-last"
    cmd = [sys.executable, str(BENCH_DIR / "fanout_bench.py"), "--methods", "p2p", "--runs",
           "1", "--save-as", name, *extra]
    if v.peer_config:
        cmd += ["--peer-config", v.peer_config]
    # The benchmark's processes run ``python -m dfagent.cli``, and -m puts the current
    # directory first on sys.path, before PYTHONPATH: run from the variant's own tree.
    cwd = v.path if v.path is not None else REPO_DIR
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{v.name} round {rnd}: fanout_bench.py failed:\n{proc.stderr[-2000:]}")
    # Each run's whole result stays, for a closer look at an odd one.
    kept = RESULTS_DIR / f"fanout-ab-{v.name}-r{rnd}.json"
    shutil.copyfile(RESULTS_DIR / f"{name}.json", kept)
    with open(kept) as f:
        return summarize(json.load(f))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", metavar="NAME=REV[::YAML]")
    ap.add_argument("--rounds", type=int, default=3, help="runs per variant (alternating)")
    ap.add_argument("--rate", default="100mbit", help="tbf rate of every link")
    args = ap.parse_args()
    try:
        variants = [parse_variant(s) for s in args.variants]
    except ValueError as exc:
        ap.error(str(exc))
    if len({v.name for v in variants}) != len(variants):
        ap.error("variant names must differ")
    variants = [export(v) for v in variants]
    rows: list[dict[str, Any]] = []
    for rnd in range(1, args.rounds + 1):
        for v in variants:
            fig = run_one(v, rnd, ["--rate", args.rate])
            rows.append({"variant": v.name, "rev": v.rev, "peer_config": v.peer_config,
                         "round": rnd, **fig})
            print(f"round {rnd} {v.name:>12}: {fig['seconds']:5.1f} s "
                  f"(x{fig['bound_ratio']:.2f}), CPU {fig['cpu_s']:3.0f} s, reg_end "
                  f"{fig['reg_end_s']:4.1f} s, egress {fig['egress']:.2f}, dup "
                  f"{fig['dup_mb_per_node']:.1f} MB/node; unleased source "
                  f"{_counts(fig['unleased_source_chunks'])}, reports "
                  f"{_counts(fig['bad_peer_reports'])}", flush=True)
    print("\nmedians:")
    for v in variants:
        mine = [r for r in rows if r["variant"] == v.name]
        wins = sum(1 for r in mine if r["seconds"] == min(
            o["seconds"] for o in rows if o["round"] == r["round"]))
        print(f"  {v.name:>12}: {median([r['seconds'] for r in mine]):5.1f} s, CPU "
              f"{median([r['cpu_s'] for r in mine]):3.0f} s, reg_end "
              f"{median([r['reg_end_s'] for r in mine]):4.1f} s; fastest in {wins} of "
              f"{len(mine)} rounds")
    out = save_result("fanout-ab", {"rate": args.rate, "rounds": args.rounds, "runs": rows})
    print(f"raw lines in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Mount-to-ready time of ``nydusfs mount --background``: must not grow with the file count.

Bootstraps of N files are synthesized with the format writer exactly as ``lookup_bench.py`` does
(one 4 KiB chunk per file, 64 files per directory, below an 8-level directory chain), with an
empty ``blobs/`` directory beside them: nothing is read from a blob, so only what mounting
costs is measured. Mount-to-ready is the wall time of the ``nydusfs mount --background``
command, which returns once the daemon reports the FUSE mount ready; that includes starting
two Python processes (the command and the daemon), a constant. Then the first ``stat`` of the
deepest file (a lookup per path component through the kernel) and ``nydusfs umount``.

Each round mounts every size twice: *cold* after dropping the page cache (the bootstrap is read
from disk) and *warm* right after; sizes interleaved, their order reversed every round.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import (
    CACHE_DIR,
    REPO_DIR,
    can_run,
    drop_caches,
    machine_info,
    median,
    process_alive,
    save_result,
)
from lookup_bench import build as build_bootstrap

NYDUSFS = [sys.executable, "-m", "nydusfs.cli"]
WAIT = 60.0


def mount_once(bootstrap: Path, mnt: Path, deep: str) -> tuple[float, float, float]:
    """(mount-to-ready, first stat of ``deep``, umount-to-daemon-gone) in seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([*NYDUSFS, "mount", str(bootstrap), str(mnt), "--background"],
                          capture_output=True, text=True, timeout=WAIT, check=False)
    t_mount = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"nydusfs mount failed: {proc.stderr.strip()}")
    m = re.search(r"daemon pid (\d+)", proc.stdout)
    pid = int(m.group(1)) if m else None
    try:
        t0 = time.perf_counter()
        st = os.stat(mnt / deep)
        t_stat = time.perf_counter() - t0
        if st.st_size != 4096:
            raise RuntimeError(f"{deep}: size {st.st_size}, expected 4096")
    finally:
        t0 = time.perf_counter()
        subprocess.run([*NYDUSFS, "umount", str(mnt)], capture_output=True, timeout=WAIT,
                       check=False)
        deadline = time.monotonic() + WAIT
        while pid is not None and process_alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        t_umount = time.perf_counter() - t0
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=WAIT)
    return t_mount, t_stat, t_umount


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000,200000", help="file counts")
    ap.add_argument("--runs", type=int, default=5, help="interleaved rounds over all sizes")
    ap.add_argument("--workdir", type=Path, default=CACHE_DIR / "mount")
    args = ap.parse_args(argv)
    if not can_run("mount_bench"):
        return 1
    sizes = [int(s) for s in args.sizes.split(",")]
    work: Path = args.workdir
    mnt = work / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)

    images: dict[int, tuple[Path, str]] = {}
    cases: dict[int, dict[str, Any]] = {}
    for n in sizes:
        d = work / f"files-{n}"
        (d / "blobs").mkdir(parents=True, exist_ok=True)  # empty: no blob is ever read
        deep, secs = build_bootstrap(n, d / "bootstrap")
        images[n] = (d / "bootstrap", deep)
        cases[n] = {"files": n, "bootstrap_bytes": (d / "bootstrap").stat().st_size,
                    "write_seconds": secs, "samples": {"cold": [], "warm": []}}
        print(f"built {n:>7} files: {cases[n]['bootstrap_bytes']} bytes, {secs:.2f} s",
              file=sys.stderr)

    drop_ok = True
    for rnd in range(args.runs):
        for n in sizes if rnd % 2 == 0 else list(reversed(sizes)):
            bootstrap, deep = images[n]
            drop_ok = drop_caches() and drop_ok
            for mode in ("cold", "warm"):
                t_mount, t_stat, t_umount = mount_once(bootstrap, mnt, deep)
                cases[n]["samples"][mode].append(
                    {"mount": t_mount, "first_stat": t_stat, "umount": t_umount})
                print(f"round {rnd + 1}/{args.runs} {n:>7} files {mode}: mount "
                      f"{t_mount * 1e3:6.0f} ms, first stat {t_stat * 1e3:5.1f} ms, umount "
                      f"{t_umount * 1e3:5.0f} ms", file=sys.stderr)
    for n in sizes:
        c = cases[n]
        c["medians"] = {mode: {k: median([s[k] for s in c["samples"][mode]])
                               for k in ("mount", "first_stat", "umount")}
                        for mode in ("cold", "warm")}
    lo, hi = min(sizes), max(sizes)
    result: dict[str, Any] = {
        "machine": machine_info(),
        "command": "make bench-read   # .venv/bin/python bench/mount_bench.py --runs N",
        "runs": args.runs,
        "drop_caches": drop_ok,
        "sizes": [lo, hi],
        "cases": [cases[n] for n in sizes],
        "ratio_mount_warm": cases[hi]["medians"]["warm"]["mount"]
        / cases[lo]["medians"]["warm"]["mount"],
        "ratio_mount_cold": cases[hi]["medians"]["cold"]["mount"]
        / cases[lo]["medians"]["cold"]["mount"],
    }
    out = save_result("mount", result)
    for n in sizes:
        (work / f"files-{n}" / "bootstrap").unlink(missing_ok=True)  # regenerated every run
    print(f"mount-to-ready {hi} vs {lo} files: ratio {result['ratio_mount_warm']:.2f} warm, "
          f"{result['ratio_mount_cold']:.2f} cold; raw results in {out.relative_to(REPO_DIR)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

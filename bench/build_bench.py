"""Build time and output size on a realistic rootfs: nydusfs build vs mksquashfs -comp zstd.

Input: the Debian-package rootfs made by ``bench/rootfs.sh`` (bench/.cache/rootfs). Each run
times, in a rotating order so drift hits every tool alike:

- ``nydusfs build ROOTFS -o OUT --json``                                   (the subject)
- ``mksquashfs ROOTFS OUT.sqfs -comp zstd -noappend -quiet -processors P`` (the baseline)
- the same with ``-Xcompression-level 3``  (mksquashfs's zstd default is level 15; nydusfs uses 3)
- ``tar -C ROOTFS -cf - . | zstd -3``     (what an OCI layer costs; size reference)

with a warm page cache, and again after dropping it (``--cache cold``, root only; skipped with a
note when the kernel refuses). The headline is median(nydusfs) / median(mksquashfs), goal <= 1.0.
Then: output sizes, reproducibility (every nydusfs build, plus one with ``--workers 1``, must give
byte-identical bootstrap and blobs, hashed here rather than trusted from the summary) and a
``nydusfs check --blob-dir`` of the result, which must pass.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import (
    CACHE_DIR,
    REPO_DIR,
    drop_caches,
    machine_info,
    median,
    save_result,
    tool_version,
)

NYDUSFS = "nydusfs"
SQUASH = "mksquashfs"
SQUASH3 = "mksquashfs-l3"
TARZST = "tar-zstd"
TOOLS = (NYDUSFS, SQUASH, SQUASH3, TARZST)


@dataclass
class Sample:
    wall: float
    cpu: float  # user + sys of the child processes
    size: int


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def tree_stats(root: Path) -> dict[str, int]:
    """Entries and bytes of regular file data (hardlinks once), as ``du --apparent-size``."""
    entries = files = data = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        entries += len(dirnames) + len(filenames)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_mode & 0o170000) == 0o100000 and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                files += 1
                data += st.st_size
    return {"entries": entries, "regular_files": files, "data_bytes": data}


def timed(cmd: list[str], stdout_path: Path | None = None) -> tuple[float, float]:
    """Run ``cmd``; return (wall, child cpu) seconds. Raise with its stderr if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(stdout_path or os.devnull, "wb") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise SystemExit(f"build_bench: {' '.join(cmd)} failed ({proc.returncode}): {err}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def image_files(out: Path) -> dict[str, str]:
    """sha256 of the bootstrap and of every blob in a nydusfs output directory."""
    files = {"bootstrap": sha256_file(out / "bootstrap")}
    for blob in sorted((out / "blobs").iterdir()):
        digest = sha256_file(blob)
        if digest != blob.name:
            raise SystemExit(f"build_bench: blob {blob} is named {blob.name}, holds {digest}")
        files[f"blobs/{blob.name}"] = digest
    return files


def image_size(out: Path) -> int:
    return (out / "bootstrap").stat().st_size + sum(
        b.stat().st_size for b in (out / "blobs").iterdir()
    )


class Bench:
    def __init__(self, nydusfs: str, rootfs: Path, work: Path, procs: int) -> None:
        self.nydusfs = nydusfs
        self.rootfs = rootfs
        self.work = work
        self.procs = procs
        self.summary: dict[str, Any] = {}
        self.images: list[dict[str, str]] = []

    def command(self, tool: str) -> list[str]:
        r, w = str(self.rootfs), self.work
        squash = [SQUASH, r, str(w / "out.sqfs"), "-comp", "zstd", "-noappend", "-quiet",
                  "-processors", str(self.procs)]
        if tool == NYDUSFS:
            return [self.nydusfs, "build", r, "-o", str(w / "nydusfs"), "--json"]
        if tool == SQUASH:
            return squash
        if tool == SQUASH3:
            return [*squash, "-Xcompression-level", "3"]
        if tool == TARZST:
            script = 'tar -C "$1" -cf - . | zstd -3 -q -c > "$2"'
            return ["bash", "-o", "pipefail", "-c", script, "_", r, str(w / "out.tar.zst")]
        raise ValueError(tool)

    def display(self, tool: str) -> str:
        """The command as a reader would type it."""
        if tool == TARZST:
            return "tar -C ROOTFS -cf - . | zstd -3 -q -c > OUT/out.tar.zst"
        words = [w.replace(str(self.work), "OUT").replace(str(self.rootfs), "ROOTFS")
                 for w in self.command(tool)]
        words[0] = Path(words[0]).name if tool == NYDUSFS else words[0]
        return " ".join(words)

    def clean(self) -> None:
        shutil.rmtree(self.work / "nydusfs", ignore_errors=True)
        for name in ("out.sqfs", "out.tar.zst", "nydusfs.json"):
            (self.work / name).unlink(missing_ok=True)

    def run(self, tool: str, cold: bool) -> Sample:
        self.clean()
        if cold:
            drop_caches()
        else:
            os.sync()
        summary_path = self.work / "nydusfs.json"
        wall, cpu = timed(self.command(tool), summary_path if tool == NYDUSFS else None)
        if tool == NYDUSFS:
            self.summary = json.loads(summary_path.read_text())
            self.images.append(image_files(self.work / "nydusfs"))
            size = image_size(self.work / "nydusfs")
        elif tool == TARZST:
            size = (self.work / "out.tar.zst").stat().st_size
        else:
            size = (self.work / "out.sqfs").stat().st_size
        return Sample(wall, cpu, size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per tool and cache state")
    ap.add_argument("--cache", choices=["warm", "cold", "both"], default="both")
    ap.add_argument("--rootfs", type=Path, default=CACHE_DIR / "rootfs")
    ap.add_argument("--workdir", type=Path, default=CACHE_DIR / "build")
    ap.add_argument("--nydusfs", default=str(REPO_DIR / ".venv" / "bin" / "nydusfs"))
    args = ap.parse_args(argv)

    if not (args.rootfs / "usr").is_dir():
        raise SystemExit(f"build_bench: no rootfs at {args.rootfs}; run bench/rootfs.sh first")
    for exe in (args.nydusfs, SQUASH, "zstd", "tar"):
        if shutil.which(exe) is None:
            raise SystemExit(f"build_bench: {exe} not found (make setup installs it)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    procs = os.cpu_count() or 1
    bench = Bench(args.nydusfs, args.rootfs.resolve(), args.workdir.resolve(), procs)

    modes = ["warm", "cold"] if args.cache == "both" else [args.cache]
    notes: list[str] = []
    if "cold" in modes and not drop_caches():
        modes.remove("cold")
        notes.append("cold-cache runs skipped: cannot write /proc/sys/vm/drop_caches")
    if not modes:
        raise SystemExit("build_bench: nothing to run (cold cache unavailable)")

    stats = tree_stats(args.rootfs)
    print(f"rootfs {args.rootfs}: {stats['data_bytes'] / 1e6:.0f} MB, "
          f"{stats['entries']} entries", file=sys.stderr)
    # One untimed build of each first: warms the page cache, compiles .pyc, loads the binaries.
    for tool in TOOLS:
        bench.run(tool, cold=False)

    samples: dict[str, dict[str, list[Sample]]] = {m: {t: [] for t in TOOLS} for m in modes}
    for mode in modes:
        for i in range(args.runs):
            order = TOOLS[i % len(TOOLS):] + TOOLS[: i % len(TOOLS)]
            for tool in order:
                s = bench.run(tool, cold=mode == "cold")
                samples[mode][tool].append(s)
                print(f"{mode} run {i + 1}/{args.runs} {tool:14} {s.wall:7.2f} s wall "
                      f"{s.cpu:7.2f} s cpu {s.size / 1e6:8.1f} MB", file=sys.stderr)

    # Reproducibility across thread counts: one more build with a single worker.
    bench.clean()
    wall1, _ = timed([*bench.command(NYDUSFS), "--workers", "1"], bench.work / "nydusfs.json")
    bench.images.append(image_files(bench.work / "nydusfs"))
    reproducible = all(img == bench.images[0] for img in bench.images)

    t0 = time.perf_counter()
    proc = subprocess.run(
        [args.nydusfs, "check", str(bench.work / "nydusfs" / "bootstrap"),
         "--blob-dir", str(bench.work / "nydusfs" / "blobs")],
        capture_output=True, text=True, check=False,
    )
    check_seconds = time.perf_counter() - t0
    check_ok = proc.returncode == 0
    if not check_ok:
        print(f"nydusfs check FAILED: {proc.stderr.strip()}", file=sys.stderr)

    timings: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in modes:
        timings[mode] = {}
        for tool in TOOLS:
            ss = samples[mode][tool]
            timings[mode][tool] = {
                "wall": [s.wall for s in ss],
                "cpu": [s.cpu for s in ss],
                "wall_median": median([s.wall for s in ss]),
                "cpu_median": median([s.cpu for s in ss]),
            }
    first_mode = modes[0]
    sizes = {tool: samples[first_mode][tool][-1].size for tool in TOOLS}
    ratios = {
        mode: {
            "nydusfs_vs_mksquashfs": timings[mode][NYDUSFS]["wall_median"]
            / timings[mode][SQUASH]["wall_median"],
            "nydusfs_vs_mksquashfs_l3": timings[mode][NYDUSFS]["wall_median"]
            / timings[mode][SQUASH3]["wall_median"],
        }
        for mode in modes
    }
    result: dict[str, Any] = {
        "machine": machine_info(),
        "command": f"make bench-build BENCH_RUNS={args.runs}   "
        f"# bench/rootfs.sh && .venv/bin/python bench/build_bench.py --runs {args.runs}",
        "commands": [[t, bench.display(t)] for t in TOOLS],
        "versions": {
            "mksquashfs": tool_version([SQUASH, "-version"]),
            "zstd": tool_version(["zstd", "--version"]),
            "tar": tool_version(["tar", "--version"]),
        },
        "runs": args.runs,
        "modes": modes,
        "notes": notes,
        "rootfs": {**stats, "packages": _packages(args.rootfs)},
        "timings": timings,
        "ratios": ratios,
        "sizes": sizes,
        "size_ratios": {
            "nydusfs_vs_mksquashfs": sizes[NYDUSFS] / sizes[SQUASH],
            "nydusfs_vs_mksquashfs_l3": sizes[NYDUSFS] / sizes[SQUASH3],
            "nydusfs_vs_tar_zstd": sizes[NYDUSFS] / sizes[TARZST],
        },
        "nydusfs_summary": {k: v for k, v in bench.summary.items() if k != "bootstrap"},
        "reproducible": reproducible,
        "reproducible_builds": len(bench.images),
        "workers1_seconds": wall1,
        "check_ok": check_ok,
        "check_seconds": check_seconds,
    }
    out = save_result("build", result)
    for mode in modes:
        print(f"{mode}: nydusfs/mksquashfs time ratio "
              f"{ratios[mode]['nydusfs_vs_mksquashfs']:.2f}", file=sys.stderr)
    print(f"size nydusfs/mksquashfs {result['size_ratios']['nydusfs_vs_mksquashfs']:.3f}, "
          f"reproducible={reproducible}, check={'ok' if check_ok else 'FAILED'}; "
          f"raw results in {out.relative_to(REPO_DIR)}", file=sys.stderr)
    shutil.rmtree(bench.work, ignore_errors=True)
    return 0 if reproducible and check_ok else 1


def _packages(rootfs: Path) -> str:
    stamp = rootfs.parent / f"{rootfs.name}.packages"
    try:
        return stamp.read_text().strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())

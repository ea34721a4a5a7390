"""Reading through a nydusfs mount vs squashfuse vs the native directory, same files.

Inputs: the Debian rootfs of ``bench/rootfs.sh`` (~145 MB, ~5100 entries) and, for the metadata
walks, a synthetic tree of ``--meta-files`` small files (100k by default). Each is built once per
run into a nydusfs image (``nydusfs build``: localfs backend, blobs on the local disk, so
"chunks cached locally") and a squashfs image (``mksquashfs -comp zstd``), mounted with
``nydusfs mount --background`` and ``squashfuse`` (and ``squashfuse_ll`` for context).

Every measurement starts from a *fresh mount* and a dropped page cache (``echo 3 >
/proc/sys/vm/drop_caches``; refused without root, which the results record), so neither the
kernel nor a daemon's in-memory chunk cache holds anything: that is the *cold* number. The same
operation repeated at once is the *warm* number (page cache, dentry and attribute caches hot).
Operations:

- ``seq``: ``find MNT -xdev -type f -print0 | xargs -0 cat > /dev/null`` (every regular file
  read fully, in a handful of processes); MB/s of file data;
- ``big``: ``cat`` of the files ≥ 1 MiB only (one process): data throughput without the
  per-file open/lookup cost that dominates ``seq`` once the data is in the page cache;
- ``rand``: 4 KiB ``pread`` at random 4 KiB-aligned offsets of the files ≥ 1 MiB (same
  offsets, same order for every target), one process; reads/s;
- ``find``: ``find MNT -xdev | wc -l``;  ``ls``: ``ls -lR MNT > /dev/null``;
- ``python``: ``runc run`` of ``python3 -B -c 'import json, email, http.client'`` with the mount
  (or the directory) as a read-only root (skipped without runc).

Targets run in rotating order round by round, so drift of the machine hits all of them alike.
Raw samples go to ``bench/.cache/results/read.json``; ``report.py`` renders the medians.

A subset can be rerun alone: ``--datasets meta --phases find`` measures only ``find`` on the
synthetic tree (``--reuse-images`` skips rebuilding images already in the work directory), and
``--merge`` folds the new samples into the existing ``read.json``, replacing only the phases
measured and recording the rerun (date, revision, what) for the report to state; a subset
without ``--merge`` is saved as ``read-subset.json``, which the report does not read.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib import (
    BENCH_DIR,
    CACHE_DIR,
    REPO_DIR,
    can_run,
    drop_caches,
    load_result,
    machine_info,
    median,
    process_alive,
    save_result,
    tool_version,
)

NYDUSFS = [sys.executable, "-m", "nydusfs.cli"]
PYTHON_ARGS = ["/usr/bin/python3", "-B", "-c", "import json, email, http.client"]
RAND_BLOCK = 4096
RAND_MIN_FILE = 1 << 20
WAIT = 60.0  # bound on every mount/umount wait

ROOTFS_PHASES = ["seq", "big", "rand", "find", "ls", "python"]
META_PHASES = ["find", "ls"]

Sample = dict[str, float]  # {"cold": seconds, "warm": seconds}


def sh(cmd: str, timeout: float = 600.0) -> float:
    """Run ``cmd`` with bash (pipefail); return its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {WAIT:.0f} s waiting for {what}")
        time.sleep(0.02)


class Target:
    """Something to read from: ``mount()`` returns the directory, ``umount()`` releases it."""

    name = ""

    def mount(self) -> Path:
        raise NotImplementedError

    def umount(self) -> None:
        pass


class Native(Target):
    name = "native"

    def __init__(self, root: Path) -> None:
        self.root = root

    def mount(self) -> Path:
        return self.root


class Nydusfs(Target):
    name = "nydusfs"

    def __init__(self, image: Path, mnt: Path) -> None:
        self.image, self.mnt = image, mnt
        self.pid: int | None = None

    def mount(self) -> Path:
        self.mnt.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([*NYDUSFS, "mount", str(self.image / "bootstrap"), str(self.mnt),
                               "--background"], capture_output=True, text=True, timeout=WAIT,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"nydusfs mount failed: {proc.stderr.strip()}")
        m = re.search(r"daemon pid (\d+)", proc.stdout)
        self.pid = int(m.group(1)) if m else None
        return self.mnt

    def umount(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run([*NYDUSFS, "umount", str(self.mnt)], check=False, timeout=WAIT,
                           capture_output=True)
        if self.pid is not None:
            pid = self.pid
            try:
                _wait_until(lambda: not process_alive(pid), f"nydusfs daemon {pid} to exit")
            except RuntimeError:
                os.kill(pid, signal.SIGKILL)
            self.pid = None
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], check=False, timeout=WAIT)


class Squashfuse(Target):
    def __init__(self, image: Path, mnt: Path, binary: str = "squashfuse") -> None:
        self.image, self.mnt, self.name = image, mnt, binary
        self.proc: subprocess.Popen[bytes] | None = None

    def mount(self) -> Path:
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([self.name, "-f", str(self.image), str(self.mnt)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        proc = self.proc
        _wait_until(lambda: os.path.ismount(self.mnt) or proc.poll() is not None,
                    f"{self.name} mount")
        if not os.path.ismount(self.mnt):
            raise RuntimeError(f"{self.name} exited with status {proc.returncode}")
        return self.mnt

    def umount(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", str(self.mnt)], check=False, timeout=WAIT)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=WAIT)
            self.proc = None


# --------------------------------------------------------------------------- inputs


def tree_facts(root: Path) -> dict[str, Any]:
    entries = files = data = 0
    big: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        entries += len(dirnames)
        for name in filenames:
            entries += 1
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                data += st.st_size
                if st.st_size >= RAND_MIN_FILE:
                    big.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_size))
    return {"entries": entries + 1, "regular_files": files, "data_bytes": data,
            "big_files": sorted(big)}


def make_meta_tree(root: Path, n_files: int) -> None:
    """``n_files`` small files (10..400 bytes), 100 per directory, directories 2 levels deep."""
    stamp = root.with_name(root.name + ".files")
    if root.is_dir() and stamp.exists() and stamp.read_text() == str(n_files):
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(n_files)
    for i in range(n_files):
        d = root / f"d{i // 10000:02d}" / f"s{i // 100:04d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        (d / f"file{i:06d}.txt").write_bytes(b"%d\n" % i * rng.randint(1, 60))
    stamp.write_text(str(n_files))


def build_images(src: Path, out: Path, reuse: bool = False) -> dict[str, Any]:
    """nydusfs image in ``out/nydusfs``, squashfs in ``out/image.sqfs``; sizes and times.

    ``reuse``: keep images a previous run built from the same source (their build facts are
    in ``out/build.json``) instead of building again.
    """
    facts = out / "build.json"
    if reuse and facts.exists() and (out / "nydusfs" / "bootstrap").exists() and (
            out / "image.sqfs").exists():
        try:
            old: dict[str, Any] = json.loads(facts.read_text())
        except ValueError:
            old = {}
        if old.get("source") == str(src):
            return {k: v for k, v in old.items() if k != "source"}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t_nydus = sh(f"{' '.join(NYDUSFS)} build {src} -o {out / 'nydusfs'}")
    t_sqfs = sh(f"mksquashfs {src} {out / 'image.sqfs'} -comp zstd -noappend -quiet "
                f"-processors {os.cpu_count() or 1}")
    nydus_bytes = sum(p.stat().st_size for p in (out / "nydusfs").rglob("*") if p.is_file())
    build = {"nydusfs_build_s": t_nydus, "mksquashfs_s": t_sqfs, "nydusfs_bytes": nydus_bytes,
             "squashfs_bytes": (out / "image.sqfs").stat().st_size}
    facts.write_text(json.dumps({**build, "source": str(src)}))
    return build


def image_xattrs(bootstrap: Path) -> int:
    """Extended attributes in the image: with none, nydusfs answers no xattr request per file
    (the kernel is told the filesystem has none), which the report says."""
    from nydusfs.format.reader import Bootstrap

    with Bootstrap.open(bootstrap) as boot:
        return boot.header.count("xattrs")


# --------------------------------------------------------------------------- operations


def rand_plan(big_files: list[tuple[str, int]], reads: int, seed: int = 42) -> list[
        tuple[str, int]]:
    rng = random.Random(seed)
    paths = [p for p, _ in big_files]
    weights = [s for _, s in big_files]
    plan = []
    for path in rng.choices(paths, weights=weights, k=reads):
        size = dict(big_files)[path]
        plan.append((path, rng.randrange(0, max(1, size - RAND_BLOCK)) // RAND_BLOCK * RAND_BLOCK))
    return plan


def rand_reads(root: Path, plan: list[tuple[str, int]]) -> float:
    fds: dict[str, int] = {}
    t0 = time.perf_counter()
    try:
        for path, off in plan:
            fd = fds.get(path)
            if fd is None:
                fd = fds[path] = os.open(root / path, os.O_RDONLY)
            if len(os.pread(fd, RAND_BLOCK, off)) != RAND_BLOCK:
                raise RuntimeError(f"short read: {path} at {off}")
        return time.perf_counter() - t0
    finally:
        for fd in fds.values():
            os.close(fd)


class Runc:
    def __init__(self, work: Path) -> None:
        self.state = work / "runc-state"
        self.bundle = work / "runc-bundle"
        self.n = 0
        shutil.rmtree(self.bundle, ignore_errors=True)
        self.bundle.mkdir(parents=True)
        subprocess.run(["runc", "spec", "--bundle", str(self.bundle)], check=True, timeout=WAIT)
        self.config = json.loads((self.bundle / "config.json").read_text())
        self.config["process"]["terminal"] = False
        self.config["process"]["args"] = PYTHON_ARGS

    def run(self, root: Path) -> float:
        self.config["root"] = {"path": str(root), "readonly": True}
        (self.bundle / "config.json").write_text(json.dumps(self.config))
        self.n += 1
        cid = f"read-bench-{os.getpid()}-{self.n}"
        try:
            return sh(f"runc --root {self.state} run --bundle {self.bundle} {cid} < /dev/null",
                      timeout=WAIT)
        finally:
            subprocess.run(["runc", "--root", str(self.state), "delete", "--force", cid],
                           capture_output=True, check=False, timeout=WAIT)


def measure(phase: str, target: Target, facts: dict[str, Any], plan: list[tuple[str, int]],
            runc: Runc | None) -> Sample:
    """One fresh mount, dropped caches, the operation twice: cold then warm."""
    root = target.mount()
    try:
        op: Callable[[], float]
        if phase == "seq":
            def op() -> float:
                return sh(f"find {root} -xdev -type f -print0 | xargs -0 cat > /dev/null")
        elif phase == "big":
            paths = [str(root / p) for p, _ in facts["big_files"]]

            def op() -> float:
                t0 = time.perf_counter()
                subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True,
                               timeout=600)
                return time.perf_counter() - t0
        elif phase == "rand":
            def op() -> float:
                return rand_reads(root, plan)
        elif phase == "find":
            want = facts["entries"]

            def op() -> float:
                t0 = time.perf_counter()
                out = subprocess.run(f"find {root} -xdev | wc -l", shell=True, check=True,
                                     capture_output=True, text=True, timeout=600).stdout
                secs = time.perf_counter() - t0
                if int(out) != want:
                    raise RuntimeError(f"{target.name}: find saw {out.strip()} entries, "
                                       f"expected {want}")
                return secs
        elif phase == "ls":
            def op() -> float:
                return sh(f"ls -lR {root} > /dev/null")
        elif phase == "python":
            assert runc is not None

            def op() -> float:
                return runc.run(root)
        else:
            raise ValueError(phase)
        drop_caches()
        cold = op()
        warm = op()
        return {"cold": cold, "warm": warm}
    finally:
        target.umount()


def run_dataset(name: str, targets: list[Target], phases: list[str], runs: int,
                facts: dict[str, Any], plan: list[tuple[str, int]], runc: Runc | None
                ) -> dict[str, dict[str, list[Sample]]]:
    samples: dict[str, dict[str, list[Sample]]] = {
        ph: {t.name: [] for t in targets} for ph in phases}
    for rnd in range(runs):
        order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
        for phase in phases:
            for t in order:
                s = measure(phase, t, facts, plan, runc)
                samples[phase][t.name].append(s)
                print(f"{name} round {rnd + 1}/{runs} {phase:6} {t.name:13} "
                      f"cold {s['cold']:7.3f} s  warm {s['warm']:7.3f} s", file=sys.stderr)
    return samples


def summarize(samples: dict[str, dict[str, list[Sample]]]) -> dict[str, dict[str, Sample]]:
    return {ph: {t: {k: median([s[k] for s in ss]) for k in ("cold", "warm")}
                 for t, ss in by_t.items()} for ph, by_t in samples.items()}


def merge_results(previous: dict[str, Any], new: dict[str, Any], note: str = ""
                  ) -> dict[str, Any]:
    """``previous`` with the phases ``new`` measured replaced, and the rerun recorded.

    What the new run did not measure (datasets, phases) keeps its old samples, so a report
    can tell which numbers come from when: ``reruns`` lists each partial run.
    """
    merged: dict[str, Any] = json.loads(json.dumps(previous))  # a deep copy
    rerun: dict[str, Any] = {"date": new["machine"]["date"],
                             "revision": new["machine"].get("revision", ""),
                             "runs": new["runs"], "what": {}, "note": note}
    for name, ds in new["datasets"].items():
        old = merged["datasets"].get(name)
        if old is None or old["targets"] != ds["targets"]:
            merged["datasets"][name] = ds  # nothing comparable to keep
        else:
            for ph in ds["phases"]:
                old["samples"][ph] = ds["samples"][ph]
                old["medians"][ph] = ds["medians"][ph]
                if ph not in old["phases"]:
                    old["phases"].append(ph)
            old["facts"], old["build"] = ds["facts"], ds["build"]
        rerun["what"][name] = ds["phases"]
    merged.setdefault("reruns", []).append(rerun)
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="rounds over all targets (median)")
    ap.add_argument("--rootfs", type=Path, default=CACHE_DIR / "rootfs")
    ap.add_argument("--meta-files", type=int, default=100_000,
                    help="files in the synthetic tree for find/ls (0: skip it)")
    ap.add_argument("--rand-reads", type=int, default=2000)
    ap.add_argument("--workdir", type=Path, default=CACHE_DIR / "read")
    ap.add_argument("--datasets", default="rootfs,meta",
                    help="comma-separated: rootfs (the Debian tree), meta (find/ls tree)")
    ap.add_argument("--phases", default="",
                    help="comma-separated subset of " + ",".join(ROOTFS_PHASES)
                    + " (default: all of each dataset's)")
    ap.add_argument("--reuse-images", action="store_true",
                    help="keep images built by an earlier run from the same source")
    ap.add_argument("--merge", action="store_true",
                    help="fold the results into the existing read.json (only the phases run)")
    ap.add_argument("--note", default="",
                    help="with --merge: a sentence the report prints with the rerun")
    args = ap.parse_args(argv)
    wanted = {d for d in args.datasets.split(",") if d}
    only = {p for p in args.phases.split(",") if p}
    if wanted - {"rootfs", "meta"} or only - set(ROOTFS_PHASES):
        ap.error(f"unknown dataset or phase in {args.datasets!r} / {args.phases!r}")
    previous = load_result("read") if args.merge else None
    if args.merge and previous is None:
        ap.error("--merge: no earlier bench/.cache/results/read.json to merge into")
    if not can_run("read_bench"):
        return 1
    if "rootfs" in wanted and not (args.rootfs / "usr" / "bin" / "python3").exists():
        subprocess.run([str(BENCH_DIR / "rootfs.sh"), str(args.rootfs)], check=True)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("mnt-*"):  # a previous run killed half-way
        if os.path.ismount(stale):
            subprocess.run(["umount", "-l", str(stale)], check=False)
    runc = Runc(work) if shutil.which("runc") else None
    drop_ok = drop_caches()
    squash_tools = ["squashfuse"] + (["squashfuse_ll"] if shutil.which("squashfuse_ll") else [])

    datasets: dict[str, Any] = {}
    inputs: list[tuple[str, Path, list[str]]] = []
    if "rootfs" in wanted:
        inputs.append(("rootfs", args.rootfs, ROOTFS_PHASES))
    if args.meta_files and "meta" in wanted:
        meta_src = work / "meta-src"
        t0 = time.perf_counter()
        make_meta_tree(meta_src, args.meta_files)
        print(f"meta tree: {args.meta_files} files in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        inputs.append(("meta", meta_src, META_PHASES))
    for name, src, all_phases in inputs:
        phases = [p for p in all_phases if not only or p in only]
        if not phases:
            continue
        facts = tree_facts(src)
        build = build_images(src, work / f"img-{name}", reuse=args.reuse_images)
        build["nydusfs_xattrs"] = image_xattrs(work / f"img-{name}" / "nydusfs" / "bootstrap")
        print(f"{name}: {facts['entries']} entries, {facts['data_bytes'] / 1e6:.0f} MB; "
              f"build nydusfs {build['nydusfs_build_s']:.1f} s, mksquashfs "
              f"{build['mksquashfs_s']:.1f} s", file=sys.stderr)
        targets: list[Target] = [
            Native(src),
            Nydusfs(work / f"img-{name}" / "nydusfs", work / "mnt-nydusfs"),
            *(Squashfuse(work / f"img-{name}" / "image.sqfs", work / f"mnt-{tool}", tool)
              for tool in squash_tools),
        ]
        if runc is None and "python" in phases:
            phases = [p for p in phases if p != "python"]
        plan = rand_plan(facts["big_files"], args.rand_reads) if "rand" in phases else []
        samples = run_dataset(name, targets, phases, args.runs, facts, plan, runc)
        datasets[name] = {
            "facts": {k: v for k, v in facts.items() if k != "big_files"},
            "big": {"files": len(facts["big_files"]),
                    "bytes": sum(size for _, size in facts["big_files"])},
            "rand": {"files": len(facts["big_files"]), "reads": len(plan),
                     "block": RAND_BLOCK, "min_file": RAND_MIN_FILE},
            "build": build,
            "phases": phases,
            "targets": [t.name for t in targets],
            "samples": samples,
            "medians": summarize(samples),
        }
    if runc is not None:
        shutil.rmtree(runc.state, ignore_errors=True)
    pkgs = args.rootfs.with_name(args.rootfs.name + ".packages")
    result: dict[str, Any] = {
        "machine": machine_info(),
        "command": "make bench-read   # .venv/bin/python bench/read_bench.py --runs N",
        "runs": args.runs,
        "drop_caches": drop_ok,
        "packages": pkgs.read_text() if pkgs.exists() else "",
        "python_args": PYTHON_ARGS,
        "versions": {
            "squashfuse": tool_version(["dpkg-query", "-W", "-f=squashfuse ${Version}",
                                        "squashfuse"]),
            "mksquashfs": tool_version(["mksquashfs", "-version"]),
            "runc": tool_version(["runc", "--version"]),
        },
        "datasets": datasets,
    }
    subset = wanted != {"rootfs", "meta"} or bool(only)
    if previous is not None:
        result = merge_results(previous, result, args.note)
    # A subset alone is not a report's input: without --merge it goes beside, not over, it.
    out = save_result("read-subset" if subset and previous is None else "read", result)
    for name, d in datasets.items():
        m = d["medians"]
        for ph in d["phases"]:
            nyd, sq = m[ph]["nydusfs"]["cold"], m[ph]["squashfuse"]["cold"]
            print(f"{name} {ph}: nydusfs/squashfuse cold time ratio {nyd / sq:.2f}",
                  file=sys.stderr)
    print(f"raw results in {out.relative_to(REPO_DIR)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

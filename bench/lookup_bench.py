"""Bootstrap open + one path lookup: the time must not grow with the number of files.

Synthesizes bootstraps with the format writer directly (no blobs needed): N regular files of one
4 KiB chunk each, 64 per leaf directory, leaf directories spread over ~sqrt(L) top directories,
all below an 8-level directory chain, like ``usr/lib/python3/dist-packages/...``. Then measures,
interleaving the sizes round by round so drift in machine speed hits all of them alike:

- ``Bootstrap.open(path)`` + ``resolve(deepest path)`` + ``close()``  (what a mount + first
  lookup costs), median over many repetitions;
- ``resolve`` alone on an open bootstrap;
- once, for contrast, a full ``walk()`` decoding every inode: what a format that must be parsed
  at open would pay; this one grows linearly.

The ratio largest/smallest of the open+resolve median is the number to watch: ~1.0 means flat.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import stat
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import blake3
from benchlib import CACHE_DIR, REPO_DIR, machine_info, median, save_result

from nydusfs.format import (
    Bootstrap,
    BootstrapParams,
    ChunkPlacement,
    InodeSpec,
    write_bootstrap,
)

CHAIN = [b"usr", b"lib", b"python3", b"dist-packages", b"vendor", b"pkg", b"sub", b"mod"]
FILES_PER_DIR = 64
CHUNK = 4096
DIR_MODE = stat.S_IFDIR | 0o755
FILE_MODE = stat.S_IFREG | 0o644


@dataclass
class Case:
    files: int
    inodes: int
    bootstrap_bytes: int
    write_seconds: float
    deep_path: str
    depth: int
    open_resolve_us: float = 0.0
    resolve_us: float = 0.0
    walk_seconds: float = 0.0


def synth_tree(n_files: int) -> tuple[list[InodeSpec], dict[bytes, ChunkPlacement], str]:
    """The inode list, chunk placements and the deepest file's path for ``n_files`` files."""
    inodes: list[InodeSpec] = [InodeSpec(mode=DIR_MODE, size=4096, parent=1)]

    def add(parent: int, name: bytes, spec: InodeSpec) -> int:
        spec.parent = parent
        inodes.append(spec)
        ino = len(inodes)
        inodes[parent - 1].children.append((name, ino))
        return ino

    node = 1
    for name in CHAIN:
        node = add(node, name, InodeSpec(mode=DIR_MODE, size=4096))
    n_leaves = math.ceil(n_files / FILES_PER_DIR)
    n_top = math.ceil(math.sqrt(n_leaves))
    tops = [add(node, b"t%04d" % t, InodeSpec(mode=DIR_MODE, size=4096)) for t in range(n_top)]
    leaves = [
        add(tops[i % n_top], b"l%05d" % i, InodeSpec(mode=DIR_MODE, size=4096))
        for i in range(n_leaves)
    ]
    chunks: dict[bytes, ChunkPlacement] = {}
    last = ""
    for i in range(n_files):
        digest = blake3.blake3(i.to_bytes(8, "little")).digest()
        chunks[digest] = ChunkPlacement(0, 0, i * CHUNK, CHUNK, CHUNK)
        leaf = i // FILES_PER_DIR
        name = b"f%07d.py" % i
        add(leaves[leaf], name, InodeSpec(mode=FILE_MODE, size=CHUNK, chunks=[digest]))
        last = "/".join(
            [*(c.decode() for c in CHAIN), f"t{leaf % n_top:04d}", f"l{leaf:05d}", name.decode()]
        )
    return inodes, chunks, last


def build(n_files: int, out: Path) -> tuple[str, float]:
    t0 = time.perf_counter()
    inodes, chunks, deep = synth_tree(n_files)
    blob = (hashlib.sha256(b"lookup-bench").digest(), n_files * CHUNK)
    with open(out, "wb") as f:
        write_bootstrap(f, inodes, chunks, [blob], [], BootstrapParams(chunk_size=1 << 20))
    return deep, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,50000,200000", help="file counts, comma list")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds over all sizes")
    ap.add_argument("--reps", type=int, default=200, help="timed repetitions per size per round")
    ap.add_argument("--workdir", type=Path, default=CACHE_DIR / "lookup")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)

    cases: dict[int, Case] = {}
    paths: dict[int, tuple[Path, str]] = {}
    for n in sizes:
        path = args.workdir / f"files-{n}.bootstrap"
        deep, secs = build(n, path)
        with Bootstrap.open(path) as bs:
            inode_count = bs.inode_count
            assert bs.resolve(deep).size == CHUNK
        paths[n] = (path, deep)
        cases[n] = Case(
            files=n,
            inodes=inode_count,
            bootstrap_bytes=path.stat().st_size,
            write_seconds=secs,
            deep_path=deep,
            depth=deep.count("/") + 1,
        )
        print(f"built {n:>7} files: {inode_count} inodes, {path.stat().st_size} bytes, "
              f"{secs:.2f} s", file=sys.stderr)

    open_resolve: dict[int, list[float]] = {n: [] for n in sizes}
    resolve_only: dict[int, list[float]] = {n: [] for n in sizes}
    clock = time.perf_counter_ns
    for rnd in range(args.rounds):
        order = sizes if rnd % 2 == 0 else list(reversed(sizes))
        for n in order:
            path, deep = paths[n]
            samples = open_resolve[n]
            for _ in range(args.reps):
                t0 = clock()
                bs = Bootstrap.open(path)
                bs.resolve(deep)
                bs.close()
                samples.append((clock() - t0) / 1e3)
            with Bootstrap.open(path) as bs:
                samples = resolve_only[n]
                for _ in range(args.reps):
                    t0 = clock()
                    bs.resolve(deep)
                    samples.append((clock() - t0) / 1e3)

    for n in sizes:
        path, _ = paths[n]
        start = time.perf_counter()
        with Bootstrap.open(path) as bs:
            count = sum(1 for _ in bs.walk())
        c = cases[n]
        c.walk_seconds = time.perf_counter() - start
        assert count == c.inodes
        c.open_resolve_us = median(open_resolve[n])
        c.resolve_us = median(resolve_only[n])
        print(f"{n:>7} files: open+resolve {c.open_resolve_us:8.1f} us, "
              f"resolve {c.resolve_us:8.1f} us, walk {c.walk_seconds:.3f} s", file=sys.stderr)

    lo, hi = min(sizes), max(sizes)
    result: dict[str, Any] = {
        "machine": machine_info(),
        "command": "make bench-lookup   # .venv/bin/python bench/lookup_bench.py",
        "params": {"rounds": args.rounds, "reps": args.reps, "files_per_dir": FILES_PER_DIR},
        "cases": [asdict(cases[n]) for n in sizes],
        "ratio_open_resolve": cases[hi].open_resolve_us / cases[lo].open_resolve_us,
        "ratio_resolve": cases[hi].resolve_us / cases[lo].resolve_us,
        "ratio_walk": cases[hi].walk_seconds / cases[lo].walk_seconds,
        "sizes": [lo, hi],
    }
    out = save_result("lookup", result)
    for path, _ in paths.values():
        path.unlink(missing_ok=True)  # regenerated on every run
    print(f"open+resolve {hi} vs {lo} files: ratio {result['ratio_open_resolve']:.2f} "
          f"(walk: {result['ratio_walk']:.0f}x); raw results in {out.relative_to(REPO_DIR)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write docs/benchmarks.md from the raw results in bench/.cache/results/.

Run by ``make bench`` after the benchmarks (or alone: ``make bench-report``). A benchmark whose
results are missing gets a "not measured" section, so running one benchmark never drops the
other's table silently: its last numbers are only in bench/.cache, which is not committed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchlib import REPO_DIR, load_result
from fanout_report import REPRODUCE as FANOUT_REPRODUCE
from fanout_report import fanout_section, upload_section
from registry_report import REPRODUCE, coldstart_section, convert_section
from supernode_report import REPRODUCE as SUPERNODE_REPRODUCE
from supernode_report import supernode_section

MB = 1e6


def _fmt_s(x: float) -> str:
    return f"{x:.2f} s" if x >= 0.1 else f"{x * 1e3:.1f} ms"


def _machine(m: dict[str, Any]) -> list[str]:
    return [
        "| | |",
        "|---|---|",
        f"| date | {m['date']} |",
        f"| cores (nproc) | {m['nproc']} |",
        f"| CPU | {m['cpu']} |",
        f"| memory | {m['mem_bytes'] / 2**30:.1f} GiB |",
        f"| kernel | {m['kernel']} |",
        f"| Python | {m['python']} ({m['python_impl']}) |",
        f"| source | {m.get('revision', 'unknown')} |",
    ]


def build_section(r: dict[str, Any] | None) -> list[str]:
    out = ["## 1. Build: `nydusfs build` vs `mksquashfs -comp zstd`", ""]
    if r is None:
        return [*out, "Not measured yet: run `make bench-build`.", ""]
    fs = r["rootfs"]
    modes: list[str] = r["modes"]
    t = r["timings"]
    headline = r["ratios"][modes[0]]["nydusfs_vs_mksquashfs"]
    verdict = "met" if headline <= 1.0 else "**not met**"
    out += [
        f"Input: a rootfs extracted from Debian packages by `bench/rootfs.sh` "
        f"({fs['packages']}): {fs['data_bytes'] / MB:.0f} MB of file data, "
        f"{fs['entries']} entries, {fs['regular_files']} regular files. "
        f"Medians of {r['runs']} runs per tool, tools in rotating order; *warm* = page cache "
        f"hot, *cold* = page cache dropped before each run. "
        f"Measured {r['machine']['date']}, {r['machine'].get('revision', '')}.",
        "",
        f"**Goal: build time ratio nydusfs / mksquashfs ≤ 1.0 — {verdict}: "
        + ", ".join(f"{r['ratios'][m]['nydusfs_vs_mksquashfs']:.2f} ({m})" for m in modes)
        + ".**",
        "",
    ]
    head = "| tool | " + " | ".join(f"{m}: wall | {m}: CPU | {m}: ratio" for m in modes) + " |"
    out += [head, "|---|" + "---:|---:|---:|" * len(modes)]
    labels = {
        "nydusfs": "nydusfs build",
        "mksquashfs": "mksquashfs -comp zstd (baseline)",
        "mksquashfs-l3": "mksquashfs -comp zstd -Xcompression-level 3",
        "tar-zstd": "tar \\| zstd -3",
    }
    for tool, label in labels.items():
        cells = []
        for m in modes:
            tm = t[m][tool]
            ratio = tm["wall_median"] / t[m]["mksquashfs"]["wall_median"]
            cells.append(f"{_fmt_s(tm['wall_median'])} | {_fmt_s(tm['cpu_median'])} | {ratio:.2f}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += [
        "",
        "*ratio* = median wall time / median wall time of the baseline in the same mode; "
        "*CPU* = user + system time of the process tree (above wall time means both cores "
        f"were used). Throughput of nydusfs build ({modes[0]}): "
        f"{fs['data_bytes'] / MB / t[modes[0]]['nydusfs']['wall_median']:.0f} MB/s.",
        "",
        "mksquashfs's zstd default is level 15 with 128 KiB blocks; nydusfs compresses each 1 MiB "
        "chunk with zstd level 3. The level-3 row shows the comparison at equal compression "
        "level: "
        + ", ".join(f"{r['ratios'][m]['nydusfs_vs_mksquashfs_l3']:.2f} ({m})" for m in modes)
        + ".",
        "",
        "### Output size",
        "",
        "| output | bytes | MB | nydusfs / this |",
        "|---|---:|---:|---:|",
    ]
    s = r["sizes"]
    for tool, label in [
        ("nydusfs", "nydusfs bootstrap + blobs"),
        ("mksquashfs", "squashfs (zstd, default level)"),
        ("mksquashfs-l3", "squashfs (zstd level 3)"),
        ("tar-zstd", "tar \\| zstd -3"),
    ]:
        out.append(f"| {label} | {s[tool]} | {s[tool] / MB:.1f} | {s['nydusfs'] / s[tool]:.3f} |")
    summ = r["nydusfs_summary"]
    out += [""]
    if summ:
        bootstrap_size = s["nydusfs"] - sum(b["size"] for b in summ["blobs"])
        out += [
            f"nydusfs image: bootstrap {bootstrap_size / MB:.2f} MB for {summ['inodes']} inodes "
            f"({summ['files']} files, {summ['directories']} directories), "
            f"{summ['chunks']} unique chunks in {len(summ['blobs'])} blob(s), "
            f"{summ['dedup_saved_bytes'] / MB:.1f} MB saved by chunk dedup.",
            "",
        ]
    out += [
        "### Reproducibility and verification",
        "",
        f"- {r['reproducible_builds']} builds of the same tree (all runs above plus one with "
        f"`--workers 1`, {_fmt_s(r['workers1_seconds'])}): bootstrap and blobs byte-identical: "
        f"**{'yes' if r['reproducible'] else 'NO'}** (sha256 of every file compared).",
        f"- `nydusfs check --blob-dir` on the result (every offset, the Merkle tree, every "
        f"chunk digest): **{'passed' if r['check_ok'] else 'FAILED'}** in "
        f"{_fmt_s(r['check_seconds'])}.",
    ]
    out += [f"- {note}" for note in r["notes"]]
    out += ["", "Commands (ROOTFS = bench/.cache/rootfs, OUT = bench/.cache/build):", "", "```"]
    out += [cmd for _, cmd in r["commands"]]
    out += ["```", ""]
    v = r["versions"]
    out += [f"Versions: {v['mksquashfs']}; {v['zstd']}; {v['tar']}.", ""]
    return out


def lookup_section(r: dict[str, Any] | None) -> list[str]:
    out = ["## 2. Open a bootstrap and look up one path: flat in file count", ""]
    if r is None:
        return [*out, "Not measured yet: run `make bench-lookup`.", ""]
    lo, hi = r["sizes"]
    ratio = r["ratio_open_resolve"]
    verdict = "flat" if ratio <= 1.5 else "**not flat**"
    cases = r["cases"]
    p = r["params"]
    out += [
        "Bootstraps synthesized with the format writer: N regular files of one 4 KiB chunk, "
        f"{p['files_per_dir']} per directory, below an 8-level directory chain; the path "
        f"looked up is the last file, {cases[0]['depth']} components deep "
        f"(`{cases[-1]['deep_path']}`). Median of {p['rounds']} x {p['reps']} repetitions "
        f"per size, sizes interleaved round by round. "
        f"Measured {r['machine']['date']}, {r['machine'].get('revision', '')}.",
        "",
        f"**Goal: time flat from {lo:,} to {hi:,} files — {verdict} (a ratio ≤ 1.5 is counted "
        f"as flat): open + lookup ratio "
        f"{hi:,} / {lo:,} files = {ratio:.2f}** (a full walk of the tree, for contrast: "
        f"{r['ratio_walk']:.0f}x).",
        "",
        "| files | inodes | bootstrap | open + resolve + close | resolve only | "
        "ratio to smallest | full walk (decode every inode) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = cases[0]["open_resolve_us"]
    for c in cases:
        out.append(
            f"| {c['files']:,} | {c['inodes']:,} | {c['bootstrap_bytes'] / MB:.1f} MB | "
            f"{c['open_resolve_us']:.0f} µs | {c['resolve_us']:.0f} µs | "
            f"{c['open_resolve_us'] / base:.2f} | {_fmt_s(c['walk_seconds'])} |"
        )
    out += [
        "",
        "Opening maps the file and checks only the 256-byte header; a lookup is a binary search "
        "per path component over fixed-size records. What grows is logarithmic: a few more "
        "binary-search steps in bigger directories and a few more distinct pages touched in a "
        "bigger file. The walk column is what a format that must be decoded at open would pay. "
        "The bootstraps are in the page cache (they were just written).",
        "",
    ]
    return out


_TARGET_LABELS = {
    "native": "native directory (reference)",
    "nydusfs": "nydusfs (localfs, blobs on local disk)",
    "squashfuse": "squashfuse (baseline)",
    "squashfuse_ll": "squashfuse_ll",
}


def _label(target: str) -> str:
    return _TARGET_LABELS.get(target, target)


_DATASET_LABELS = {"meta": "synthetic tree", "rootfs": "rootfs"}


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def read_section(r: dict[str, Any] | None) -> list[str]:
    out = ["## 3. Reading through the mount: nydusfs vs squashfuse vs the native directory", ""]
    if r is None:
        return [*out, "Not measured yet: run `make bench-read`.", ""]
    ds = r["datasets"]["rootfs"]
    fs, b, m = ds["facts"], ds["build"], ds["medians"]
    data = fs["data_bytes"]
    targets: list[str] = ds["targets"]
    seq = m["seq"]
    seq_ratio = seq["squashfuse"]["cold"] / seq["nydusfs"]["cold"]
    big = m.get("big")
    cold_note = "" if r["drop_caches"] else (
        " **The page cache could not be dropped (not root?): every run was warm.**")
    out += [
        f"Input: the `bench/rootfs.sh` rootfs ({r['packages']}): {data / MB:.0f} MB in "
        f"{fs['regular_files']} regular files, {fs['entries']} entries; nydusfs image "
        f"{b['nydusfs_bytes'] / MB:.1f} MB (built in {_fmt_s(b['nydusfs_build_s'])}), squashfs "
        f"(`mksquashfs -comp zstd`) {b['squashfs_bytes'] / MB:.1f} MB. nydusfs is mounted with "
        "`nydusfs mount --background` and no config: backend `localfs`, blobs beside the "
        "bootstrap on the local disk (the \"chunks cached locally\" case), no disk cache, "
        f"default read settings. Medians of {r['runs']} runs, targets in rotating order. "
        "*cold* = a fresh mount and the page cache dropped (`echo 3 > "
        "/proc/sys/vm/drop_caches`) just before; *warm* = the same operation repeated at once "
        f"(re-read from the page cache).{cold_note} "
        f"Measured {r['machine']['date']}, {r['machine'].get('revision', '')}.",
        "",
        f"**Goal: sequential read throughput ≥ 0.7x squashfuse — {_verdict(seq_ratio >= 0.7)}: "
        f"{seq_ratio:.2f}x cold.**"
        + (f" **Re-reads at page-cache speed: large files re-read at "
           f"{big['native']['warm'] / big['nydusfs']['warm']:.2f}x the native directory's "
           f"warm throughput; the whole tree at "
           f"{seq['native']['warm'] / seq['nydusfs']['warm']:.2f}x.**" if big else ""),
        "",
        "| target | sequential cold | x squashfuse | re-read (warm) | x native | "
        "random 4 KiB cold | x squashfuse | random 4 KiB warm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rand = m.get("rand")
    n_rand = ds["rand"]["reads"]
    for t in targets:
        cells = [
            f"{data / MB / seq[t]['cold']:.0f} MB/s",
            f"{seq['squashfuse']['cold'] / seq[t]['cold']:.2f}",
            f"{data / MB / seq[t]['warm']:.0f} MB/s",
            f"{seq['native']['warm'] / seq[t]['warm']:.2f}",
        ]
        if rand is not None:
            cells += [
                f"{n_rand / rand[t]['cold']:,.0f} reads/s",
                f"{rand['squashfuse']['cold'] / rand[t]['cold']:.2f}",
                f"{n_rand / rand[t]['warm']:,.0f} reads/s",
            ]
        else:
            cells += ["-", "-", "-"]
        out.append(f"| {_label(t)} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Sequential: `find MNT -xdev -type f -print0 | xargs -0 cat > /dev/null` (every "
        "regular file read fully; hardlinked files count once per name). Random: "
        f"{n_rand} `pread`s of 4 KiB at 4 KiB-aligned random offsets in the "
        f"{ds['rand']['files']} files ≥ {ds['rand']['min_file'] >> 20} MiB (same offsets and "
        "order for every target), one process. The *x* columns are throughput ratios "
        "(above 1 = faster than the reference).",
        "",
    ]
    if big is not None:
        nbig, bbig = ds["big"]["files"], ds["big"]["bytes"]
        out += [
            f"Large files only: `cat` of the {nbig} files ≥ 1 MiB ({bbig / MB:.0f} MB) in one "
            "process — data throughput without the per-file lookup/open/release round trips "
            "that dominate the whole-tree re-read once the data is in the page cache.",
            "",
            "| target | large files cold | x squashfuse | large files re-read (warm) | "
            "x native |",
            "|---|---:|---:|---:|---:|",
        ]
        for t in targets:
            out.append(
                f"| {_label(t)} | {bbig / MB / big[t]['cold']:.0f} MB/s | "
                f"{big['squashfuse']['cold'] / big[t]['cold']:.2f} | "
                f"{bbig / MB / big[t]['warm']:.0f} MB/s | "
                f"{big['native']['warm'] / big[t]['warm']:.2f} |")
        out.append("")
    out += _meta_tables(r)
    out += _python_table(r)
    v = r["versions"]
    out += [f"Versions: {v['squashfuse']}; {v['mksquashfs']}; {v['runc']}.", ""]
    return out


def _current_reruns(reruns: list[dict[str, Any]]
                    ) -> list[tuple[dict[str, Any], dict[str, list[str]]]]:
    """Each rerun with the (dataset, phases) whose samples are still its own, oldest first.

    A later rerun of the same phase replaced its samples, and the earlier one's note (which
    compares with the code of its day) no longer describes the table: it is left out.
    """
    seen: set[tuple[str, str]] = set()
    out: list[tuple[dict[str, Any], dict[str, list[str]]]] = []
    for rerun in reversed(reruns):
        current = {ds: [ph for ph in phases if (ds, ph) not in seen]
                   for ds, phases in rerun["what"].items()}
        current = {ds: phases for ds, phases in current.items() if phases}
        seen.update((ds, ph) for ds, phases in rerun["what"].items() for ph in phases)
        if current:
            out.append((rerun, current))
    return out[::-1]


def _meta_tables(r: dict[str, Any]) -> list[str]:
    out = ["### Metadata walks: `find MNT -xdev | wc -l` and `ls -lR MNT > /dev/null`", ""]
    names = [n for n in ("meta", "rootfs") if n in r["datasets"]]
    goal = r["datasets"][names[0]]["medians"]
    worst = max(goal[op]["nydusfs"][mode] / goal[op]["squashfuse"][mode]
                for op in ("find", "ls") for mode in ("cold", "warm"))
    facts0 = r["datasets"][names[0]]["facts"]
    out += [
        f"**Goal: find and ls -lR ≤ 2x squashfuse on a {facts0['entries']:,}-entry image — "
        f"{_verdict(worst <= 2.0)}: worst ratio {worst:.2f}** (time ratios nydusfs / "
        "squashfuse, cold and warm, find and ls).",
        "",
    ]
    for rerun, current in _current_reruns(r.get("reruns", [])):
        what = "; ".join(f"{', '.join(phases)} on the {_DATASET_LABELS.get(ds, ds)}"
                         for ds, phases in current.items())
        out += [
            f"*Rerun alone* ({what}): medians of {rerun['runs']} runs measured "
            f"{rerun['date']}, {rerun['revision']}, every target again in rotating order "
            "(`bench/read_bench.py --datasets ... --phases ... --merge`); the other numbers "
            "of this section are from the full run above."
            + (f" {rerun['note']}" if rerun.get("note") else ""),
            "",
        ]
    for name in names:
        ds = r["datasets"][name]
        fs, m = ds["facts"], ds["medians"]
        what = (f"synthetic tree: {fs['regular_files']:,} small files, 100 per directory"
                if name == "meta" else "the rootfs above")
        out += [
            f"{fs['entries']:,} entries ({what}); image build: nydusfs "
            f"{_fmt_s(ds['build']['nydusfs_build_s'])}, mksquashfs "
            f"{_fmt_s(ds['build']['mksquashfs_s'])}.",
            "",
            "| target | find cold | find warm | ls -lR cold | ls -lR warm | "
            "x squashfuse (find cold / warm, ls cold / warm) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for t in ds["targets"]:
            ratios = " / ".join(
                f"{m[op][t][mode] / m[op]['squashfuse'][mode]:.2f}"
                for op in ("find", "ls") for mode in ("cold", "warm"))
            out.append(
                f"| {_label(t)} | {_fmt_s(m['find'][t]['cold'])} | "
                f"{_fmt_s(m['find'][t]['warm'])} | {_fmt_s(m['ls'][t]['cold'])} | "
                f"{_fmt_s(m['ls'][t]['warm'])} | {ratios} |")
        out.append("")
    out += [
        "A listing carries every entry's attributes while readers are seen to stat what they "
        "list (`ls -l`), and otherwise names and types only for all but directories (`find`), "
        "so the kernel instantiates no inode for entries nobody stats; the next listings of a "
        "walk are decoded ahead, while the daemon waits for the walker (`nydusfs/fs/fuse.py`).",
        "",
        "The daemon serves metadata from a copy of the bootstrap in memory "
        "(`read.bootstrap_memory`), read by a background thread once the mount is ready, so a "
        "cold walk does not page the bootstrap back in from disk one 4 KiB fault at a time "
        "on the event loop.",
        "",
        "Here *x squashfuse* is a time ratio (below 1 = faster than squashfuse). `ls -l` asks "
        "every file for two extended attributes (`lgetxattr security.selinux`, `getxattr "
        "system.posix_acl_access`); the kernel caches no xattr answer of a FUSE filesystem, "
        "so on squashfuse each is a round trip to the daemon, cold or warm: most of its "
        "`ls -lR` time. " + _xattr_sentence(r, names),
        "",
    ]
    return out


def _xattr_sentence(r: dict[str, Any], names: list[str]) -> str:
    """What nydusfs does about those round trips, and which numbers show it.

    ``build.nydusfs_xattrs`` (the image's xattr count) is recorded since nydusfs answers an
    image without xattrs that way; a dataset without it was measured before.
    """
    counts = {n: r["datasets"][n]["build"].get("nydusfs_xattrs") for n in names}
    out = ("For an image without any extended attribute, nydusfs answers the first xattr "
           "request of a mount with ENOSYS: the kernel then treats the mount as a filesystem "
           "without xattr support and answers every later request itself (EOPNOTSUPP, or no "
           "ACL), and `ls` stops asking for SELinux labels on it after the first EOPNOTSUPP; "
           "an image with xattrs is answered per file, as squashfuse answers every image.")
    none = [_DATASET_LABELS.get(n, n) for n, c in counts.items() if c == 0]
    some = [_DATASET_LABELS.get(n, n) for n, c in counts.items() if c]
    before = [_DATASET_LABELS.get(n, n) for n, c in counts.items() if c is None]
    if none:
        out += f" The image of the {' and of the '.join(none)} has none."
    if some:
        out += f" The image of the {' and of the '.join(some)} has some."
    if before:
        out += (f" The numbers of the {' and of the '.join(before)} were measured before "
                "this, with a round trip per request.")
    return out


def _python_table(r: dict[str, Any]) -> list[str]:
    ds = r["datasets"]["rootfs"]
    m = ds["medians"].get("python")
    out = ["### Python cold start under runc", ""]
    if m is None:
        return [*out, "Not measured: runc is not installed.", ""]
    args = " ".join(f"'{a}'" if " " in a else a for a in r["python_args"])
    out += [
        f"`runc run` of `{args}` with the mount (or the directory) as a read-only root; the "
        "time of the whole `runc run` command (container setup included).",
        "",
        "| root | cold | warm | cold x native |",
        "|---|---:|---:|---:|",
    ]
    for t in ds["targets"]:
        out.append(f"| {_label(t)} | {_fmt_s(m[t]['cold'])} | {_fmt_s(m[t]['warm'])} | "
                   f"{m[t]['cold'] / m['native']['cold']:.2f} |")
    return [*out, ""]


def mount_section(r: dict[str, Any] | None) -> list[str]:
    out = ["## 4. Mount-to-ready time: flat in file count", ""]
    if r is None:
        return [*out, "Not measured yet: run `make bench-read`.", ""]
    lo, hi = r["sizes"]
    warm, cold = r["ratio_mount_warm"], r["ratio_mount_cold"]
    flat = max(warm, cold) <= 1.5
    out += [
        "Bootstraps synthesized as in section 2 (N files of one 4 KiB chunk, 64 per "
        "directory), empty `blobs/` beside them. *mount* = wall time of `nydusfs mount "
        "--background`, which returns once the daemon reports the FUSE mount ready (it "
        "includes starting two Python processes: the command and the daemon); *first stat* "
        "= `stat` of the deepest file right after; *umount* = `nydusfs umount` until the "
        "daemon is gone. *cold* = page cache dropped before mounting. Medians of "
        f"{r['runs']} rounds, sizes interleaved. "
        f"Measured {r['machine']['date']}, {r['machine'].get('revision', '')}.",
        "",
        f"**Goal: mount time flat from {lo:,} to {hi:,} files — "
        f"{'flat' if flat else 'NOT flat'} (a ratio ≤ 1.5 is counted as flat): "
        f"{hi:,} / {lo:,} files = {warm:.2f} warm, {cold:.2f} cold.**",
        "",
        "| files | bootstrap | mount (warm) | mount (cold) | ratio to smallest (warm) | "
        "first stat (warm / cold) | umount (warm) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = r["cases"][0]["medians"]["warm"]["mount"]
    for c in r["cases"]:
        w, k = c["medians"]["warm"], c["medians"]["cold"]
        out.append(
            f"| {c['files']:,} | {c['bootstrap_bytes'] / MB:.1f} MB | {_fmt_s(w['mount'])} | "
            f"{_fmt_s(k['mount'])} | {w['mount'] / base:.2f} | {_fmt_s(w['first_stat'])} / "
            f"{_fmt_s(k['first_stat'])} | {_fmt_s(w['umount'])} |")
    return [*out, ""]


def render(build: dict[str, Any] | None, lookup: dict[str, Any] | None,
           read: dict[str, Any] | None = None, mount: dict[str, Any] | None = None,
           convert: dict[str, Any] | None = None,
           coldstart: dict[str, Any] | None = None,
           supernode: dict[str, Any] | None = None,
           fanout: dict[str, Any] | None = None,
           upload: dict[str, Any] | None = None) -> str:
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by bench/report.py (`make bench`); edit the generator, not this file. -->",
        "",
        "Benchmarks, not tests: each number is a ratio against a baseline measured in the same "
        "run on the same machine, from medians of several runs (the machine is shared and "
        "noisy; absolute times are indicative only). Goals are from DESIGN §6.",
        "",
        "## Reproduce",
        "",
        "```",
        "make bench                    # all benchmarks, then this file (BENCH_RUNS=3)",
        "make bench-build BENCH_RUNS=5 # only the build benchmark (makes the rootfs first)",
        "make bench-lookup             # only the lookup benchmark",
        "make bench-read BENCH_RUNS=5  # only reads through mounts + mount time (root, FUSE)",
        ".venv/bin/python bench/read_bench.py --datasets meta --phases find --runs 5 \\",
        "    --reuse-images --merge    # rerun one part of it, merged into its results",
        *REPRODUCE,
        *SUPERNODE_REPRODUCE,
        *FANOUT_REPRODUCE,
        "make bench-report             # rewrite this file from bench/.cache/results/*.json",
        "```",
        "",
        "`bench/rootfs.sh` builds the input rootfs from Debian packages into `bench/.cache/` "
        "(RECIPES §2b: `apt-get download` + `dpkg-deb -x`, a few seconds); cold-cache runs "
        "need root to write `/proc/sys/vm/drop_caches`.",
        "",
        "## Machine",
        "",
    ]
    newest = max(
        (r for r in (build, lookup, read, mount, convert, coldstart, supernode, fanout,
                     upload)
         if r is not None),
        key=lambda r: str(r["machine"]["date"]),
        default=None,
    )
    if newest is None:
        lines += ["No results yet.", ""]
    else:
        lines += [*_machine(newest["machine"]), ""]
    lines += build_section(build)
    lines += lookup_section(lookup)
    lines += read_section(read)
    lines += mount_section(mount)
    lines += convert_section(convert, 5)
    lines += coldstart_section(coldstart, 6)
    lines += supernode_section(supernode, 7)
    lines += fanout_section(fanout, 8, [r for r in [load_result("fanout-50mbit")] if r])
    lines += upload_section(upload, 9)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=REPO_DIR / "docs" / "benchmarks.md")
    args = ap.parse_args(argv)
    text = render(load_result("build"), load_result("lookup"), load_result("read"),
                  load_result("mount"), convert=load_result("convert"),
                  coldstart=load_result("coldstart"), supernode=load_result("supernode"),
                  fanout=load_result("fanout"), upload=load_result("upload"))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

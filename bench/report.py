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


def render(build: dict[str, Any] | None, lookup: dict[str, Any] | None) -> str:
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
        (r for r in (build, lookup) if r is not None),
        key=lambda r: str(r["machine"]["date"]),
        default=None,
    )
    if newest is None:
        lines += ["No results yet.", ""]
    else:
        lines += [*_machine(newest["machine"]), ""]
    lines += build_section(build)
    lines += lookup_section(lookup)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=REPO_DIR / "docs" / "benchmarks.md")
    args = ap.parse_args(argv)
    text = render(load_result("build"), load_result("lookup"))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

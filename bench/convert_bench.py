"""``nydusfs convert`` of a real multi-layer image vs ``skopeo copy`` of it, in one registry.

Input: the python3 image of :mod:`oci_images` (the ``bench/rootfs.sh`` package set, one layer
per group of Debian packages plus a last layer that deletes, changes and adds files; gzip
layers written by umoci), pushed with skopeo to a real ``docker-registry`` on a loopback port
that this benchmark starts and stops by PID. Each round, in rotating order:

- ``nydusfs``: ``nydusfs convert HOST/bench/python:oci HOST/bench/nydus-N:latest`` — pull,
  flatten (whiteouts applied), chunk, compress, push blobs + bootstrap + manifest;
- ``skopeo-full``: ``skopeo copy`` of the same image to another repository, the destination
  addressed as ``localhost:PORT`` — the same registry process, but to skopeo another host, so
  every layer is downloaded and uploaded again (what a copy costs when the bytes have to move);
- ``skopeo-mount``: ``skopeo copy`` to another repository addressed exactly like the source:
  skopeo then asks the registry to *mount* each blob across repositories (no layer bytes move;
  the registry's access log shows ``POST ...?mount=`` answered 201), for context.

Every destination repository is fresh (no blob skipped because an earlier round pushed it).
The page cache is left warm (the registry serves from memory, as a busy one does); times are
wall clock of the client command, CPU is the client's user+system time. The converted image's
size is read back from the registry: every layer of its manifest (blobs + bootstrap) and the
config, against the OCI image's compressed layers and config.

Raw samples go to ``bench/.cache/results/convert.json``; ``report.py`` renders the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import CACHE_DIR, REPO_DIR, machine_info, median, save_result, tool_version
from oci_images import (
    BenchError,
    Registry,
    ensure_image,
    manifest_sizes,
    push,
    raw_manifest,
)

NYDUSFS = [sys.executable, "-m", "nydusfs.cli"]
TOOLS = ("nydusfs", "skopeo-full", "skopeo-mount")
TIMEOUT = 900.0


def convert_available() -> bool:
    proc = subprocess.run([*NYDUSFS, "convert", "--help"], capture_output=True, text=True,
                          timeout=60, check=False)
    return proc.returncode == 0


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd``; (wall s, child CPU s, stdout). BenchError with stderr if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                              check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(cmd[:4])}: no result after {TIMEOUT:.0f} s") from exc
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                         + " | ".join(proc.stderr.strip().splitlines()[-5:]))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def skopeo_copy(src: str, dst: str) -> list[str]:
    return ["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false",
            f"docker://{src}", f"docker://{dst}"]


def count_blobs(log: Path, repo: str) -> dict[str, int]:
    """Blobs that reached ``repo``: uploaded (final PUT) or mounted across repositories."""
    up = mounted = 0
    for line in log.read_text(errors="replace").splitlines():
        if '" 201 ' not in line:
            continue
        if f"PUT /v2/{repo}/blobs/uploads/" in line and "digest=" in line:
            up += 1
        elif f"POST /v2/{repo}/blobs/uploads/?" in line and "mount=" in line:
            mounted += 1
    return {"uploaded": up, "mounted": mounted}


def forget_repository(registry: Registry, repo: str) -> None:
    """Delete ``repo`` from the registry's storage.

    skopeo remembers where it has seen each blob (its blob-info cache, shared by every skopeo
    run as root); next round it would mount the blobs from this repository instead of moving
    them. With the repository gone the mount attempt fails and skopeo uploads, as intended.
    """
    shutil.rmtree(registry.storage / "docker/registry/v2/repositories" / repo,
                  ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="rounds over all tools (median)")
    ap.add_argument("--workdir", type=Path, default=CACHE_DIR / "convert")
    ap.add_argument("--skip-nydusfs", action="store_true",
                    help="measure the skopeo baselines only (nydusfs convert pending)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("convert_bench: needs root (the image keeps package file owners)", file=sys.stderr)
        return 1
    have_convert = not args.skip_nydusfs and convert_available()
    if not have_convert:
        print("convert_bench: `nydusfs convert` not available: measuring skopeo only",
              file=sys.stderr)
    tools = [t for t in TOOLS if have_convert or t != "nydusfs"]
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        image = ensure_image()
        registry = Registry(work / "registry")
        registry.start()
    except BenchError as exc:
        print(f"convert_bench: {exc}", file=sys.stderr)
        return 1
    host = registry.host
    alias = f"localhost:{host.rsplit(':', 1)[1]}"
    src = f"{host}/bench/python:oci"
    samples: dict[str, list[dict[str, float]]] = {t: [] for t in tools}
    summaries: list[Any] = []
    nydus_manifests: list[dict[str, Any]] = []
    blobs: dict[str, list[dict[str, int]]] = {"skopeo-full": [], "skopeo-mount": []}
    try:
        push(image, src)
        oci_manifest = raw_manifest(src)
        for rnd in range(args.runs):
            order = tools[rnd % len(tools):] + tools[:rnd % len(tools)]
            for tool in order:
                if tool == "nydusfs":
                    dst = f"{host}/bench/nydus-{rnd}:latest"
                    wall, cpu, out = timed([*NYDUSFS, "convert", src, dst, "--json"])
                    try:
                        summaries.append(json.loads(out))
                    except ValueError:
                        summaries.append(None)
                    nydus_manifests.append(raw_manifest(dst))
                elif tool == "skopeo-full":
                    wall, cpu, _ = timed(skopeo_copy(src, f"{alias}/bench/full-{rnd}:oci"))
                    blobs[tool].append(count_blobs(registry.log, f"bench/full-{rnd}"))
                    forget_repository(registry, f"bench/full-{rnd}")
                else:
                    wall, cpu, _ = timed(skopeo_copy(src, f"{host}/bench/mount-{rnd}:oci"))
                    blobs[tool].append(count_blobs(registry.log, f"bench/mount-{rnd}"))
                samples[tool].append({"wall": wall, "cpu": cpu})
                print(f"round {rnd + 1}/{args.runs} {tool:13} {wall:7.2f} s wall "
                      f"{cpu:7.2f} s CPU", file=sys.stderr)
    except BenchError as exc:
        print(f"convert_bench: {exc}", file=sys.stderr)
        return 1
    finally:
        registry.stop()

    medians = {t: {k: median([s[k] for s in ss]) for k in ("wall", "cpu")}
               for t, ss in samples.items()}
    oci = manifest_sizes(oci_manifest)
    result: dict[str, Any] = {
        "machine": machine_info(),
        "command": "make bench-convert   # .venv/bin/python bench/convert_bench.py --runs N",
        "runs": args.runs,
        "packages": " ".join(image.packages),
        "layers": list(image.layers),
        "oci": oci,
        "tools": tools,
        "samples": samples,
        "medians": medians,
        "skopeo_blobs": blobs,
        "nydusfs": None,
        "versions": {
            "skopeo": tool_version(["skopeo", "--version"]),
            "umoci": tool_version(["umoci", "--version"]),
            "docker-registry": tool_version(["dpkg-query", "-W", "-f=docker-registry ${Version}",
                                             "docker-registry"]),
        },
    }
    if have_convert:
        m = nydus_manifests[0]
        layers = m.get("layers")
        assert isinstance(layers, list)
        digests = [[x["digest"] for x in nm["layers"]] for nm in nydus_manifests]
        result["nydusfs"] = {
            **manifest_sizes(m),
            "bootstrap_bytes": int(layers[-1]["size"]),
            "blob_bytes": sum(int(x["size"]) for x in layers[:-1]),
            "media_types": sorted({str(x["mediaType"]) for x in layers}),
            "reproducible": all(d == digests[0] for d in digests),
            "summary": summaries[0],
        }
        nyd = result["nydusfs"]
        result["ratios"] = {
            "convert_vs_skopeo_full": medians["nydusfs"]["wall"] / medians["skopeo-full"]["wall"],
            "convert_vs_skopeo_mount": (medians["nydusfs"]["wall"]
                                        / medians["skopeo-mount"]["wall"]),
            "size_vs_oci": (nyd["layer_bytes"] + nyd["config_bytes"])
            / (oci["layer_bytes"] + oci["config_bytes"]),
        }
        print(f"nydusfs convert / skopeo copy (full): "
              f"{result['ratios']['convert_vs_skopeo_full']:.2f}; size nydusfs / OCI: "
              f"{result['ratios']['size_vs_oci']:.3f}", file=sys.stderr)
    path = save_result("convert", result)
    print(f"raw results in {path.relative_to(REPO_DIR)}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Real OCI images and a real registry for the registry benchmarks and the demo.

Why: ``convert_bench.py``, ``coldstart_bench.py`` and ``scripts/demo.sh`` need what a user has —
a multi-layer image built the way images are built (one layer per install step, a last layer
that deletes, changes and adds files) in a real registry (distribution's ``docker-registry``)
— not a synthetic tar. This module makes one from Debian packages, with the tools of RECIPES
§2b and "umoci + skopeo":

- :func:`resolve_packages` / :func:`download_debs`: ``apt-cache depends --recurse`` (keeping
  Pre-Depends: ``python3-minimal`` is one) and ``apt-get download`` into a kept cache;
- :func:`extract_layers`: ``dpkg-deb -x`` of each *group* of packages into its own directory
  (the groups of :data:`LAYER_GROUPS`: shared libraries and base tools, python3-minimal, the
  rest of python3 with its stdlib, pip/git/curl), as ``apt-get install`` steps would;
- :func:`build_layout`: ``umoci insert`` of each directory as one layer, then ``umoci unpack``
  / edit / ``umoci repack`` for a last layer that deletes ``usr/share/{doc,man,info}``
  (whiteouts over lower layers), changes ``etc/python3.11/sitecustomize.py`` (a file of a lower
  layer that python reads at start) and adds ``/app/main.py``; the image's Cmd runs it;
- :func:`ensure_image`: all of the above, cached under ``bench/.cache/oci/`` keyed by the
  package list (delete the directory to rebuild);
- :class:`Registry`: a ``docker-registry`` process on a free loopback port (or any address,
  optionally inside a network namespace entered with ``nsenter --net``, which — unlike ``ip
  netns exec`` — keeps the mount namespace, so FUSE mounts made there stay visible), waited
  for with a bounded poll of ``/v2/``, stopped by PID (SIGTERM, then SIGKILL);
- :func:`push` (``skopeo copy oci:… docker://…``) and :func:`raw_manifest` (``skopeo inspect
  --raw``).

Every subprocess is bounded in time; failures raise :class:`BenchError` with the tool's own
last lines. Run as a script it builds an image layout (used by ``scripts/demo.sh``)::

    python bench/oci_images.py --packages "python3-minimal" --out DIR [--tag TAG]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchlib import CACHE_DIR, process_alive, stop_process

__all__ = [
    "APP_MAIN",
    "DEFAULT_PACKAGES",
    "LAYER_GROUPS",
    "BenchError",
    "OciImage",
    "Registry",
    "build_layout",
    "download_debs",
    "ensure_image",
    "extract_layers",
    "free_port",
    "manifest_sizes",
    "netns_prefix",
    "push",
    "raw_manifest",
    "resolve_packages",
    "run",
]

# The same packages as bench/rootfs.sh (the other benchmarks' rootfs), so the numbers compare.
DEFAULT_PACKAGES = ("python3", "python3-pip", "git", "curl", "ca-certificates", "dash",
                    "coreutils")
# Skipped as in rootfs.sh / RECIPES §2b: perl is large and unused, dpkg/tar need maintainer
# scripts, the mime packages pull in perl.
SKIP_PREFIXES = ("perl", "libperl", "install-info", "mailcap", "mime-support", "media-types")
SKIP_EXACT = ("dpkg", "tar")
# The program the image's Cmd runs: it imports a few stdlib modules (the interpreter, libc,
# libpython, ~100 .py files) and prints one line a benchmark waits for.
APP_MAIN = 'import json, email, http.client\nprint("ready", flush=True)\n'
RECIPE_VERSION = "1"  # bump when the layer recipe changes: cached layouts are rebuilt

WAIT = 60.0  # bound on waiting for a server


class BenchError(RuntimeError):
    """A tool or server the benchmark needs did not do its part; the message says what."""


# Layer name -> which packages it installs; the first group that matches a package takes it,
# the last one takes the rest. Ordered lowest layer first.
LAYER_GROUPS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("python3-minimal", lambda p: p in ("python3-minimal", "python3.11-minimal",
                                        "libpython3.11-minimal")),
    ("python3", lambda p: p in ("python3", "python3.11", "libpython3-stdlib",
                                "libpython3.11-stdlib", "python3-distutils",
                                "python3-lib2to3")),
    ("tools", lambda p: p in ("python3-pip", "python3-pkg-resources", "python3-setuptools",
                              "python3-wheel", "git", "git-man", "curl", "liberror-perl")),
    ("base", lambda p: True),
)
LAYER_ORDER = ("base", "python3-minimal", "python3", "tools")


def run(cmd: Sequence[str], *, timeout: float = 600.0, cwd: Path | None = None,
        what: str | None = None) -> str:
    """Run ``cmd``; its stdout, or :class:`BenchError` with the tail of its stderr."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what or cmd[0]}: no result after {timeout:.0f} s") from exc
    except OSError as exc:
        raise BenchError(f"{what or cmd[0]}: {exc.strerror}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise BenchError(f"{what or ' '.join(cmd[:3])} failed (exit {proc.returncode}): "
                         + " | ".join(tail))
    return proc.stdout


# --------------------------------------------------------------------------- Debian packages


def _skipped(pkg: str) -> bool:
    return pkg in SKIP_EXACT or pkg.startswith(SKIP_PREFIXES)


def resolve_packages(packages: Sequence[str]) -> list[str]:
    """Every package ``packages`` need (Pre-Depends kept), minus the skipped ones."""
    def once() -> set[str]:
        proc = subprocess.run(
            ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
             "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *packages],
            capture_output=True, text=True, timeout=120, check=False)
        # Package lines start in column 0; dependency lines are indented, virtual ones <...>.
        return {line.strip() for line in proc.stdout.splitlines()
                if re.match(r"[a-z0-9][a-z0-9.+-]*$", line)}

    names = once()
    if not set(packages) <= names:  # apt lists missing or stale: refresh once
        print("oci_images: apt lists missing or stale, running apt-get update", file=sys.stderr)
        run(["apt-get", "update", "-qq"], timeout=600)
        names = once()
        missing = set(packages) - names
        if missing:
            raise BenchError(f"apt-cache knows no package {', '.join(sorted(missing))}")
    return sorted(n for n in names if not _skipped(n))


def download_debs(names: Sequence[str], dest: Path) -> dict[str, Path]:
    """``apt-get download`` what ``dest`` does not hold yet; package name -> .deb path."""
    dest.mkdir(parents=True, exist_ok=True)

    def have() -> dict[str, Path]:
        return {p.name.split("_", 1)[0]: p for p in dest.glob("*.deb")}

    missing = [n for n in names if n not in have()]
    if missing:
        try:
            run(["apt-get", "download", "-qq", *missing], cwd=dest, what="apt-get download")
        except BenchError:  # one odd name must not fail all: retry one by one
            for n in missing:
                try:
                    run(["apt-get", "download", "-qq", n], cwd=dest, what="apt-get download")
                except BenchError as exc:
                    print(f"oci_images: skipped {n}: {exc}", file=sys.stderr)
    got = have()
    return {n: got[n] for n in names if n in got}


def extract_layers(debs: dict[str, Path], out: Path) -> list[tuple[str, Path]]:
    """``dpkg-deb -x`` each group of :data:`LAYER_GROUPS` into ``out/NAME``; lowest first."""
    shutil.rmtree(out, ignore_errors=True)
    groups: dict[str, list[Path]] = {name: [] for name, _ in LAYER_GROUPS}
    for pkg, deb in sorted(debs.items()):
        for name, pred in LAYER_GROUPS:
            if pred(pkg):
                groups[name].append(deb)
                break
    layers: list[tuple[str, Path]] = []
    for name in LAYER_ORDER:
        if not groups[name]:
            continue
        d = out / name
        d.mkdir(parents=True)
        for deb in groups[name]:
            run(["dpkg-deb", "-x", str(deb), str(d)], timeout=120, what=f"dpkg-deb -x {deb.name}")
        layers.append((name, d))
    base = out / "base"
    if base.is_dir():  # what a base image has and the packages do not
        for sub in ("proc", "sys", "dev", "tmp", "root", "etc", "run"):
            (base / sub).mkdir(exist_ok=True)
        (base / "tmp").chmod(0o1777)
    return layers


# --------------------------------------------------------------------------- OCI image


@dataclass(frozen=True, slots=True)
class OciImage:
    """An OCI image layout on disk (``layout:tag``) and what went into it."""

    layout: Path
    tag: str
    packages: tuple[str, ...]
    layers: tuple[str, ...]  # layer names, lowest first

    @property
    def source(self) -> str:
        """The image as a skopeo/umoci reference: ``oci:LAYOUT:TAG``."""
        return f"oci:{self.layout}:{self.tag}"

    def manifest(self) -> dict[str, object]:
        index = json.loads((self.layout / "index.json").read_text())
        for m in index["manifests"]:
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == self.tag:
                algo, hexd = m["digest"].split(":", 1)
                data: dict[str, object] = json.loads(
                    (self.layout / "blobs" / algo / hexd).read_text())
                return data
        raise BenchError(f"{self.layout}: no tag {self.tag}")

    def layer_bytes(self) -> int:
        """Sum of the compressed layer sizes in the manifest."""
        layers = self.manifest()["layers"]
        assert isinstance(layers, list)
        return sum(int(layer["size"]) for layer in layers)


def build_layout(layers: Sequence[tuple[str, Path]], layout: Path, tag: str,
                 work: Path) -> None:
    """One layer per directory (``umoci insert``), then the edit layer (see module doc)."""
    shutil.rmtree(layout, ignore_errors=True)
    image = f"{layout}:{tag}"
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", image])
    for name, d in layers:
        run(["umoci", "insert", "--image", image,
             "--history.created_by", f"dpkg-deb -x ({name} packages)", str(d), "/"],
            what=f"umoci insert {name}")
    bundle = work / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    run(["umoci", "unpack", "--image", image, str(bundle)], what="umoci unpack")
    root = bundle / "rootfs"
    for sub in ("usr/share/doc", "usr/share/man", "usr/share/info"):
        shutil.rmtree(root / sub, ignore_errors=True)  # whiteouts over the lower layers
    site = root / "etc/python3.11/sitecustomize.py"
    if site.exists():  # changed: python reads it at every start
        site.write_text(site.read_text() + "\n# edited by the image's last layer\n")
    (root / "app").mkdir(exist_ok=True)
    (root / "app/main.py").write_text(APP_MAIN)
    run(["umoci", "repack", "--image", image,
         "--history.created_by", "rm -rf usr/share/{doc,man,info}; edit sitecustomize; "
         "add /app", str(bundle)], what="umoci repack")
    shutil.rmtree(bundle, ignore_errors=True)
    run(["umoci", "config", "--image", image, "--config.cmd", "/usr/bin/python3",
         "--config.cmd", "/app/main.py", "--config.workingdir", "/app",
         "--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
         "--config.env", "LANG=C.UTF-8"], what="umoci config")
    run(["umoci", "gc", "--layout", str(layout)])


def ensure_image(packages: Sequence[str] = DEFAULT_PACKAGES, *, name: str = "python",
                 tag: str = "bench", cache: Path = CACHE_DIR / "oci") -> OciImage:
    """The image for ``packages``, built once and reused while the package list is the same."""
    out = cache / name
    stamp = out / "recipe"
    want = f"{RECIPE_VERSION} {' '.join(packages)} {tag}"
    layout = out / "layout"
    if stamp.exists() and stamp.read_text().splitlines()[0] == want and layout.is_dir():
        layer_names = tuple(stamp.read_text().splitlines()[1].split())
        return OciImage(layout, tag, tuple(packages), layer_names)
    t0 = time.monotonic()
    names = resolve_packages(packages)
    debs = download_debs(names, cache / "debs")
    if "python3-minimal" in names and "python3-minimal" not in debs:
        raise BenchError("python3-minimal could not be downloaded")
    layers = extract_layers(debs, out / "layers")
    stamp.unlink(missing_ok=True)
    build_layout(layers, layout, tag, out)
    shutil.rmtree(out / "layers", ignore_errors=True)
    layer_names = (*(n for n, _ in layers), "edit")
    stamp.write_text(f"{want}\n{' '.join(layer_names)}\n")
    image = OciImage(layout, tag, tuple(packages), layer_names)
    print(f"oci_images: built {image.source} from {len(debs)} packages in "
          f"{time.monotonic() - t0:.1f} s: {len(layer_names)} layers, "
          f"{image.layer_bytes() / 1e6:.1f} MB compressed", file=sys.stderr)
    return image


# --------------------------------------------------------------------------- registry


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def netns_prefix(netns: str | None) -> list[str]:
    """Run in network namespace ``netns`` only (the mount namespace stays ours)."""
    return [] if netns is None else ["nsenter", f"--net=/run/netns/{netns}"]


class Registry:
    """A ``docker-registry`` (distribution 2.8) process with its own storage; stop() by PID.

    ``addr`` is ``HOST:PORT`` (default: a free loopback port). With ``netns`` the process runs
    in that network namespace, and readiness is polled from inside it too.
    """

    def __init__(self, workdir: Path, *, addr: str | None = None, netns: str | None = None,
                 storage: Path | None = None) -> None:
        self.workdir = workdir
        self.addr = addr or f"127.0.0.1:{free_port()}"
        self.netns = netns
        self.storage = storage or workdir / "data"
        self.log = workdir / "registry.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return self.addr

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log: {level: warn, accesslog: {disabled: false}}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.storage}}}, "
            "delete: {enabled: true}}\n"
            f"http: {{addr: '{self.addr}'}}\n")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*netns_prefix(self.netns), "docker-registry", "serve", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        url = f"http://{self.addr}/v2/"
        if self.netns is not None:  # poll from inside the namespace, bounded there
            probe = (
                "import sys, time, urllib.request\n"
                f"end = time.monotonic() + {WAIT}\n"
                "while time.monotonic() < end:\n"
                "    try:\n"
                f"        urllib.request.urlopen({url!r}, timeout=2).close(); sys.exit(0)\n"
                "    except OSError:\n"
                "        time.sleep(0.05)\n"
                "sys.exit(1)\n")
            proc = subprocess.run([*netns_prefix(self.netns), sys.executable, "-c", probe],
                                  timeout=WAIT + 10, check=False, capture_output=True)
            if proc.returncode == 0:
                return
        else:
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    break
                try:
                    urllib.request.urlopen(url, timeout=2).close()
                    return
                except (urllib.error.URLError, OSError):
                    time.sleep(0.05)
        tail = self.log.read_text(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"docker-registry on {self.addr} did not answer /v2/: "
                         + " | ".join(tail))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, 10)

    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and process_alive(self.proc.pid)


def push(image: OciImage, ref: str, *, netns: str | None = None) -> None:
    """``skopeo copy`` the layout to ``docker://ref`` (plain HTTP allowed)."""
    run([*netns_prefix(netns), "skopeo", "copy", "-q", "--dest-tls-verify=false",
         image.source, f"docker://{ref}"], what=f"skopeo copy to {ref}")


def raw_manifest(ref: str, *, netns: str | None = None) -> dict[str, object]:
    out = run([*netns_prefix(netns), "skopeo", "inspect", "--raw", "--tls-verify=false",
               f"docker://{ref}"], timeout=120, what=f"skopeo inspect {ref}")
    data: dict[str, object] = json.loads(out)
    return data


def manifest_sizes(manifest: dict[str, object]) -> dict[str, int]:
    """Layer count and bytes (layers, config) of an image manifest."""
    layers = manifest.get("layers")
    config = manifest.get("config")
    if not isinstance(layers, list) or not isinstance(config, dict):
        raise BenchError("not an image manifest (no layers/config)")
    return {"layers": len(layers), "layer_bytes": sum(int(x["size"]) for x in layers),
            "config_bytes": int(config["size"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="build a multi-layer OCI image layout from Debian "
                                 "packages (umoci); prints oci:LAYOUT:TAG")
    ap.add_argument("--packages", default=" ".join(DEFAULT_PACKAGES))
    ap.add_argument("--name", default="python", help="cache subdirectory")
    ap.add_argument("--tag", default="bench")
    ap.add_argument("--cache", type=Path, default=CACHE_DIR / "oci")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("oci_images: needs root (package files keep their owners)", file=sys.stderr)
        return 1
    try:
        image = ensure_image(tuple(args.packages.split()), name=args.name, tag=args.tag,
                             cache=args.cache)
    except BenchError as exc:
        print(f"oci_images: {exc}", file=sys.stderr)
        return 1
    print(image.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())

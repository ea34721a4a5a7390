"""Image-making helpers for the convert / push / mount-from-registry tests.

Source images are made the way users make them: directories turned into layers by ``umoci``
(``repack --refresh-bundle``, so deletions become real whiteouts) and pushed with ``skopeo``
(:func:`registry_server.push_oci_dirs`). The source's final tree, the thing a converted image
must reproduce, is taken independently of nydusfs: ``skopeo copy`` the pushed image back to an
OCI layout and ``umoci unpack`` it.

Layer contents are small (a few MiB in all) but cover what matters: a multi-chunk random file,
a file changed in a later layer, files and a directory deleted, a directory deleted and
re-created, a hardlink, symlinks, a setuid file, a ``user.*`` xattr, foreign ownership.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fs.conftest import NydusMount
from registry_server import DELETE_LIST, RegistryServer, push_oci_dirs

__all__ = [
    "NYDUSFS",
    "RUNTIME_CONFIG",
    "RefMount",
    "SourceImage",
    "blob_gets",
    "make_layers",
    "nydusfs",
    "pull_config",
    "pull_manifest",
    "push_source",
    "unpack_image",
]

NYDUSFS = [sys.executable, "-m", "nydusfs.cli"]
MiB = 1 << 20
STAMP = 1_650_000_000

# What convert must carry over into the new image's config.
RUNTIME_CONFIG: dict[str, Any] = {
    "Entrypoint": ["/usr/bin/app"],
    "Cmd": ["--serve", "8080"],
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "APP_MODE=production"],
    "WorkingDir": "/srv",
    "User": "1000:1000",
    "ExposedPorts": ["8080/tcp"],
    "Labels": {"org.example.team": "storage", "version": "1"},
}


def nydusfs(*args: str | Path, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user does; the caller asserts on the result."""
    return subprocess.run([*NYDUSFS, *map(str, args)], capture_output=True, text=True,
                          input=input, timeout=timeout, check=False)


def _stamp(root: Path, seconds: int) -> None:
    """Fixed mtimes (umoci records them; the comparison checks them)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames]:
            os.utime(os.path.join(dirpath, name), (seconds, seconds), follow_symlinks=False)


def make_layers(base: Path, version: int = 1) -> list[Path]:
    """Directories for ``push_oci_dirs``: three layers (``version`` 2 adds a fourth).

    Layer 1 lays out a small rootfs; layer 2 changes a file, deletes a file and a directory
    tree, re-creates a deleted directory with new content and changes metadata; layer 3 adds
    and deletes again. Version 2 adds a layer with one new 1 MiB random file and one changed
    small file, so most chunks are shared with version 1.
    """
    rng = random.Random(20240501)
    l1, l2, l3 = base / "l1", base / "l2", base / "l3"
    for d in ("etc", "usr/bin", "usr/lib", "srv", "opt/old", "var/tmp-gone/sub"):
        (l1 / d).mkdir(parents=True, exist_ok=True)
    (l1 / "etc/keep").write_bytes(b"unchanged\n")
    (l1 / "etc/changed").write_bytes(b"version 1 MARKER-OLD-CONTENT\n")
    (l1 / "etc/deleted").write_bytes(b"MARKER-DELETED\n")
    (l1 / "var/tmp-gone/sub/file").write_bytes(b"MARKER-GONE-DIR\n")
    (l1 / "opt/old/data").write_bytes(b"MARKER-OPAQUE-OLD\n")
    (l1 / "usr/bin/app").write_bytes(b"#!/bin/sh\necho app\n")
    os.chmod(l1 / "usr/bin/app", 0o755)
    (l1 / "usr/lib/big.so").write_bytes(b"MARKER-BIG" + rng.randbytes(3 * MiB))
    (l1 / "usr/lib/libx.so").write_bytes(rng.randbytes(200_000))
    os.link(l1 / "usr/lib/libx.so", l1 / "usr/lib/libx.so.1")
    os.symlink("libx.so.1", l1 / "usr/lib/libx.link")
    os.symlink("/etc/keep", l1 / "etc/abs-link")
    (l1 / "usr/bin/su").write_bytes(b"\x7fELF su\n")
    os.chmod(l1 / "usr/bin/su", 0o4755)
    os.setxattr(l1 / "etc/keep", "user.comment", b"kept")
    (l1 / "srv/owned").write_bytes(b"owned\n")
    os.chown(l1 / "srv/owned", 1000, 1001)
    os.chmod(l1 / "srv", 0o1777)
    _stamp(l1, STAMP)

    (l2 / "etc").mkdir(parents=True, exist_ok=True)
    (l2 / "etc/changed").write_bytes(b"version 2\n")
    (l2 / "opt/old").mkdir(parents=True)
    (l2 / "opt/old/new").write_bytes(b"recreated\n")
    (l2 / "usr/share").mkdir(parents=True)
    (l2 / "usr/share/readme").write_bytes(b"layer two\n")
    (l2 / DELETE_LIST).write_text("etc/deleted\nvar/tmp-gone\nopt/old\n")
    _stamp(l2, STAMP + 100)

    (l3 / "srv").mkdir(parents=True)
    (l3 / "srv/data.bin").write_bytes(rng.randbytes(600_000))
    (l3 / DELETE_LIST).write_text("usr/share/readme\n")
    _stamp(l3, STAMP + 200)
    layers = [l1, l2, l3]
    if version >= 2:
        l4 = base / "l4"
        (l4 / "srv").mkdir(parents=True)
        (l4 / "etc").mkdir()
        (l4 / "srv/new.bin").write_bytes(random.Random(7).randbytes(MiB))
        (l4 / "etc/changed").write_bytes(b"version 3 of this file\n")
        _stamp(l4, STAMP + 300)
        layers.append(l4)
    return layers


@dataclass(frozen=True)
class SourceImage:
    registry: RegistryServer
    repo: str  # "src/app"
    tag: str
    digest: str  # manifest digest as pushed
    rootfs: Path  # the final tree, unpacked by umoci from the pushed image

    @property
    def ref(self) -> str:
        return f"{self.registry.host}/{self.repo}:{self.tag}"


def unpack_image(host: str, ref: str, work: Path) -> Path:
    """``skopeo copy`` the image back from the registry and ``umoci unpack`` it: its rootfs."""
    work.mkdir(parents=True, exist_ok=True)
    layout = work / "layout"
    subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false",
                    f"docker://{host}/{ref}", f"oci:{layout}:img"],
                   check=True, capture_output=True, timeout=120)
    bundle = work / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:img", str(bundle)],
                   check=True, capture_output=True, timeout=120)
    return bundle / "rootfs"


def push_source(registry: RegistryServer, work: Path, repo: str, tag: str,
                layers: Sequence[Path], config: dict[str, Any] | None = None) -> SourceImage:
    """Push ``layers`` as ``repo:tag`` and unpack what was pushed (see the module docstring)."""
    digest = push_oci_dirs(registry.host, f"{repo}:{tag}", layers, config=config)
    rootfs = unpack_image(registry.host, f"{repo}:{tag}", work / f"unpacked-{tag}")
    return SourceImage(registry, repo, tag, digest, rootfs)


def _get(registry: RegistryServer, path: str, accept: str | None = None) -> bytes:
    import urllib.request

    req = urllib.request.Request(f"{registry.url}{path}")
    if accept:
        req.add_header("Accept", accept)
    with urllib.request.urlopen(req, timeout=30) as resp:
        data: bytes = resp.read()
    return data


def pull_manifest(registry: RegistryServer, repo: str, ref: str) -> dict[str, Any]:
    accept = ("application/vnd.oci.image.manifest.v1+json,"
              "application/vnd.docker.distribution.manifest.v2+json")
    doc: dict[str, Any] = json.loads(_get(registry, f"/v2/{repo}/manifests/{ref}", accept))
    return doc


def pull_config(registry: RegistryServer, repo: str, manifest: dict[str, Any]
                ) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        _get(registry, f"/v2/{repo}/blobs/{manifest['config']['digest']}"))
    return doc


_BLOB_PATH = re.compile(r"/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})")


def blob_gets(registry: RegistryServer, since: int, repo: str) -> dict[str, int]:
    """Digest -> response bytes of the blob GETs on ``repo`` after access-log entry ``since``."""
    out: dict[str, int] = {}
    for e in registry.access_log()[since:]:
        m = _BLOB_PATH.fullmatch(e.path.split("?", 1)[0])
        if e.method == "GET" and m and m["repo"] == repo and e.status in (200, 206):
            out[m["digest"]] = out.get(m["digest"], 0) + e.size
    return out


class RefMount(NydusMount):
    """``nydusfs mount IMAGE MNT --background [args]`` (``IMAGE`` a reference or a path), with
    optional standard input (``--password-stdin``); ``close`` (inherited) unmounts and makes
    sure the daemon is gone."""

    def __init__(self, image: str | Path, mnt: Path, *args: str | Path,
                 input: str | None = None) -> None:
        self.mnt = mnt
        self.pid = None
        mnt.mkdir(parents=True, exist_ok=True)
        proc = nydusfs("mount", image, mnt, "--background", *args, input=input)
        assert proc.returncode == 0, proc.stderr
        m = re.search(r"daemon pid (\d+)", proc.stdout)
        assert m and os.path.ismount(mnt), proc.stdout
        self.pid = int(m[1])

"""``nydusfs mount REF``: credentials, the cached bootstrap, and what a bad one leads to.

Against a real docker-registry with htpasswd Basic auth: the source is pushed and converted
with credentials, then mounted with ``--username/--password-stdin`` (kept in the forked
background daemon's memory, never in its command line or environment) or with the config's
``backend.registry`` block. The bootstrap fetched for a reference is kept under
``cache.dir/bootstraps`` and reused by the next mount (one manifest request, no bootstrap
download); a cached copy that was tampered with is fetched again rather than used.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fs.conftest import NydusMount
from registry_server import RegistryServer, push_oci_dirs

from .images import RefMount, blob_gets, nydusfs, pull_manifest

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="needs root and /dev/fuse"),
    pytest.mark.skipif(not (shutil.which("umoci") and shutil.which("skopeo")),
                       reason="needs umoci and skopeo"),
]


@pytest.fixture
def mounts() -> Iterator[list[NydusMount]]:
    made: list[NydusMount] = []
    yield made
    for m in reversed(made):
        m.close()


@pytest.fixture(scope="module")
def image(basic_registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A nydusfs image in the Basic-auth registry, converted with credentials from stdin."""
    tmp = tmp_path_factory.mktemp("mountref")
    layer = tmp / "layer"
    (layer / "etc").mkdir(parents=True)
    (layer / "etc" / "motd").write_bytes(b"welcome\n")
    (layer / "data").mkdir()
    (layer / "data" / "blob").write_bytes(os.urandom(1 << 20))
    creds = basic_registry.credentials()
    push_oci_dirs(basic_registry.host, "auth/src:1", [layer], creds=creds)
    ref = f"{basic_registry.host}/auth/nydus:1"
    proc = nydusfs("convert", f"{basic_registry.host}/auth/src:1", ref, "--username",
                   creds[0], "--password-stdin", input=creds[1] + "\n")
    assert proc.returncode == 0, proc.stderr
    return ref


def test_mount_with_credentials(basic_registry: RegistryServer, image: str, tmp_path: Path,
                                mounts: list[NydusMount]) -> None:
    user, password = basic_registry.credentials()
    cfg = tmp_path / "m.yaml"
    cfg.write_text(json.dumps({"cache": {"dir": str(tmp_path / "cache")}}))
    m = RefMount(image, tmp_path / "mnt", "--config", cfg, "--username", user,
                 "--password-stdin", input=password + "\n")
    mounts.append(m)
    assert (m.mnt / "etc" / "motd").read_bytes() == b"welcome\n"
    assert m.pid is not None
    cmdline = Path(f"/proc/{m.pid}/cmdline").read_bytes()
    assert password.encode() not in cmdline
    environ = Path(f"/proc/{m.pid}/environ").read_bytes()
    assert password.encode() not in environ  # the forked daemon has it in memory only

    # The same credentials from the config file's backend.registry block.
    cfg2 = tmp_path / "m2.yaml"
    cfg2.write_text(json.dumps({"cache": {"dir": str(tmp_path / "cache2")},
                                "backend": {"type": "registry", "registry": {
                                    "username": user, "password": password}}}))
    m2 = RefMount(image, tmp_path / "mnt2", "--config", cfg2)
    mounts.append(m2)
    assert len((m2.mnt / "data" / "blob").read_bytes()) == 1 << 20


def test_wrong_or_missing_credentials_are_one_line(image: str, tmp_path: Path) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(json.dumps({"cache": {"dir": str(tmp_path / "cache")}}))
    for extra, stdin in ((["--username", "alice", "--password-stdin"], "wrong\n"), ([], None)):
        for args in (("inspect", image), ("mount", image, tmp_path, "--config", cfg)):
            proc = nydusfs(*args, *extra, input=stdin)
            assert proc.returncode == 1, proc.stderr
            line = proc.stderr.strip()
            assert line.startswith("nydusfs: error: ") and "\n" not in line, line
            assert "401" in line or "denied" in line.lower() or "unauthorized" in line.lower()
            assert "wrong" not in line  # the secret is never echoed
    proc = nydusfs("inspect", image, "--password-stdin", input="x\n")
    assert proc.returncode == 1 and "--password-stdin needs --username" in proc.stderr


def test_bootstrap_is_cached_and_checked(registry: RegistryServer, tmp_path: Path,
                                         mounts: list[NydusMount]) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"cached bootstrap\n")
    ref = f"{registry.host}/cache/img:1"
    proc = nydusfs("build", src, "-o", tmp_path / "out", "--push", ref, "--json")
    assert proc.returncode == 0, proc.stderr
    boot_sha = json.loads(proc.stdout)["bootstrap_sha256"]
    boot_layer = pull_manifest(registry, "cache/img", "1")["layers"][-1]["digest"]
    cache = tmp_path / "cache"
    cfg = tmp_path / "m.yaml"
    cfg.write_text(json.dumps({"cache": {"dir": str(cache)}}))

    def mount_once(i: int) -> dict[str, int]:
        since = len(registry.access_log())
        m = RefMount(ref, tmp_path / f"mnt{i}", "--config", cfg)
        mounts.append(m)
        assert (m.mnt / "d" / "f").read_bytes() == b"cached bootstrap\n"
        m.close()
        return blob_gets(registry, since, "cache/img")

    assert boot_layer in mount_once(0)
    cached = cache / "bootstraps" / boot_sha
    assert cached.read_bytes() == (tmp_path / "out" / "bootstrap").read_bytes()
    assert boot_layer not in mount_once(1)  # reused: no bootstrap download
    cached.write_bytes(cached.read_bytes()[:-1] + b"X")  # tampered with on disk
    assert boot_layer in mount_once(2)  # not trusted: fetched again, and then it mounts
    assert cached.read_bytes() == (tmp_path / "out" / "bootstrap").read_bytes()

"""The resident mount service (``nydusfs service``) with real processes, FUSE and a registry.

A service is started on a socket in the test's temporary directory (stopped by PID at
teardown); ``nydusfs mount --background`` hands requests to it, and a mount made that way is
served by a child of the service (its parent PID says so). Covers: mounts from a bootstrap
file and from a real docker-registry, two mounts at once, errors coming back as one line,
the client falling back when no service answers or when it is in another namespace, a child
crashing, SIGTERM leaving the mounts running, and the client's imports staying light.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_server import RegistryServer

from nydusfs.errors import NydusfsError
from nydusfs.service import MountRequest

NYDUSFS = [sys.executable, "-m", "nydusfs.cli"]
WAIT = 20.0  # bound on every wait below (seconds)

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs root and /dev/fuse"
)


def _run(*args: object, env: dict[str, str] | None = None,
         prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *NYDUSFS, *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False, env=env)


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _gone(pid: int) -> bool:
    """Gone from the process table: exited and reaped (a zombie still has /proc/PID)."""
    return not os.path.exists(f"/proc/{pid}")


def _wait(cond: object, what: str) -> None:
    assert callable(cond)
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT:.0f} s waiting for {what}")
        time.sleep(0.02)


class Service:
    """``nydusfs service --socket PATH`` as a child process; ``stop`` SIGTERMs it by PID."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.log = sock.with_suffix(".log")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([*NYDUSFS, "service", "--socket", str(sock)],
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        _wait(lambda: self._answers() or self.proc.poll() is not None, "the service's socket")
        if self.proc.poll() is not None:
            pytest.fail(f"service exited: {self.log.read_text()}")

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.sock))
            except OSError:
                return False
            return True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=WAIT)
        return self.proc.returncode


class Mounts:
    """Mounts made by the tests: each unmounted at teardown and its daemon seen gone."""

    def __init__(self, tmp: Path, sock: Path) -> None:
        self.tmp, self.sock = tmp, sock
        self.made: list[Path] = []
        self.pids: list[int] = []

    def env(self, mode: str = "always") -> dict[str, str]:
        return {**os.environ, "NYDUSFS_SERVICE_SOCKET": str(self.sock), "NYDUSFS_SERVICE": mode}

    def mount(self, image: object, *extra: object, mode: str = "always",
              prefix: tuple[str, ...] = ()) -> tuple[Path, int]:
        mnt = self.tmp / f"mnt{len(self.made)}"
        mnt.mkdir()
        proc = _run("mount", image, mnt, "--background", *extra, env=self.env(mode),
                    prefix=prefix)
        assert proc.returncode == 0, proc.stderr
        self.made.append(mnt)
        pid = int(proc.stdout.split("daemon pid ", 1)[1].split(",", 1)[0])
        self.pids.append(pid)
        assert os.path.ismount(mnt)
        return mnt, pid

    def umount(self, mnt: Path) -> None:
        if os.path.ismount(mnt):
            proc = _run("umount", mnt)
            if proc.returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30,
                               check=False)

    def close(self) -> None:
        for mnt in reversed(self.made):
            self.umount(mnt)
        for pid in self.pids:
            try:
                _wait(lambda pid=pid: _gone(pid) or _zombie(pid), f"daemon {pid} to exit")
            except pytest.fail.Exception:
                os.kill(pid, signal.SIGKILL)
                raise


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("svc-image")
    (tmp / "src" / "etc").mkdir(parents=True)
    (tmp / "src" / "etc" / "motd").write_bytes(b"served by the zygote\n")
    (tmp / "src" / "data").write_bytes(os.urandom(300_000))
    proc = _run("build", tmp / "src", "-o", tmp / "out", "--json")
    assert proc.returncode == 0, proc.stderr
    return tmp


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(tmp_path_factory.mktemp("svc") / "service.sock")
    yield svc
    assert svc.stop() == 0, svc.log.read_text()


@pytest.fixture
def mounts(tmp_path: Path, service: Service) -> Iterator[Mounts]:
    m = Mounts(tmp_path, service.sock)
    yield m
    m.close()


def test_mount_through_service(service: Service, image: Path, mounts: Mounts) -> None:
    sock_mode = stat.S_IMODE(service.sock.stat().st_mode)
    assert sock_mode == 0o600
    mnt, pid = mounts.mount(image / "out" / "bootstrap")
    assert _ppid(pid) == service.pid  # forked by the service, not by the client
    assert (mnt / "etc" / "motd").read_bytes() == b"served by the zygote\n"
    assert (mnt / "data").read_bytes() == (image / "src" / "data").read_bytes()
    status = json.loads(_run("stat", mnt, "--json").stdout)
    assert status["pid"] == pid
    tl = status["timeline"]
    # The origin is the client's start; the service got the request, then the child mounted.
    assert tl["process_start"] <= tl["service_request"] <= tl["mount_start"] <= tl["ready"]
    mounts.umount(mnt)
    _wait(lambda: _gone(pid), f"daemon {pid} to exit and be reaped by the service")


def test_two_mounts_through_one_service(service: Service, image: Path, mounts: Mounts) -> None:
    (a, pa), (b, pb) = mounts.mount(image / "out" / "bootstrap"), \
        mounts.mount(image / "out" / "bootstrap")
    assert pa != pb and _ppid(pa) == _ppid(pb) == service.pid
    assert (a / "etc" / "motd").read_bytes() == (b / "etc" / "motd").read_bytes()
    mounts.umount(a)
    _wait(lambda: _gone(pa), f"daemon {pa} to exit")
    assert (b / "data").read_bytes() == (image / "src" / "data").read_bytes()  # b unaffected


def test_errors_come_back_as_one_line(service: Service, image: Path, mounts: Mounts,
                                      tmp_path: Path) -> None:
    env = mounts.env()
    cases = [
        (("mount", tmp_path / "no-such" / "bootstrap", tmp_path, "--background"),
         "no-such/bootstrap"),
        (("mount", image / "out" / "bootstrap", tmp_path / "not-a-dir", "--background"),
         "mountpoint is not a directory"),
        (("mount", image / "out" / "bootstrap", tmp_path, "--background", "--config",
          tmp_path / "missing.yaml"), "cannot read config"),
    ]
    for args, want in cases:
        proc = _run(*args, env=env)
        assert proc.returncode == 1, proc.stderr
        line = proc.stderr.strip()
        assert line.startswith("nydusfs: error: ") and "\n" not in line, line
        assert want in line, line
    # The same errors without the service: the same lines.
    proc = _run(*cases[1][0], env=mounts.env("never"))
    assert proc.returncode == 1 and cases[1][1] in proc.stderr
    assert not os.path.ismount(tmp_path)


def test_registry_mount_and_bad_ref(service: Service, image: Path, mounts: Mounts,
                                    tmp_path: Path) -> None:
    registry = RegistryServer(tmp_path / "registry")
    registry.start()
    try:
        ref = f"{registry.host}/svc/img:1"
        proc = _run("build", image / "src", "-o", tmp_path / "out", "--push", ref)
        assert proc.returncode == 0, proc.stderr
        cfg = tmp_path / "m.yaml"
        cfg.write_text(json.dumps({"cache": {"dir": str(tmp_path / "cache")}}))
        mnt, pid = mounts.mount(ref, "--config", cfg)
        assert _ppid(pid) == service.pid
        assert (mnt / "etc" / "motd").read_bytes() == b"served by the zygote\n"
        proc = _run("mount", f"{registry.host}/svc/img:no-such-tag", tmp_path, "--background",
                    "--config", cfg, env=mounts.env())
        assert proc.returncode == 1, proc.stderr
        line = proc.stderr.strip()
        assert line.startswith("nydusfs: error: ") and "\n" not in line, line
        assert "no-such-tag" in line and "not found" in line.lower(), line
        mounts.umount(mnt)
    finally:
        registry.stop()


def test_no_service_falls_back(image: Path, tmp_path: Path) -> None:
    m = Mounts(tmp_path, tmp_path / "nobody-listens.sock")
    try:
        mnt, _pid = m.mount(image / "out" / "bootstrap", mode="auto")
        assert (mnt / "etc" / "motd").read_bytes() == b"served by the zygote\n"
        proc = _run("mount", image / "out" / "bootstrap", tmp_path / "mnt0", "--background",
                    env=m.env("always"))
        assert proc.returncode == 1
        assert "no mount service at" in proc.stderr and "\n" not in proc.stderr.strip()
    finally:
        m.close()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_client_in_another_namespace_is_refused(service: Service, image: Path,
                                                mounts: Mounts, tmp_path: Path) -> None:
    """A daemon the service forks runs in the service's network namespace: a client in
    another one is refused (``auto`` then mounts by itself)."""
    netns = ("unshare", "--net")
    proc = _run("mount", image / "out" / "bootstrap", tmp_path, "--background",
                env=mounts.env("always"), prefix=netns)
    assert proc.returncode == 1 and "another network namespace" in proc.stderr, proc.stderr
    mnt, pid = mounts.mount(image / "out" / "bootstrap", mode="auto", prefix=netns)
    assert _ppid(pid) != service.pid
    assert (mnt / "etc" / "motd").is_file()


def test_service_survives_a_crashing_child(service: Service, image: Path,
                                           mounts: Mounts) -> None:
    mnt, pid = mounts.mount(image / "out" / "bootstrap")
    os.kill(pid, signal.SIGSEGV)
    _wait(lambda: _gone(pid), f"crashed daemon {pid} to be reaped")
    mounts.umount(mnt)  # what the dead daemon left
    assert service.proc.poll() is None
    mnt2, pid2 = mounts.mount(image / "out" / "bootstrap")
    assert _ppid(pid2) == service.pid
    assert (mnt2 / "etc" / "motd").read_bytes() == b"served by the zygote\n"
    assert f"mount daemon {pid} killed by signal {int(signal.SIGSEGV)}" in service.log.read_text()


def test_sigterm_stops_the_service_not_its_mounts(image: Path, tmp_path: Path) -> None:
    svc = Service(tmp_path / "own.sock")
    m = Mounts(tmp_path, svc.sock)
    try:
        mnt, pid = m.mount(image / "out" / "bootstrap")
        assert svc.stop() == 0
        assert not svc.sock.exists()
        assert not _gone(pid)  # its daemon outlives the service
        assert (mnt / "data").read_bytes() == (image / "src" / "data").read_bytes()
        # A second service on the same path after the first stopped; a third is refused.
        svc2 = Service(svc.sock)
        try:
            proc = _run("service", "--socket", svc.sock)
            assert proc.returncode == 1 and "already running" in proc.stderr, proc.stderr
        finally:
            assert svc2.stop() == 0
    finally:
        svc.stop()
        m.close()


def test_client_imports_stay_light(service: Service, image: Path, mounts: Mounts) -> None:
    """What the client imports before the hand-off is the whole cost of a service mount."""
    mnt = mounts.tmp / "light"
    mnt.mkdir()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "nydusfs.cli", "mount",
                           str(image / "out" / "bootstrap"), str(mnt), "--background"],
                          capture_output=True, text=True, timeout=120, check=False,
                          env=mounts.env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    mounts.made.append(mnt)
    mounts.pids.append(int(proc.stdout.split("daemon pid ", 1)[1].split(",", 1)[0]))
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "nydusfs.service" in imported
    heavy = {"asyncio", "aiohttp", "pyfuse3", "trio", "uvloop", "zstandard", "blake3", "yaml",
             "nydusfs.fs.model", "nydusfs.storage"}
    assert not heavy & imported, heavy & imported


def test_request_validation() -> None:
    good = {"op": "mount", "image": "img", "mountpoint": "/m", "config": None, "remote": {},
            "cwd": "/", "env": {"HOME": "/root"}, "started": 1.0, "ns": {"mnt": 1, "net": 2}}
    req = MountRequest.parse(json.dumps(good).encode())
    assert req.mountpoint == "/m" and req.remote_options().platform == "linux/amd64"
    bad = [b"not json", b"[]", json.dumps({**good, "op": "umount"}).encode(),
           json.dumps({**good, "mountpoint": "rel"}).encode(),
           json.dumps({**good, "config": "rel.yaml"}).encode(),
           json.dumps({**good, "env": {"A": 1}}).encode(),
           json.dumps({**good, "started": True}).encode(),
           json.dumps({k: v for k, v in good.items() if k != "cwd"}).encode()]
    for line in bad:
        with pytest.raises(NydusfsError, match="mount request"):
            MountRequest.parse(line)
    with pytest.raises(NydusfsError, match="remote"):
        MountRequest.parse(json.dumps({**good, "remote": {"nope": 1}}).encode()).remote_options()

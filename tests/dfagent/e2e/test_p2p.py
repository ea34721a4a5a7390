"""End to end on loopback: a real registry, ``dfagent supernode``, ``dfagent peer`` processes and
``nydusfs mount REF`` with ``backend: dragonfly``, as a node would run them.

One image (a few MiB, 64 KiB chunks) is pushed with umoci/skopeo and converted with
``nydusfs convert`` into a real docker-registry, once per module. The registry's access log
(response bytes of every blob GET) is the independent count of what it served. Every process
is stopped by its PID (the :class:`cluster.Cluster` and mount fixtures' teardown).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cluster import (
    Cluster,
    PeerProcess,
    assert_same_tree,
    convert_sample_image,
    metric,
    wait_until,
)
from fs.conftest import NydusMount
from oci.images import RefMount, blob_gets
from registry_server import RegistryServer

from nydusfs.format import chunkfile
from nydusfs.format.reader import Bootstrap

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="needs root and /dev/fuse"),
    pytest.mark.skipif(not (shutil.which("umoci") and shutil.which("skopeo")
                            and shutil.which("docker-registry")),
                       reason="needs umoci, skopeo and docker-registry"),
]

MiB = 1 << 20
REPO = "e2e/app"
# Generous fetch bounds: a slow lookup on a loaded machine must not turn into a source read
# (which the byte-count assertions would then see); the fault tests set their own.
FETCH = {"lookup_timeout": "5s", "peer_timeout": "20s", "hedge_after": "10s"}


@dataclass
class Image:
    registry: RegistryServer
    ref: str
    tree: Path  # the source files, as the mount must show them
    data_blobs: dict[str, int]  # digest -> size of the blobs holding chunk data
    bootstrap: Path  # a local copy, for building local-API requests
    location: dict[str, Any]

    def items(self) -> list[dict[str, Any]]:
        with Bootstrap.open(self.bootstrap) as boot:
            return [{"digest": r.hex, "source": 0, "blob": boot.blob(r.blob_index).hex,
                     "offset": r.compressed_offset, "size": r.compressed_size,
                     "uncompressed_size": r.uncompressed_size, "flags": r.flags}
                    for r in boot.chunks()]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    tmp = tmp_path_factory.mktemp("p2p-image")
    registry = RegistryServer(tmp / "registry")
    registry.start()
    try:
        tree, out, data = convert_sample_image(registry, REPO, tmp)
        ref = f"{registry.host}/{REPO}:1"
        yield Image(registry, ref, tree, data, out / "bootstrap",
                    {"type": "registry", "host": registry.host, "repository": REPO})
    finally:
        registry.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path / "cluster") as c:
        yield c


@pytest.fixture
def mounts() -> Iterator[list[NydusMount]]:
    made: list[NydusMount] = []
    yield made
    for m in reversed(made):
        m.close()


def mount_via(peer: PeerProcess | Path, image: Image, tmp: Path, mounts: list[NydusMount],
              name: str) -> RefMount:
    """``nydusfs mount REF`` with ``backend: dragonfly`` on ``peer``'s socket."""
    sock = peer if isinstance(peer, Path) else peer.socket
    cfg = tmp / f"mount-{name}.yaml"
    cfg.write_text(json.dumps({
        "backend": {"type": "dragonfly", "dragonfly": {"socket": str(sock),
                                                       "retry_after": "60s"}},
        "cache": {"dir": str(tmp / f"cache-{name}")},
        "read": {"readahead_chunks": 0}}))
    m = RefMount(image.ref, tmp / f"mnt-{name}", "--config", cfg)
    mounts.append(m)
    return m


def registry_served(image: Image, since: int) -> dict[str, int]:
    gets = blob_gets(image.registry, since, REPO)
    return {d: n for d, n in gets.items() if d in image.data_blobs}


def held(peer: PeerProcess) -> int:
    return int(peer.status()["store"]["chunks"])


def wait_announced(sn: Any, peer: PeerProcess) -> None:
    want = held(peer)

    def done() -> bool:
        view = sn.peer(peer.id)
        return view is not None and view["chunks"] >= want

    wait_until(done, f"{peer.id}'s {want} chunks announced")


def test_three_peers_registry_serves_each_byte_once(image: Image, cluster: Cluster,
                                                    tmp_path: Path,
                                                    mounts: list[NydusMount]) -> None:
    sn = cluster.supernode()
    peers = [cluster.peer(n, supernodes=[sn.url], fetch=FETCH) for n in ("a", "b", "c")]
    since = len(image.registry.access_log())
    n_chunks = len(image.items())

    a = mount_via(peers[0], image, tmp_path, mounts, "a")
    assert assert_same_tree(a.mnt, image.tree) > 3 * MiB
    assert held(peers[0]) == n_chunks
    wait_announced(sn, peers[0])

    for peer in peers[1:]:
        m = mount_via(peer, image, tmp_path, mounts, peer.name)
        assert_same_tree(m.mnt, image.tree)
        wait_announced(sn, peer)

    served = registry_served(image, since)
    assert served, "the registry served no chunk data at all"
    for digest, size in image.data_blobs.items():
        assert served.get(digest, 0) <= size, f"{digest}: served {served[digest]} of {size}"
    for peer in peers[1:]:
        text = peer.metrics()
        assert metric(text, "dfagent_peer_chunks_total", {"origin": "peer"}) == n_chunks
        assert metric(text, "dfagent_peer_chunks_total", {"origin": "source"}) == 0
        assert metric(text, "dfagent_peer_p2p_hit_ratio") == 1.0
    a_text = peers[0].metrics()
    assert metric(a_text, "dfagent_peer_chunks_total", {"origin": "source"}) == n_chunks
    assert metric(a_text, "dfagent_peer_uploads_total") >= n_chunks  # b and c read from a


def corrupt_store(peer: PeerProcess) -> int:
    """Flip a payload byte of every chunk file (headers intact: it still looks like a chunk)."""
    files = peer.chunk_files()
    for f in files:
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    return len(files)


def fetch_all(peer: PeerProcess, image: Image) -> dict[str, bytes]:
    """Every chunk through ``peer``'s local API as bytes, verified here against its digest."""
    items = image.items()
    code, body = peer.chunks([image.location], items, deliver="bytes")
    assert code == 200, body[:300]
    out = {}
    for frame in chunkfile.iter_frames(body):
        assert frame.status == chunkfile.FRAME_FOUND, frame.message
        out[frame.digest.hex()] = chunkfile.unpack_verified(frame.body, frame.digest)
    assert set(out) == {i["digest"] for i in items}
    return out


def test_bad_peer_is_detected_reported_and_quarantined(image: Image, cluster: Cluster,
                                                       tmp_path: Path,
                                                       mounts: list[NydusMount]) -> None:
    sn = cluster.supernode(quarantine={"reports": 2, "window": "5m", "duration": "10m"})
    # a serves what is on its disk, not the copies of recent chunks kept in memory (which
    # were verified when they arrived and cannot go bad there).
    a = cluster.peer("a", supernodes=[sn.url], fetch=FETCH, upload={"memory": 0})
    b = cluster.peer("b", supernodes=[sn.url], fetch=FETCH)
    fetch_all(a, image)
    wait_announced(sn, a)
    fetch_all(b, image)  # from a
    wait_announced(sn, b)
    assert corrupt_store(a) == len(image.items())
    # Readers that keep nothing (quota of one byte), so each of them has to ask a or b.
    tiny: dict[str, Any] = {"quota": 1, "fetch": FETCH, "supernodes": [sn.url]}

    c = cluster.peer("c", **tiny)
    # One chunk per request: each is a fresh lookup, whose order among equally good holders is
    # random, so a is asked first for about half of them (until c has reported it).
    for item in image.items():
        code, body = c.chunks([image.location], [item], deliver="bytes")
        assert code == 200
        (frame,) = chunkfile.iter_frames(body)
        assert frame.status == chunkfile.FRAME_FOUND, frame.message
        chunkfile.unpack_verified(frame.body, frame.digest)  # nothing wrong reached the reader
    c_text = c.metrics()
    assert metric(c_text, "dfagent_peer_verification_failures_total", {"origin": "peer"}) >= 1
    assert metric(c_text, "dfagent_peer_bad_peer_reports_total", {"reason": "corrupt"}) >= 1
    # what a could not give, b did: the registry was not needed
    assert metric(c_text, "dfagent_peer_chunks_total", {"origin": "source"}) == 0
    assert (sn.peer("a") or {}).get("quarantined_until") is None  # one reporter is not enough

    b.stop()  # b leaves: a (reported, so ranked last) is the only holder left
    d = cluster.peer("d", **tiny)
    m = mount_via(d, image, tmp_path, mounts, "d")  # a real reader, through FUSE
    assert_same_tree(m.mnt, image.tree)
    d_text = d.metrics()
    assert metric(d_text, "dfagent_peer_verification_failures_total", {"origin": "peer"}) >= 1
    assert metric(d_text, "dfagent_peer_chunks_total", {"origin": "source"}) > 0
    wait_until(lambda: (sn.peer("a") or {}).get("quarantined_until") is not None,
               "the supernode to quarantine a after reports from c and d")


def test_supernode_down_reads_from_source_then_reregister(image: Image, cluster: Cluster,
                                                          tmp_path: Path,
                                                          mounts: list[NydusMount]) -> None:
    sn = cluster.supernode(peer_ttl="3s")  # heartbeats every second: a restart is seen soon
    a = cluster.peer("a", supernodes=[sn.url], fetch={"lookup_timeout": "1s"})
    b = cluster.peer("b", supernodes=[sn.url], fetch={"lookup_timeout": "1s"})
    fetch_all(a, image)
    wait_announced(sn, a)

    m = mount_via(b, image, tmp_path, mounts, "b")
    first = sorted(p for p in image.tree.rglob("*") if p.is_file())[0]
    assert (m.mnt / first.relative_to(image.tree)).read_bytes() == first.read_bytes()
    sn.kill()  # mid-read: the rest of the mount's reads come from the source
    assert_same_tree(m.mnt, image.tree)
    text = b.metrics()
    assert metric(text, "dfagent_peer_chunks_total", {"origin": "source"}) > 0
    assert metric(text, "dfagent_peer_supernode_connected") == 0

    sn.restart()  # an empty memory store: both peers must register and announce again
    for p in (a, b):
        wait_until(lambda p=p: (sn.peer(p.id) or {}).get("chunks", 0) == held(p),  # type: ignore[misc]
                   f"{p.id} to register again and re-announce")
        assert metric(p.metrics(), "dfagent_peer_registrations_total") >= 2


def test_peer_killed_mid_transfer_requester_moves_on(image: Image, cluster: Cluster) -> None:
    sn = cluster.supernode()
    slow = cluster.peer("slow", supernodes=[sn.url], upload={"rate": "64KiB/s"})
    fetch_all(slow, image)
    wait_announced(sn, slow)
    c = cluster.peer("c", supernodes=[sn.url],
                     fetch={"lookup_timeout": "5s", "peer_timeout": "60s", "hedge_after": "60s"})
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["chunks"] = fetch_all(c, image)
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    try:
        wait_until(lambda: metric(slow.metrics(), "dfagent_peer_uploads_active") >= 1,
                   "the slow peer to start uploading")
    finally:
        slow.kill()
        t.join(120)
    assert not t.is_alive()
    assert "error" not in result, result.get("error")
    assert len(result["chunks"]) == len(image.items())
    text = c.metrics()
    assert metric(text, "dfagent_peer_chunks_total", {"origin": "source"}) > 0
    assert sum(metric(text, "dfagent_peer_bad_peer_reports_total", {"reason": r})
               for r in ("error", "refused", "timeout")) >= 1


def test_dead_agent_mount_falls_back_to_the_registry(image: Image, cluster: Cluster,
                                                     tmp_path: Path,
                                                     mounts: list[NydusMount]) -> None:
    a = cluster.peer("a")
    a.kill()  # the socket file is left behind, nobody listens: connection refused
    since = len(image.registry.access_log())
    m = mount_via(a, image, tmp_path, mounts, "dead")
    assert_same_tree(m.mnt, image.tree)
    assert registry_served(image, since)  # the bytes came from the image's own source
    m2 = mount_via(tmp_path / "no-such.sock", image, tmp_path, mounts, "missing")
    assert_same_tree(m2.mnt, image.tree)


def test_preheat_and_get_through_the_agent(image: Image, cluster: Cluster,
                                           tmp_path: Path) -> None:
    sn = cluster.supernode()
    a = cluster.peer("a", supernodes=[sn.url], fetch=FETCH)
    b = cluster.peer("b", supernodes=[sn.url], fetch=FETCH)
    cmd = [*cluster_cmd(), "preheat", image.ref, "--socket", str(a.socket)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    n = len(image.items())
    assert f"preheated {n}/{n}" in proc.stdout and f"{n} from source" in proc.stdout
    wait_announced(sn, a)
    wanted = [i["digest"] for i in image.items()[:3]]
    out = tmp_path / "got"
    proc = subprocess.run([*cluster_cmd(), "get", "--source", image.ref, *wanted, "-o",
                           str(out), "--socket", str(b.socket)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import blake3

    for d in wanted:
        assert blake3.blake3((out / d).read_bytes()).hexdigest() == d
    assert metric(b.metrics(), "dfagent_peer_chunks_total", {"origin": "peer"}) == 3
    proc = subprocess.run([*cluster_cmd(), "get", "--source", image.ref, "ab" * 32, "-o",
                           str(out), "--socket", str(b.socket)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "not a chunk of" in proc.stderr
    assert proc.stderr.count("\n") == 1  # one line, no traceback


def cluster_cmd() -> list[str]:
    from cluster import dfagent_cmd

    return dfagent_cmd()


def test_cluster_token_is_required_everywhere(image: Image, cluster: Cluster) -> None:
    import urllib.error
    import urllib.request

    token = "e2e-cluster-token-0123456789"
    sn = cluster.supernode(token=token)
    a, b = (cluster.peer(n, supernodes=[sn.url], token=token, fetch=FETCH) for n in "ab")
    fetch_all(a, image)
    wait_announced(sn, a)
    fetch_all(b, image)  # registered, looked up and fetched from a, all with the token
    assert metric(b.metrics(), "dfagent_peer_chunks_total", {"origin": "peer"}) == \
        len(image.items())
    digest = image.items()[0]["digest"]
    for url in (f"{a.url}/chunks/{digest}", f"{sn.url}/api/v1/peers/a"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url, timeout=10)
        assert info.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
    # A peer without the token gets nowhere with the supernode: no P2P, only the source.
    c = cluster.peer("c", supernodes=[sn.url], fetch={"lookup_timeout": "1s"})
    fetch_all(c, image)
    assert metric(c.metrics(), "dfagent_peer_supernode_connected") == 0
    assert metric(c.metrics(), "dfagent_peer_chunks_total", {"origin": "peer"}) == 0

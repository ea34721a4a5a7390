"""End to end across network namespaces: the 3-peer test of ``test_p2p.py`` where every machine
has its own address and a shaped link (RECIPES §6).

On loopback every peer is ``127.0.0.1`` and bandwidth is free; here the registry, the supernode
and peers a, b, c each live in a network namespace on one bridge (:mod:`netlab`, hosts
``10.215.1.x``), every link shaped both ways at 100 Mbit/s with ``tc tbf``, so a peer is found
and reached by the address it registered, and bytes really cross links we can count. The
processes are the real ones (``docker-registry``, ``dfagent supernode``, ``dfagent peer``,
``nydusfs mount REF`` with ``backend: dragonfly``), started in their namespaces with ``nsenter
--net`` (the mount namespace stays shared, so the FUSE mounts are visible to the test) by
``fanout_bench.LabCluster``, and stopped by PID in teardown, namespaces deleted.

The image is pushed and converted on a loopback registry that shares its storage with the one
in the lab (the lab is not reachable from the test's own namespace, and pushing is not what is
tested). The independent count of what the registry served is its access log.

Skipped (with the reason) only when namespaces cannot be made here: not root, no iproute2, a
kernel without veth/bridge/tbf.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster import assert_same_tree, convert_sample_image, metric
from registry_server import RegistryServer

_BENCH = str(Path(__file__).resolve().parents[3] / "bench")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)

from fanout_bench import LabCluster, registry_blob_gets  # noqa: E402
from netlab import NetLab, lab_available  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="needs root and /dev/fuse"),
    pytest.mark.skipif(not (shutil.which("umoci") and shutil.which("skopeo")
                            and shutil.which("docker-registry")),
                       reason="needs umoci, skopeo and docker-registry"),
    pytest.mark.timeout(180),
]

MiB = 1 << 20
REPO = "e2e/netns"
RATE = "100mbit"
# Generous fetch bounds, as in test_p2p: a slow lookup on a loaded 2-core machine must not turn
# into a source read, which the byte counts would then see.
FETCH = "fetch: {lookup_timeout: 5s, peer_timeout: 20s, hedge_after: 10s}\n"


@dataclass
class Image:
    ref_path: str  # REPO:TAG, on whichever registry serves the storage
    tree: Path
    data_blobs: dict[str, int]  # digest -> size of the blobs holding chunk data
    chunks: int
    storage: Path


@pytest.fixture(scope="module")
def lab_reason() -> str | None:
    return lab_available()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    """A few MiB in 64 KiB chunks, converted on a loopback registry; its storage is reused by
    the registry in the lab."""
    tmp = tmp_path_factory.mktemp("netns-image")
    registry = RegistryServer(tmp / "registry")
    registry.start()
    try:
        tree, out, data = convert_sample_image(registry, REPO, tmp)
        from nydusfs.format.reader import Bootstrap

        with Bootstrap.open(out / "bootstrap") as boot:
            n_chunks = len({r.hex for r in boot.chunks()})
    finally:
        registry.stop()
    yield Image(f"{REPO}:1", tree, data, n_chunks, registry.root)


@pytest.fixture
def lab_cluster(lab_reason: str | None, tmp_path: Path) -> Iterator[LabCluster]:
    if lab_reason is not None:
        pytest.skip(lab_reason)
    lab = NetLab(["reg", "sn", "a", "b", "c"], prefix=f"dff-t{os.getpid()}-", rate=RATE)
    cluster = LabCluster(lab, tmp_path / "lab")
    try:
        lab.up()
        yield cluster
    finally:
        cluster.close()
        lab.down()


def wait_announced(cluster: LabCluster, peer: str, want: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        view = cluster.supernode_peer(peer)
        if view is not None and view["chunks"] >= want:
            return
        assert time.monotonic() < deadline, f"{peer}: {want} chunks not announced: {view}"
        time.sleep(0.2)


def test_three_peers_in_namespaces_registry_serves_each_byte_once(
        image: Image, lab_cluster: LabCluster) -> None:
    c = lab_cluster
    c.start_registry(image.storage)
    c.start_supernode()
    for node in ("a", "b", "c"):
        c.start_peer(node, FETCH)
    c.wait_peers()
    ref = f"{c.registry_addr}/{image.ref_path}"
    _, log_start = registry_blob_gets(c.registry_log())
    tx0 = {n: c.lab.counters(n)["tx_bytes"] for n in ("a", "b", "c")}

    # The peers registered with their own lab addresses: distinct, not loopback.
    views = {n: c.supernode_peer(n) for n in ("a", "b", "c")}
    for n, view in views.items():
        assert view is not None and view["address"] == f"http://{c.h(n).ip}:8002", view

    c.mount_all(ref, {"a": c.mount_config("a", "dragonfly", prefetch_all=False)})
    assert assert_same_tree(c.mounts["a"].mnt, image.tree) > 3 * MiB
    assert c.peer_status("a")["store"]["chunks"] == image.chunks
    wait_announced(c, "a", image.chunks)

    for node in ("b", "c"):
        c.mount_all(ref, {node: c.mount_config(node, "dragonfly", prefetch_all=False)})
        assert_same_tree(c.mounts[node].mnt, image.tree)
        assert c.peer_status(node)["store"]["chunks"] == image.chunks
        wait_announced(c, node, image.chunks)

    gets, _ = registry_blob_gets(c.registry_log(), log_start)
    served = {d: n for d, (n, _) in gets.items() if d in image.data_blobs}
    assert served, "the registry served no chunk data at all"
    for digest, size in image.data_blobs.items():
        assert served.get(digest, 0) <= size, f"{digest}: served {served[digest]} of {size}"

    for node in ("b", "c"):
        text = c.peer_metrics(node)
        assert metric(text, "dfagent_peer_chunks_total", {"origin": "peer"}) == image.chunks
        assert metric(text, "dfagent_peer_chunks_total", {"origin": "source"}) == 0
    a_text = c.peer_metrics("a")
    assert metric(a_text, "dfagent_peer_chunks_total", {"origin": "source"}) == image.chunks
    uploads = sum(metric(c.peer_metrics(n), "dfagent_peer_upload_bytes_total")
                  for n in ("a", "b"))
    data_bytes = sum(image.data_blobs.values())
    # The bytes crossed the shaped links: a and b sent at least what b and c received.
    tx = {n: c.lab.counters(n)["tx_bytes"] - tx0[n] for n in ("a", "b", "c")}
    assert tx["a"] + tx["b"] >= uploads >= data_bytes, (tx, uploads, data_bytes)

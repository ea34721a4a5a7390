"""RegistryClient against a real docker-registry (distribution 2.8) in each auth mode.

Pull and push of blobs and manifests, ranged reads, index platform selection, Docker v2
manifests from skopeo, HEAD-skip and cross-repository mounts (checked in the registry's own
access log), chunked uploads, Bearer tokens cached and refreshed, and the errors a user sees
for wrong credentials, missing things, corrupt blobs and artifacts that are not images.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import urllib.request
from pathlib import Path

import pytest
from registry_server import RegistryServer, push_oci_dirs

from nydusfs.errors import (
    AuthError,
    ConfigError,
    FormatError,
    IntegrityError,
    NotFoundError,
)
from nydusfs.oci import (
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    ClientOptions,
    RegistryClient,
)

from .conftest import image_config, options_for, push_image, run, sha

MODES = ["registry", "basic_registry", "token_registry"]
_names = itertools.count()


def repo(prefix: str = "t") -> str:
    """A repository name no other test uses (the registries are shared per session)."""
    return f"{prefix}/r{next(_names)}-{os.getpid()}"


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1_000_003 + n).randbytes(n)


@pytest.mark.parametrize("mode", MODES)
def test_push_and_pull(mode: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    server: RegistryServer = request.getfixturevalue(mode)
    r = repo()
    layers = [blob(300_000, 1), blob(10, 2), b""]

    async def go() -> None:
        async with RegistryClient(server.host, options_for(server)) as c:
            digest = await push_image(c, r, "v1", layers)
            assert c.blobs_uploaded == 4 and c.blobs_skipped == 0
            m = await c.get_manifest(r, "v1")
            assert m.digest == digest and m.media_type == MEDIA_OCI_MANIFEST
            assert [d.digest for d in m.layers] == [sha(x) for x in layers]
            by_digest = await c.get_manifest(r, digest)
            assert by_digest.raw == m.raw
            assert await c.get_blob(r, m.config.digest) == image_config("amd64", layers)
            for layer in layers:
                assert await c.blob_exists(r, sha(layer))
                assert await c.blob_size(r, sha(layer)) == len(layer)
            big = layers[0]
            assert await c.read_blob_range(r, sha(big), 12345, 1000) == big[12345:13345]
            seen: list[int] = []
            dest = tmp_path / "layer0"
            assert await c.download_blob(r, sha(big), dest, progress=seen.append) == len(big)
            assert dest.read_bytes() == big and sum(seen) == len(big)
            assert not await c.push_blob(r, sha(big), big)  # already there: HEAD, no upload
            assert c.blobs_skipped == 1
            if server.auth == "token":
                # one token for pull, one for push: cached, not fetched per request
                assert c.auth.tokens_fetched == 2
                assert c.requests_sent > 20
    run(go())


@pytest.mark.parametrize("mode", ["basic_registry", "token_registry"])
def test_wrong_or_missing_credentials(mode: str, request: pytest.FixtureRequest) -> None:
    server: RegistryServer = request.getfixturevalue(mode)
    r = repo()

    async def go() -> None:
        async with RegistryClient(server.host, options_for(server)) as c:
            await push_image(c, r, "v1", [b"x"])
        bad = ClientOptions(username="alice", password="not-the-password")
        async with RegistryClient(server.host, bad) as c:
            with pytest.raises(AuthError) as info:
                await c.get_manifest(r, "v1")
            assert "alice" in str(info.value) and "not-the-password" not in str(info.value)
            assert "explicit credentials" in str(info.value)
        anonymous = ClientOptions(auth_file=_empty_auth_file(server.workdir))
        async with RegistryClient(server.host, anonymous) as c:
            with pytest.raises(AuthError, match="anonymous"):
                await c.get_manifest(r, "v1")
    run(go())


def _empty_auth_file(directory: Path) -> Path:
    path = directory / "empty-auth.json"
    path.write_text('{"auths": {}}')
    return path


def test_credentials_from_docker_config(basic_registry: RegistryServer, tmp_path: Path) -> None:
    import base64
    user, password = basic_registry.credentials()
    auth_file = tmp_path / "config.json"
    auth_file.write_text(json.dumps({"auths": {f"http://{basic_registry.host}": {
        "auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    r = repo()

    async def go() -> None:
        async with RegistryClient(basic_registry.host, ClientOptions(auth_file=auth_file)) as c:
            digest = await push_image(c, r, "v1", [b"layer"])
            assert (await c.get_manifest(r, "v1")).digest == digest
    run(go())


def test_expired_tokens_are_refetched(token_registry: RegistryServer) -> None:
    issuer = token_registry.issuer
    assert issuer is not None
    r = repo()
    now = [0.0]

    async def go() -> None:
        async with RegistryClient(token_registry.host, options_for(token_registry)) as c:
            await push_image(c, r, "v1", [b"layer"])
        # The issuer hands out an already expired token: the real registry answers 401, the
        # client drops the token and fetches a fresh one.
        issuer.expire_next = 1
        before = len(issuer.requests)
        async with RegistryClient(token_registry.host, options_for(token_registry),
                                  clock=lambda: now[0]) as c:
            m = await c.get_manifest(r, "v1")
            got = issuer.requests[before:]
            assert [q.expired for q in got] == [True, False]
            assert c.auth.tokens_fetched == 2
            await c.get_blob(r, m.config.digest)
            assert c.auth.tokens_fetched == 2  # cached
            now[0] += 10_000  # past expires_in: refetched before use, no 401 needed
            await c.get_blob(r, m.config.digest)
            assert c.auth.tokens_fetched == 3
            assert len(issuer.requests) == before + 3
    run(go())


def test_index_platform_selection(registry: RegistryServer) -> None:
    r = repo()

    async def go() -> None:
        async with RegistryClient(registry.host) as c:
            amd = await push_image(c, r, "amd", [b"amd64 layer"], arch="amd64")
            arm = await push_image(c, r, "arm", [b"arm64 layer"], arch="arm64")
            sizes = {d: len((await c.get_manifest(r, d)).raw) for d in (amd, arm)}
            index = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": [
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": arm, "size": sizes[arm],
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": amd, "size": sizes[amd],
                 "platform": {"os": "linux", "architecture": "amd64"}},
            ]}).encode()
            index_digest = await c.put_manifest(r, "multi", index, MEDIA_OCI_INDEX)
            assert index_digest == sha(index)
            assert (await c.get_manifest(r, "multi")).digest == amd
            assert (await c.get_manifest(r, "multi", platform="linux/arm64")).digest == arm
            assert (await c.get_manifest(r, index_digest, platform="linux/arm64/v8")).digest \
                == arm
            with pytest.raises(NotFoundError, match="linux/s390x"):
                await c.get_manifest(r, "multi", platform="linux/s390x")
            with pytest.raises(ConfigError, match="invalid platform"):
                await c.get_manifest(r, "multi", platform="amd64")
    run(go())


def test_docker_v2_manifest_from_skopeo(registry: RegistryServer, tmp_path: Path) -> None:
    layer_dir = tmp_path / "l1"
    (layer_dir / "etc").mkdir(parents=True)
    (layer_dir / "etc" / "hello").write_text("hello\n")
    r = repo()
    digest = push_oci_dirs(registry.host, f"{r}:v2s2", [layer_dir], format="v2s2",
                           config={"Cmd": ["/bin/true"]})

    async def go() -> None:
        async with RegistryClient(registry.host) as c:
            m = await c.get_manifest(r, "v2s2")
            assert m.media_type == MEDIA_DOCKER_MANIFEST and m.digest == digest
            config = json.loads(await c.get_blob(r, m.config.digest))
            assert config["config"]["Cmd"] == ["/bin/true"]
            (layer,) = m.layers
            assert layer.media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"
            dest = tmp_path / "layer.tgz"
            assert await c.download_blob(r, layer.digest, dest) == layer.size
    run(go())


def test_cross_repository_mount_and_head_skip(registry: RegistryServer) -> None:
    src, dst = repo("src"), repo("dst")
    data = blob(200_000, 7)

    async def go() -> None:
        async with RegistryClient(registry.host) as c:
            assert await c.push_blob(src, sha(data), data)
        before = len(registry.access_log())
        async with RegistryClient(registry.host) as c:
            assert not await c.push_blob(dst, sha(data), data, mount_from=["other/none", src])
            assert (c.blobs_mounted, c.blobs_uploaded, c.bytes_uploaded) == (1, 0, 0)
            assert not await c.push_blob(dst, sha(data), data, mount_from=[src])
            assert c.blobs_skipped == 1
            assert await c.read_blob_range(dst, sha(data), 0, 10) == data[:10]
        log = registry.access_log()[before:]
        assert not [e for e in log if e.method in ("PATCH", "PUT")]
        # the first mount source lacks the blob: distribution opens an upload session
        # instead, which the client cancels before trying the next source
        mounts = [e for e in log if e.method == "POST"]
        assert [e.status for e in mounts] == [202, 201]
        assert "from=other/none" in mounts[0].path and f"from={src}" in mounts[1].path
        assert [e.status for e in log if e.method == "DELETE"] == [204]
    run(go())


def test_mount_from_the_right_repository(registry: RegistryServer) -> None:
    src, dst = repo("src"), repo("dst")
    data = blob(1000, 8)

    async def go() -> None:
        async with RegistryClient(registry.host) as c:
            await c.push_blob(src, sha(data), data)
            assert not await c.push_blob(dst, sha(data), data, mount_from=[src])
            assert c.blobs_mounted == 1 and c.blobs_uploaded == 1
    run(go())


def test_mount_blob_alone_moves_no_bytes(registry: RegistryServer) -> None:
    """``mount_blob``: True on 201; False when the registry opens an upload instead (that
    session is cancelled); never reads or sends the blob's bytes."""
    src, dst, empty = repo("src"), repo("dst"), repo("empty")
    data = blob(300_000, 11)

    async def go() -> None:
        async with RegistryClient(registry.host) as c:
            assert await c.push_blob(src, sha(data), data)
        before = len(registry.access_log())
        async with RegistryClient(registry.host) as c:
            assert not await c.mount_blob(dst, sha(data), empty)  # not there: no mount
            assert not await c.blob_exists(dst, sha(data))
            assert await c.mount_blob(dst, sha(data), src)
            assert (c.blobs_mounted, c.bytes_uploaded, c.bytes_downloaded) == (1, 0, 0)
            assert await c.read_blob_range(dst, sha(data), 1000, 10) == data[1000:1010]
        log = registry.access_log()[before:]
        posts = [e for e in log if e.method == "POST"]
        assert [e.status for e in posts] == [202, 201]
        assert f"from={empty}" in posts[0].path and f"from={src}" in posts[1].path
        assert [e.status for e in log if e.method == "DELETE"] == [204]  # the 202's session
        assert not [e for e in log if e.method in ("PATCH", "PUT")]
        assert not [e for e in log if e.method == "GET" and e.size > 100]  # only the range
    run(go())


def test_chunked_upload_from_disk(registry: RegistryServer, tmp_path: Path) -> None:
    data = blob(5 * (1 << 20) + 12345, 9)
    path = tmp_path / "big"
    path.write_bytes(data)
    r = repo()

    async def go() -> None:
        before = len(registry.access_log())
        seen: list[int] = []
        async with RegistryClient(registry.host, ClientOptions(chunk_size=1 << 20)) as c:
            assert await c.push_blob(r, sha(data), path, progress=seen.append)
            assert c.bytes_uploaded == len(data) == sum(seen)
            log = registry.access_log()[before:]
            patches = [e for e in log if e.method == "PATCH"]
            puts = [e for e in log if e.method == "PUT"]
            assert len(patches) == 6 and all(e.status == 202 for e in patches)
            assert len(puts) == 1 and puts[0].status == 201
            out = tmp_path / "out"
            assert await c.download_blob(r, sha(data), out) == len(data)
            assert out.read_bytes() == data
    run(go())


def test_pushing_wrong_bytes_is_an_integrity_error(registry: RegistryServer,
                                                   tmp_path: Path) -> None:
    r = repo()
    path = tmp_path / "f"
    path.write_bytes(b"actual bytes")

    async def go() -> None:
        async with RegistryClient(registry.host) as c:
            with pytest.raises(IntegrityError):
                await c.push_blob(r, sha(b"other bytes"), b"actual bytes")
            with pytest.raises(IntegrityError, match="DIGEST_INVALID"):
                await c.push_blob(r, sha(b"other bytes"), path)  # the registry checks files
            assert not await c.blob_exists(r, sha(b"other bytes"))
    run(go())


def test_ranges(registry: RegistryServer) -> None:
    data = blob(100_000, 3)
    r = repo()
    n = len(data)

    async def go() -> None:
        async with RegistryClient(registry.host) as c:
            await c.push_blob(r, sha(data), data)
            d = sha(data)
            assert await c.read_blob_range(r, d, 0, 1) == data[:1]
            assert await c.read_blob_range(r, d, n - 1, 1) == data[-1:]
            assert await c.read_blob_range(r, d, 0, n) == data
            assert await c.read_blob_range(r, d, n, 0) == b""
            for offset, size in ((n, 1), (n - 1, 2), (n + 1, 0), (0, n + 1), (-1, 1)):
                with pytest.raises(NotFoundError):
                    await c.read_blob_range(r, d, offset, size)
            with pytest.raises(NotFoundError):
                await c.read_blob_range(r, sha(b"missing"), 0, 1)
            with pytest.raises(FormatError, match="more than the 1000"):
                await c.get_blob(r, d, max_size=1000)
    run(go())


def test_not_found(registry: RegistryServer, tmp_path: Path) -> None:
    r = repo()

    async def go() -> None:
        async with RegistryClient(registry.host) as c:
            await push_image(c, r, "v1", [b"x"])
            for ref in ("nope", sha(b"nope")):
                with pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN"):
                    await c.get_manifest(r, ref)
            with pytest.raises(NotFoundError):
                await c.get_manifest("no/such/repo", "v1")
            with pytest.raises(NotFoundError, match="BLOB_UNKNOWN"):
                await c.get_blob(r, sha(b"nope"))
            with pytest.raises(NotFoundError):
                await c.download_blob(r, sha(b"nope"), tmp_path / "x")
            assert not await c.blob_exists(r, sha(b"nope"))
            with pytest.raises(ConfigError, match="invalid repository"):
                await c.get_manifest("Bad/Repo", "v1")
            with pytest.raises(ConfigError, match="invalid tag"):
                await c.get_manifest(r, "bad tag")
        assert list(tmp_path.iterdir()) == []
    run(go())


def test_corrupt_blob_in_the_registry(registry: RegistryServer, tmp_path: Path) -> None:
    data = blob(50_000, 4)
    r = repo()

    async def go() -> None:
        async with RegistryClient(registry.host) as c:
            await c.push_blob(r, sha(data), data)
            stored = registry.blob_file(sha(data))
            assert stored.read_bytes() == data
            stored.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit off
            with pytest.raises(IntegrityError, match="hashes to"):
                await c.get_blob(r, sha(data))
            dest = tmp_path / "blob"
            with pytest.raises(IntegrityError):
                await c.download_blob(r, sha(data), dest)
            assert list(tmp_path.iterdir()) == []  # neither dest nor a temp file
    run(go())


def test_artifact_is_not_an_image(registry: RegistryServer) -> None:
    r = repo()
    config = b'{"name": "chart", "version": "1.0.0"}'

    async def go() -> None:
        async with RegistryClient(registry.host) as c:
            await c.push_blob(r, sha(config), config)
            chart = json.dumps({
                "schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json",
                           "digest": sha(config), "size": len(config)},
                "layers": []}).encode()
            with pytest.raises(FormatError, match="not a container image"):
                await c.put_manifest(r, "chart", chart, MEDIA_OCI_MANIFEST)
            # put it there the way helm would (the client refuses to push non-images)
            req = urllib.request.Request(f"{registry.url}/v2/{r}/manifests/chart", data=chart,
                                         method="PUT",
                                         headers={"Content-Type": MEDIA_OCI_MANIFEST})
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 201
            with pytest.raises(FormatError, match=r"is not a container image: its config has "
                                                  r"media type 'application/vnd\.cncf\.helm"):
                await c.get_manifest(r, "chart")
    run(go())


def test_closed_client_refuses(registry: RegistryServer) -> None:
    async def go() -> None:
        c = RegistryClient(registry.host)
        await c.close()
        await c.close()
        from nydusfs.errors import UnavailableError
        with pytest.raises(UnavailableError, match="closed"):
            await c.blob_exists("a/b", sha(b""))
    run(go())


def test_docker_hub_and_scheme_defaults() -> None:
    assert RegistryClient("docker.io").base == "https://registry-1.docker.io"
    assert RegistryClient("127.0.0.1:5000").base == "http://127.0.0.1:5000"
    assert RegistryClient("localhost:5000").base == "http://localhost:5000"
    assert RegistryClient("[::1]:5000").base == "http://[::1]:5000"
    assert RegistryClient("ghcr.io").base == "https://ghcr.io"
    assert RegistryClient("reg.lan:5000", ClientOptions(plain_http=True)).base == \
        "http://reg.lan:5000"
    assert RegistryClient("127.0.0.1:5000", ClientOptions(plain_http=False)).base == \
        "https://127.0.0.1:5000"

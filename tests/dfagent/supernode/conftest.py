"""Supernode fixtures: a real redis-server per session and a store of each kind per test.

``store_factory`` is the conformance hook: a test (or another fixture) asks it for a fresh
store of the parametrized kind. Redis stores get a unique key prefix per test, so tests share
one server without flushing it.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dfagent.supernode.peerstore.base import PeerStore
from dfagent.supernode.peerstore.memory import MemoryPeerStore
from dfagent.supernode.peerstore.redis import RedisPeerStore

from .helpers import RedisServer, start_redis, stop_process

STORE_KINDS = ("memory", "redis")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop_process(server.proc)


StoreFactory = Callable[[], PeerStore]


@pytest.fixture(params=STORE_KINDS)
def store_factory(request: pytest.FixtureRequest) -> StoreFactory:
    """Makes unopened stores of one kind; Redis ones share a prefix unique to this test (so
    several "replicas" made by one test see the same state)."""
    if request.param == "memory":
        return MemoryPeerStore
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    return lambda: RedisPeerStore(server.url, prefix=prefix, timeout=5.0)


@pytest.fixture
def tmp_config(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / f"supernode-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(text)
        return path

    return write

"""Credentials lookup, WWW-Authenticate parsing, scopes, token responses and the token cache.

The full flows (Basic, Bearer, refresh on 401) run against a real registry in test_client.py;
these are the pure parts, with a fake clock for expiry.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from nydusfs.errors import ConfigError, FormatError
from nydusfs.oci.auth import (
    ENV_PASSWORD,
    ENV_USERNAME,
    Challenge,
    Credentials,
    TokenCache,
    default_auth_files,
    find_credentials,
    merge_scopes,
    parse_challenges,
    parse_token_response,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def test_lookup_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write(home / ".docker" / "config.json",
          {"auths": {"reg.io": {"auth": b64("docker:pw1")}}})
    env: dict[str, str] = {}
    found = find_credentials("reg.io", env=env, home=home)
    assert found == Credentials("docker", "pw1", str(home / ".docker" / "config.json"))
    env = {ENV_USERNAME: "envuser", ENV_PASSWORD: "pw2"}
    found = find_credentials("reg.io", env=env, home=home)
    assert found is not None and (found.username, found.password) == ("envuser", "pw2")
    found = find_credentials("reg.io", username="me", password="pw3", env=env, home=home)
    assert found is not None and (found.username, found.password, found.source) == (
        "me", "pw3", "explicit credentials")
    assert find_credentials("other.io", env={}, home=home) is None


def test_default_files_in_order(tmp_path: Path) -> None:
    env = {"DOCKER_CONFIG": str(tmp_path / "dc"), "REGISTRY_AUTH_FILE": str(tmp_path / "r.json"),
           "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    assert default_auth_files(env, tmp_path / "home") == [
        tmp_path / "dc" / "config.json", tmp_path / "r.json",
        tmp_path / "run" / "containers" / "auth.json",
        tmp_path / "home" / ".config" / "containers" / "auth.json"]
    # an entry only in a later file is found; the first file lacks the registry
    write(tmp_path / "dc" / "config.json", {"auths": {"x.io": {"auth": b64("x:y")}}})
    write(tmp_path / "run" / "containers" / "auth.json",
          {"auths": {"reg.io": {"username": "pod", "password": "man"}}})
    found = find_credentials("reg.io", env=env, home=tmp_path / "home")
    assert found is not None and found.username == "pod"
    assert found.source.endswith("containers/auth.json")


@pytest.mark.parametrize("key", ["https://index.docker.io/v1/", "index.docker.io", "docker.io",
                                 "registry-1.docker.io"])
def test_docker_hub_keys(tmp_path: Path, key: str) -> None:
    f = write(tmp_path / "c.json", {"auths": {key: {"auth": b64("hub:secret")}}})
    found = find_credentials("docker.io", auth_file=f, env={})
    assert found is not None and (found.username, found.password) == ("hub", "secret")


def test_url_keys_and_repository_specific_entries(tmp_path: Path) -> None:
    f = write(tmp_path / "c.json", {"auths": {
        "https://127.0.0.1:5000/v2/": {"auth": b64("host:a")},
        "127.0.0.1:5000/team": {"auth": b64("team:b")},
        "127.0.0.1:5000/team/app": {"auth": b64("app:c:with:colons")},
    }})
    def user(repository: str | None) -> tuple[str, str]:
        found = find_credentials("127.0.0.1:5000", repository=repository, auth_file=f, env={})
        assert found is not None
        return found.username, found.password
    assert user(None) == ("host", "a")
    assert user("team/other") == ("team", "b")
    assert user("team/app") == ("app", "c:with:colons")


def test_entries_without_secrets_are_skipped(tmp_path: Path) -> None:
    f = write(tmp_path / "c.json", {"auths": {"reg.io": {"auth": ""},
                                              "tok.io": {"identitytoken": "x"}},
                                    "credsStore": "desktop"})
    assert find_credentials("reg.io", auth_file=f, env={}) is None
    assert find_credentials("tok.io", auth_file=f, env={}) is None


@pytest.mark.parametrize("content, message", [
    ("{not json", "invalid JSON"),
    ("[1]", "expected a JSON object"),
    ({"auths": []}, "auths: expected an object"),
    ({"auths": {"reg.io": "x"}}, "auths.reg.io: expected an object"),
    ({"auths": {"reg.io": {"auth": "!!!"}}}, "auths.reg.io.auth: not base64"),
    ({"auths": {"reg.io": {"auth": b64("nocolon")}}}, "auths.reg.io.auth: not base64"),
])
def test_broken_credential_files_name_the_file(tmp_path: Path, content: object,
                                               message: str) -> None:
    f = write(tmp_path / "c.json", content)
    with pytest.raises(ConfigError) as info:
        find_credentials("reg.io", auth_file=f, env={})
    assert str(info.value).startswith(str(f)) and message in str(info.value)


def test_missing_explicit_auth_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        find_credentials("reg.io", auth_file=tmp_path / "nope.json", env={})


def test_secrets_stay_out_of_reprs_and_descriptions() -> None:
    c = Credentials("alice", "s3cr3t", "explicit credentials")
    assert "s3cr3t" not in repr(c) and "s3cr3t" not in c.describe()
    assert c.basic() == "Basic " + b64("alice:s3cr3t")


@pytest.mark.parametrize("header, expected", [
    ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
     'scope="repository:library/python:pull"',
     [Challenge("bearer", {"realm": "https://auth.docker.io/token",
                           "service": "registry.docker.io",
                           "scope": "repository:library/python:pull"})]),
    ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
    ('bearer realm=http://x/t , service = "s\\"q"', [Challenge("bearer", {
        "realm": "http://x/t", "service": 's"q'})]),
    ('Basic realm="a", Bearer realm="b",scope="repository:x:pull,push"',
     [Challenge("basic", {"realm": "a"}),
      Challenge("bearer", {"realm": "b", "scope": "repository:x:pull,push"})]),
    ("Negotiate abc123==", [Challenge("negotiate", {})]),
    ("", []),
])
def test_parse_challenges(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


def test_merge_scopes() -> None:
    assert merge_scopes(["repository:a/b:pull", "repository:a/b:push,pull",
                         "repository:c:pull registry:catalog:*", "junk", ""]) == (
        "registry:catalog:*", "repository:a/b:pull,push", "repository:c:pull")


@pytest.mark.parametrize("body, expires", [
    (b'{"token": "abc", "expires_in": 300}', 300.0),
    (b'{"access_token": "abc"}', 60.0),
    (b'{"token": "abc", "access_token": "abc", "expires_in": 1.5, "issued_at": "x"}', 1.5),
])
def test_token_responses(body: bytes, expires: float) -> None:
    assert parse_token_response(body, "t") == ("abc", expires)


@pytest.mark.parametrize("body, message", [
    (b"<html>", "not valid JSON"),
    (b"[]", "expected a JSON object"),
    (b"{}", "no usable token"),
    (b'{"token": ""}', "no usable token"),
    (b'{"token": "a\\r\\nX-Evil: 1"}', "no usable token"),
    (b'{"token": 5}', "no usable token"),
    (b'{"token": "a", "expires_in": -1}', "expires_in"),
    (b'{"token": "a", "expires_in": "60"}', "expires_in"),
    (b'{"token": "' + b"a" * (1 << 20) + b'"}', "larger than"),
])
def test_bad_token_responses(body: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_token_response(body, "t")


def test_token_cache_expires_with_a_margin() -> None:
    now = [1000.0]
    cache = TokenCache(clock=lambda: now[0])
    cache.put(("r", "s", "repository:a:pull"), "tok", 300)
    assert cache.get(("r", "s", "repository:a:pull")) == "tok"
    assert cache.get(("r", "s", "repository:a:pull,push")) is None  # per scope
    now[0] += 269.9
    assert cache.get(("r", "s", "repository:a:pull")) == "tok"
    now[0] += 0.2  # within 30 s of expiry: treated as expired
    assert cache.get(("r", "s", "repository:a:pull")) is None
    cache.put(("k",), "t1", 10)
    cache.drop(("k",), "other")  # someone else's stale token: keep ours
    assert cache.get(("k",)) == "t1"
    cache.drop(("k",), "t1")
    assert cache.get(("k",)) is None

"""``Reference.parse``: docker's reference grammar, normalisation, and clear refusals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nydusfs.errors import ConfigError
from nydusfs.oci.reference import Reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, registry, repository, tag, digest", [
    ("python", "docker.io", "library/python", "latest", None),
    ("python:3.11", "docker.io", "library/python", "3.11", None),
    ("bitnami/redis:7", "docker.io", "bitnami/redis", "7", None),
    ("index.docker.io/library/python:3", "docker.io", "library/python", "3", None),
    ("docker.io/python", "docker.io", "library/python", "latest", None),
    ("ghcr.io/owner/image:v1.0", "ghcr.io", "owner/image", "v1.0", None),
    ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000", "a/b", "t", None),
    ("127.0.0.1:5000/a/b", "127.0.0.1:5000", "a/b", "latest", None),
    ("localhost/app", "localhost", "app", "latest", None),
    ("localhost:5000/app:x_y-z.1", "localhost:5000", "app", "x_y-z.1", None),
    ("[::1]:5000/app:t", "[::1]:5000", "app", "t", None),
    (f"host.io/a@{DIGEST}", "host.io", "a", None, DIGEST),
    (f"host.io/a:t@{DIGEST}", "host.io", "a", "t", DIGEST),
    ("reg.io/a.b/c__d/e-f---g:T", "reg.io", "a.b/c__d/e-f---g", "T", None),
])
def test_parse(text: str, registry: str, repository: str, tag: str | None,
               digest: str | None) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag,
                                                                   digest)
    assert Reference.parse(str(ref)) == ref
    assert ref.reference == (digest or tag)


@pytest.mark.parametrize("text, why", [
    ("", "empty"),
    ("Python", "lowercase"),
    ("host.io/Repo:t", "lowercase"),
    ("a b", "whitespace"),
    ("python:", "tag"),
    ("python:-x", "tag"),
    ("python:" + "t" * 129, "tag"),
    ("python@sha256:abc", "digest"),
    ("python@md5:" + "a" * 32, "digest"),
    ("python@sha256:" + "AB" * 32, "digest"),
    ("host.io/", "repository"),
    ("host.io//a", "repository"),
    ("a/-b", "repository"),
    ("a_/b", "repository"),
    ("bad_host.io:5000/a", "registry"),
    ("host.io:99999/a", "port"),
    (":tag", "repository"),
    ("host.io/" + "a" * 300, "255"),
])
def test_invalid_references_are_config_errors(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"invalid image reference") as info:
        Reference.parse(text)
    assert why in str(info.value)
    assert repr(text) in str(info.value)


def test_with_tag_drops_the_digest_and_validates() -> None:
    ref = Reference.parse(f"host.io/a:t@{DIGEST}")
    assert ref.with_tag("v2") == Reference("host.io", "a", "v2", None)
    assert str(ref.with_tag("v2")) == "host.io/a:v2"
    with pytest.raises(ConfigError):
        ref.with_tag("bad tag")
    assert ref.with_tag("x").with_digest(DIGEST).reference == DIGEST


def test_str_spells_docker_hub() -> None:
    assert str(Reference.parse("python:3.11")) == "docker.io/library/python:3.11"
    assert Reference.parse("python").name == "docker.io/library/python"


component = st.from_regex(r"[a-z0-9]{1,5}(?:[._-][a-z0-9]{1,5}){0,2}", fullmatch=True)


@given(registry=st.sampled_from(["127.0.0.1:5000", "ghcr.io", "localhost", "docker.io"]),
       parts=st.lists(component, min_size=1, max_size=3),
       tag=st.none() | st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True),
       digest=st.none() | st.just(DIGEST))
def test_round_trip(registry: str, parts: list[str], tag: str | None,
                    digest: str | None) -> None:
    repository = "/".join(parts)
    if registry == "docker.io" and len(parts) == 1:
        repository = f"library/{repository}"
    ref = Reference(registry, repository, tag if tag or digest else "latest", digest)
    assert Reference.parse(str(ref)) == ref

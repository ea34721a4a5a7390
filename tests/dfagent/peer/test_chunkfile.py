"""``nydusfs.format.chunkfile``: the chunk file and frame formats every receiver checks."""

from __future__ import annotations

import pytest

from nydusfs.errors import IntegrityError
from nydusfs.format import chunkfile

from .helpers import chunk


@pytest.mark.parametrize("compressible", [True, False], ids=["zstd", "raw"])
def test_roundtrip_and_verification(compressible: bool) -> None:
    c = chunk(70_000, compressible=compressible)
    raw = bytes.fromhex(c.digest)
    data = c.file
    assert len(data) == chunkfile.HEADER_SIZE + len(c.payload)
    assert chunkfile.unpack_verified(data, raw, len(c.data)) == c.data
    chunkfile.check_verified(memoryview(data), raw, len(c.data))  # the same checks, no result
    cf = chunkfile.unpack(data)
    assert (cf.flags, cf.uncompressed_size, cf.digest) == (c.flags, len(c.data), raw)


@pytest.mark.parametrize("compressible", [True, False], ids=["zstd", "raw"])
def test_every_kind_of_damage_is_an_integrity_error(compressible: bool) -> None:
    c = chunk(5000, compressible=compressible)
    raw = bytes.fromhex(c.digest)
    good = c.file
    other = chunk(100)
    bad = [
        good[:-1],  # truncated payload
        good[:20],  # truncated header
        b"XXXX" + good[4:],  # magic
        good[:-1] + bytes([good[-1] ^ 1]),  # payload bit flip
        good[:8] + (len(c.data) + 1).to_bytes(4, "little") + good[12:],  # size lie
        good[:5] + b"\x02" + good[6:],  # unknown flag
        other.file,  # another chunk entirely
    ]
    for data in bad:
        with pytest.raises(IntegrityError):
            chunkfile.unpack_verified(data, raw)
        with pytest.raises(IntegrityError):
            chunkfile.check_verified(memoryview(data), raw)
    for check in (chunkfile.unpack_verified, chunkfile.check_verified):
        with pytest.raises(IntegrityError):
            check(good, raw, len(c.data) + 1)  # not the size asked for


def test_frames() -> None:
    a, b = chunk(100), chunk(200)
    body = (chunkfile.pack_frame(bytes.fromhex(a.digest), chunkfile.FRAME_FOUND, a.file)
            + chunkfile.pack_frame(bytes.fromhex(b.digest), chunkfile.FRAME_NOT_FOUND))
    frames = list(chunkfile.iter_frames(body))
    assert [f.digest.hex() for f in frames] == [a.digest, b.digest]
    assert frames[0].status == chunkfile.FRAME_FOUND and bytes(frames[0].body) == a.file
    assert frames[1].status == chunkfile.FRAME_NOT_FOUND and frames[1].message == ""
    with pytest.raises(IntegrityError):
        list(chunkfile.iter_frames(body[:-1] + body[-1:] + b"\x00"))  # trailing garbage
    with pytest.raises(IntegrityError):
        list(chunkfile.iter_frames(body[:50]))

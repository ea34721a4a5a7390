"""The chunk codec: encode/decode round trips, and decode refusing anything but the named bytes."""

from __future__ import annotations

import random
import threading
import tracemalloc

import blake3
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from nydusfs.errors import FormatError, IntegrityError
from nydusfs.format.chunk import chunk_digest, decode, encode
from nydusfs.format.layout import CHUNK_FLAG_ZSTD, MAX_CHUNK_SIZE

MiB = 1 << 20


def _samples() -> dict[str, bytes]:
    rng = random.Random(1234)
    return {
        "empty": b"",
        "one_byte": b"x",
        "zeros_1MiB": bytes(MiB),
        "text": b"".join(b"line %d of a very compressible file\n" % i for i in range(20_000)),
        "random_4KiB": rng.randbytes(4096),
        "random_1MiB": rng.randbytes(MiB),
        "half_random": rng.randbytes(32 * 1024) + bytes(32 * 1024),
    }


SAMPLES = _samples()


def test_chunk_digest_is_blake3_256() -> None:
    # Known-answer test from the BLAKE3 spec: the digest of the empty input.
    assert chunk_digest(b"").hex() == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    )
    data = SAMPLES["text"]
    assert chunk_digest(data) == blake3.blake3(data).digest()
    assert chunk_digest(memoryview(data)) == chunk_digest(bytearray(data)) == chunk_digest(data)
    assert len(chunk_digest(data)) == 32


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("level", [None, 1, 3, 19])
def test_round_trip(name: str, level: int | None) -> None:
    data = SAMPLES[name]
    payload, flags = encode(data, level)
    assert flags in (0, CHUNK_FLAG_ZSTD)
    if flags == 0:
        assert payload == data
    else:
        assert len(payload) < len(data)
    assert decode(payload, flags, len(data), chunk_digest(data)) == data
    # memoryview payloads decode the same way (readers hand over slices of an mmap).
    assert decode(memoryview(payload), flags, len(data), chunk_digest(data)) == data


def test_memoryview_input_encodes_like_bytes() -> None:
    data = SAMPLES["text"]
    assert encode(memoryview(data)) == encode(data)


@pytest.mark.parametrize("name", ["zeros_1MiB", "text", "half_random"])
def test_compressible_data_is_compressed(name: str) -> None:
    data = SAMPLES[name]
    payload, flags = encode(data)
    assert flags == CHUNK_FLAG_ZSTD
    assert len(payload) < len(data)
    assert zstandard.ZstdDecompressor().decompress(payload) == data


@pytest.mark.parametrize("name", ["random_4KiB", "random_1MiB", "one_byte"])
@pytest.mark.parametrize("level", [1, 3, 19])
def test_incompressible_data_is_stored_raw(name: str, level: int) -> None:
    data = SAMPLES[name]
    payload, flags = encode(data, level)
    assert flags == 0
    assert payload == data
    assert type(payload) is bytes


def test_level_none_stores_raw_even_when_compressible() -> None:
    data = SAMPLES["zeros_1MiB"]
    payload, flags = encode(data, None)
    assert (payload, flags) == (data, 0)


def test_empty_chunk_is_raw() -> None:
    assert encode(b"") == (b"", 0)
    assert decode(b"", 0, 0, chunk_digest(b"")) == b""


def test_encode_is_deterministic() -> None:
    data = SAMPLES["text"]
    assert encode(data) == encode(bytes(data))


# ---- decode refuses bad input -------------------------------------------------------------


@pytest.mark.parametrize("name", ["text", "random_4KiB"])
def test_wrong_digest(name: str) -> None:
    data = SAMPLES[name]
    payload, flags = encode(data)
    good = chunk_digest(data)
    for bad in (bytes(32), good[:-1] + bytes([good[-1] ^ 1]), chunk_digest(data + b"x")):
        with pytest.raises(IntegrityError, match="digest mismatch"):
            decode(payload, flags, len(data), bad)


def test_raw_payload_with_one_flipped_byte() -> None:
    data = SAMPLES["random_4KiB"]
    bad = bytearray(data)
    bad[1234] ^= 0x40
    with pytest.raises(IntegrityError):
        decode(bytes(bad), 0, len(data), chunk_digest(data))


def test_raw_payload_of_wrong_size() -> None:
    data = SAMPLES["random_4KiB"]
    with pytest.raises(IntegrityError, match="expected"):
        decode(data[:-1], 0, len(data), chunk_digest(data))
    with pytest.raises(IntegrityError, match="expected"):
        decode(data + b"\x00", 0, len(data), chunk_digest(data))


def test_truncated_frame() -> None:
    data = SAMPLES["text"]
    payload, flags = encode(data)
    assert flags == CHUNK_FLAG_ZSTD
    digest = chunk_digest(data)
    for cut in sorted({0, 1, 4, 5, 12, len(payload) // 2, len(payload) - 1}):
        with pytest.raises(IntegrityError):
            decode(payload[:cut], flags, len(data), digest)


def test_zstd_bomb_is_refused() -> None:
    # 16 MiB of zeros compress to a few hundred bytes; the record claims 100 bytes.
    zeros = bytes(16 * MiB)
    bomb = zstandard.ZstdCompressor(level=3).compress(zeros)
    assert len(bomb) < 4096
    with pytest.raises(IntegrityError):
        decode(bomb, CHUNK_FLAG_ZSTD, 100, chunk_digest(zeros[:100]))
    with pytest.raises(IntegrityError):
        decode(bomb, CHUNK_FLAG_ZSTD, 100, chunk_digest(zeros))


# Regression (nydusfs/format/chunk.py, decode): python-zstandard ignores ``max_output_size``
# when the frame header declares a content size and allocates (and fills) the *declared* size;
# ``max_output_size=0`` means "no limit". decode() must compare the declared size with the
# chunk record before decompressing, so a small payload can never cost more memory than the
# record allows.
@pytest.mark.parametrize("claimed", [0, 100])
def test_zstd_bomb_does_not_allocate_the_declared_size(claimed: int) -> None:
    zeros = bytes(64 * MiB)
    bomb = zstandard.ZstdCompressor(level=3).compress(zeros)
    del zeros
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError):
            decode(bomb, CHUNK_FLAG_ZSTD, claimed, bytes(32))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, f"decode allocated {peak / MiB:.0f} MiB for a {claimed}-byte chunk"


# Regression (same cause): a 14-byte frame header declaring 2**56 bytes made decode() raise
# MemoryError instead of IntegrityError, whatever uncompressed_size said.
@pytest.mark.parametrize("claimed", [0, 1, 100, MAX_CHUNK_SIZE])
def test_huge_declared_content_size_is_an_integrity_error(claimed: int) -> None:
    header_only = b"\x28\xb5\x2f\xfd\xf5" + bytes(8) + b"\x01"
    assert zstandard.frame_content_size(header_only) == 2**56
    with pytest.raises(IntegrityError, match="declares"):
        decode(header_only, CHUNK_FLAG_ZSTD, claimed, bytes(32))


def test_empty_zstd_frame_decodes_to_the_empty_chunk() -> None:
    # Size 0 is the one size zstd treats as "unlimited": it must not be passed through.
    frame = zstandard.ZstdCompressor().compress(b"")
    assert zstandard.frame_content_size(frame) == 0
    assert decode(frame, CHUNK_FLAG_ZSTD, 0, chunk_digest(b"")) == b""
    with pytest.raises(IntegrityError, match="digest mismatch"):
        decode(frame, CHUNK_FLAG_ZSTD, 0, chunk_digest(b"x"))
    with pytest.raises(IntegrityError):
        decode(frame, CHUNK_FLAG_ZSTD, 1, chunk_digest(b"x"))


def test_zstd_bomb_without_content_size_is_refused() -> None:
    # A streamed frame does not declare its size up front: the output bound must still hold.
    zeros = bytes(16 * MiB)
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    bomb = cobj.compress(zeros) + cobj.flush()
    assert zstandard.frame_content_size(bomb) == -1  # unknown
    del zeros
    tracemalloc.start()
    try:
        for claimed in (100, 0):  # 0: must not mean "unlimited" to zstandard
            with pytest.raises(IntegrityError):
                decode(bomb, CHUNK_FLAG_ZSTD, claimed, chunk_digest(bytes(100)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, f"decode allocated {peak / MiB:.0f} MiB for a small chunk"


def test_frame_without_content_size_decodes() -> None:
    data = SAMPLES["text"]
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    frame = cobj.compress(data) + cobj.flush()
    assert decode(frame, CHUNK_FLAG_ZSTD, len(data), chunk_digest(data)) == data


def test_claimed_size_differs_from_frame_content() -> None:
    data = SAMPLES["text"]
    payload, flags = encode(data)
    digest = chunk_digest(data)
    for claimed in (len(data) - 1, len(data) + 1, 1, 0):
        with pytest.raises(IntegrityError, match="declares"):  # refused before decompressing
            decode(payload, flags, claimed, digest)


def test_claimed_size_above_the_limit() -> None:
    data = SAMPLES["zeros_1MiB"]
    payload, flags = encode(data)
    with pytest.raises(IntegrityError, match="exceeds the limit"):
        decode(payload, flags, MAX_CHUNK_SIZE + 1, chunk_digest(data))
    with pytest.raises(IntegrityError, match="exceeds the limit"):
        decode(data, 0, 2**64 - 1, chunk_digest(data))
    for negative in (-1, -(2**63)):
        with pytest.raises(IntegrityError, match="exceeds the limit"):
            decode(payload, flags, negative, chunk_digest(data))


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00", b"not a zstd frame at all", b"\x28\xb5\x2f\xfd", b"\x28\xb5\x2f\xfd" + bytes(60),
     random.Random(7).randbytes(4096)],
    ids=["empty", "nul", "text", "magic_only", "magic_zeros", "random"],
)
def test_garbage_flagged_as_zstd(garbage: bytes) -> None:
    with pytest.raises(IntegrityError):
        decode(garbage, CHUNK_FLAG_ZSTD, 100, chunk_digest(bytes(100)))


def test_raw_bytes_flagged_as_zstd() -> None:
    data = SAMPLES["random_4KiB"]
    with pytest.raises(IntegrityError):
        decode(data, CHUNK_FLAG_ZSTD, len(data), chunk_digest(data))


def test_zstd_frame_flagged_as_raw() -> None:
    data = SAMPLES["text"]
    payload, _ = encode(data)
    with pytest.raises(IntegrityError):
        decode(payload, 0, len(data), chunk_digest(data))
    with pytest.raises(IntegrityError):
        decode(payload, 0, len(payload), chunk_digest(data))


def test_integrity_error_is_a_format_error() -> None:
    assert issubclass(IntegrityError, FormatError)


def test_codec_is_thread_safe() -> None:
    """Per-thread zstd contexts: concurrent encode/decode never mixes up outputs."""
    inputs = [random.Random(i).randbytes(20_000) + bytes(40_000) for i in range(8)]
    errors: list[BaseException] = []

    def work(data: bytes) -> None:
        try:
            digest = chunk_digest(data)
            for level in (1, 3, 1, 9) * 5:
                payload, flags = encode(data, level)
                assert flags == CHUNK_FLAG_ZSTD
                assert decode(payload, flags, len(data), digest) == data
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(d,)) for d in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ---- properties ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=70_000), level=st.sampled_from([None, 1, 3, 9]))
def test_round_trip_property(data: bytes, level: int | None) -> None:
    payload, flags = encode(data, level)
    assert len(payload) <= len(data)
    assert decode(payload, flags, len(data), chunk_digest(data)) == data


@settings(max_examples=300, deadline=None)
@given(
    payload=st.one_of(
        st.binary(max_size=2048),
        st.binary(max_size=2048).map(lambda b: b"\x28\xb5\x2f\xfd" + b),
    ),
    flags=st.sampled_from([0, CHUNK_FLAG_ZSTD]),
    size=st.one_of(st.integers(0, 4096), st.sampled_from([MAX_CHUNK_SIZE, MAX_CHUNK_SIZE + 1])),
    digest=st.binary(min_size=32, max_size=32),
)
def test_decode_only_raises_integrity_error(
    payload: bytes, flags: int, size: int, digest: bytes
) -> None:
    try:
        out = decode(payload, flags, size, digest)
    except IntegrityError:
        return
    # Accepting is only right when the output really is the named bytes.
    assert len(out) == size
    assert chunk_digest(out) == digest


@settings(max_examples=100, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=20_000), pos=st.integers(min_value=0), bit=st.integers(0, 7)
)
def test_any_single_bit_flip_is_detected(data: bytes, pos: int, bit: int) -> None:
    payload, flags = encode(data + bytes(len(data)))  # compressible: mostly a zstd frame
    original = data + bytes(len(data))
    bad = bytearray(payload)
    bad[pos % len(bad)] ^= 1 << bit
    try:
        out = decode(bytes(bad), flags, len(original), chunk_digest(original))
    except IntegrityError:
        return
    # A flip in a part zstd ignores (e.g. an unused header bit) may still decode correctly.
    assert out == original

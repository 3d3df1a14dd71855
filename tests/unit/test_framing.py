"""Length-prefix framing codec: round trips over any chunking, typed errors on bad input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vstack.execution.stacks.framing import (
    DEFAULT_MAX_LEN,
    Decoder,
    FrameDecodeError,
    FrameEncodeError,
    FrameLengthError,
    FrameTruncatedError,
    encode,
    encode_into,
)

datagrams = st.lists(st.binary(max_size=300), max_size=40)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the (sorted, deduplicated) cut points."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


@settings(max_examples=200, deadline=None)
@given(dgs=datagrams, cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=60),
       prefix=st.sampled_from([2, 4]))
def test_round_trip_any_chunking(dgs: list[bytes], cuts: list[int], prefix: int) -> None:
    stream = b"".join(encode(d, prefix) for d in dgs)
    dec = Decoder(prefix)
    got: list[bytes] = []
    for chunk in chunked(stream, cuts):
        got.extend(dec.feed(chunk))
    assert got == dgs
    assert dec.pending == 0
    assert dec.frames == len(dgs)
    dec.eof()  # at a frame boundary: no error


@settings(max_examples=100, deadline=None)
@given(dgs=st.lists(st.binary(max_size=50), min_size=1, max_size=10))
def test_byte_at_a_time(dgs: list[bytes]) -> None:
    stream = b"".join(encode(d) for d in dgs)
    dec = Decoder()
    got = [d for i in range(len(stream)) for d in dec.feed(stream[i:i + 1])]
    assert got == dgs


def test_encode_into_appends_and_matches_encode() -> None:
    buf = bytearray(b"xx")
    assert encode_into(buf, b"abc", 4) == 7
    assert bytes(buf) == b"xx" + b"\x00\x00\x00\x03abc"
    assert encode(memoryview(b"hello")) == b"\x00\x05hello"
    assert encode(b"") == b"\x00\x00"


def test_oversized_datagram_is_a_local_error() -> None:
    with pytest.raises(FrameEncodeError) as ei:
        encode(b"x" * (DEFAULT_MAX_LEN + 1))
    assert ei.value.length == DEFAULT_MAX_LEN + 1
    assert not isinstance(ei.value, FrameDecodeError)
    with pytest.raises(FrameEncodeError):
        encode(b"x" * 11, max_len=10)


def test_bad_parameters_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="prefix"):
        Decoder(3)
    with pytest.raises(ValueError, match="max_len"):
        Decoder(2, 70_000)
    with pytest.raises(ValueError, match="prefix"):
        encode(b"x", 1)


@settings(max_examples=100, deadline=None)
@given(good=datagrams, bad=st.integers(min_value=1001, max_value=0xFFFF),
       tail=st.binary(max_size=20), split=st.integers(min_value=0, max_value=5000))
def test_garbage_length_is_a_typed_remote_error(good: list[bytes], bad: int, tail: bytes,
                                                split: int) -> None:
    """Good frames before a bad length are delivered; then FrameLengthError, for ever."""
    good = [g[:1000] for g in good]
    head = b"".join(encode(d, max_len=1000) for d in good)
    stream = head + bad.to_bytes(2, "big") + tail
    dec = Decoder(2, max_len=1000)
    got: list[bytes] = []
    with pytest.raises(FrameLengthError) as ei:
        for chunk in chunked(stream, [split]):
            got.extend(dec.feed(chunk))
    assert got == good
    assert ei.value.length == bad
    assert ei.value.offset == len(head)
    assert isinstance(ei.value, FrameDecodeError)
    assert dec.failed
    with pytest.raises(FrameLengthError):
        list(dec.feed(encode(b"ok")))


def test_four_byte_prefix_oversize() -> None:
    dec = Decoder(4)
    with pytest.raises(FrameLengthError):
        list(dec.feed(b"\xff\xff\xff\xff"))


@settings(max_examples=100, deadline=None)
@given(dgs=datagrams, extra=st.binary(min_size=1, max_size=200))
def test_eof_inside_a_frame(dgs: list[bytes], extra: bytes) -> None:
    whole = encode(extra + b"!")  # at least 3 bytes; any strict prefix is truncated
    stream = b"".join(encode(d) for d in dgs) + whole[:len(extra) % (len(whole) - 1) + 1]
    dec = Decoder()
    assert list(dec.feed(stream)) == dgs
    with pytest.raises(FrameTruncatedError) as ei:
        dec.eof()
    assert ei.value.pending == dec.pending > 0


def test_random_bytes_raise_only_decode_errors() -> None:
    """Arbitrary input either decodes or raises FrameDecodeError (nothing else)."""

    @settings(max_examples=200, deadline=None)
    @given(data=st.binary(max_size=400), max_len=st.integers(min_value=0, max_value=500))
    def check(data: bytes, max_len: int) -> None:
        dec = Decoder(2, max_len)
        try:
            for d in dec.feed(data):
                assert len(d) <= max_len
            dec.eof()
        except FrameDecodeError:
            pass

    check()

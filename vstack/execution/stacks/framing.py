"""Length-prefix framing of datagrams on a byte stream (sans-IO).

The TCP-framed and MPTCP stacks carry each application datagram as one *frame*::

    +----------------------------+------------------------+
    | length (2 or 4 bytes, BE)  | datagram (length bytes)|
    +----------------------------+------------------------+

The length is an unsigned big-endian integer giving the datagram's size in bytes, without
the prefix. Empty datagrams are allowed (length 0). A length above ``max_len`` (default
65 527, the largest UDP payload an IPv6 packet without jumbograms carries) is a framing
error: the stream cannot be resynchronised after it, so the decoder refuses everything that
follows.

This module only turns datagrams into bytes and bytes into datagrams: it never touches a
socket or a clock. ``Decoder.feed`` takes any chunking of the stream (one byte at a time,
a frame and a half, many frames at once) and yields exactly the datagrams that were
encoded, in order.

Errors keep local and remote apart:

* ``FrameEncodeError`` - *local*: the application gave a datagram too big to frame.
* ``FrameDecodeError`` - *remote*: the peer sent a length above ``max_len``
  (``FrameLengthError``), or closed the stream in the middle of a frame
  (``FrameTruncatedError``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

#: the largest UDP payload: 65 535 - 8 (UDP header); IPv4's is 20 bytes smaller
DEFAULT_MAX_LEN = 65_527
PREFIX_SIZES = (2, 4)
_LIMIT = {2: 0xFFFF, 4: 0xFFFF_FFFF}
_STRUCT = {2: struct.Struct(">H"), 4: struct.Struct(">I")}


class FramingError(Exception):
    """Base of the framing errors."""


class FrameEncodeError(FramingError, ValueError):
    """Local: a datagram that cannot be framed (longer than ``max_len``)."""

    def __init__(self, length: int, max_len: int) -> None:
        super().__init__(f"datagram of {length} bytes exceeds the frame limit of {max_len}")
        self.length = length
        self.max_len = max_len


class FrameDecodeError(FramingError):
    """Remote: the byte stream from the peer is not a valid frame sequence."""


class FrameLengthError(FrameDecodeError):
    """The peer announced a frame longer than ``max_len`` (garbage or a wrong prefix size)."""

    def __init__(self, length: int, max_len: int, offset: int) -> None:
        super().__init__(f"frame length {length} at stream offset {offset} exceeds the "
                         f"limit of {max_len}")
        self.length = length
        self.max_len = max_len
        self.offset = offset


class FrameTruncatedError(FrameDecodeError):
    """The stream ended inside a frame (``Decoder.eof``)."""

    def __init__(self, pending: int) -> None:
        super().__init__(f"stream ended inside a frame ({pending} bytes pending)")
        self.pending = pending


def check_params(prefix: int, max_len: int) -> None:
    """Raise ``ValueError`` naming the bad parameter (configuration errors)."""
    if prefix not in PREFIX_SIZES:
        raise ValueError(f"prefix: must be 2 or 4 (bytes), got {prefix!r}")
    if not 0 <= max_len <= _LIMIT[prefix]:
        raise ValueError(f"max_len: must be 0..{_LIMIT[prefix]} for a {prefix}-byte prefix, "
                         f"got {max_len!r}")


def encode(datagram: bytes | bytearray | memoryview, prefix: int = 2,
           max_len: int = DEFAULT_MAX_LEN) -> bytes:
    """One frame: the length prefix followed by the datagram."""
    out = bytearray()
    encode_into(out, datagram, prefix, max_len)
    return bytes(out)


def encode_into(out: bytearray, datagram: bytes | bytearray | memoryview, prefix: int = 2,
                max_len: int = DEFAULT_MAX_LEN) -> int:
    """Append one frame to ``out``; returns the number of bytes appended."""
    n = len(datagram)
    st = _STRUCT.get(prefix)
    if st is None:
        raise ValueError(f"prefix: must be 2 or 4 (bytes), got {prefix!r}")
    if n > max_len or n > _LIMIT[prefix]:
        raise FrameEncodeError(n, min(max_len, _LIMIT[prefix]))
    out += st.pack(n)
    out += datagram
    return prefix + n


class Decoder:
    """Incremental frame decoder: ``for d in dec.feed(chunk): ...``.

    ``feed`` yields every datagram completed by ``chunk`` (datagrams before a bad length
    are still yielded) and then raises ``FrameLengthError`` at the first bad length; after
    that the decoder is *failed* and every later ``feed`` raises the same error. ``eof()``
    says whether the stream ended cleanly at a frame boundary.
    """

    __slots__ = ("_buf", "_consumed", "_error", "_pos", "frames", "max_len", "prefix")

    def __init__(self, prefix: int = 2, max_len: int = DEFAULT_MAX_LEN) -> None:
        check_params(prefix, max_len)
        self.prefix = prefix
        self.max_len = max_len
        self._buf = bytearray()
        self._pos = 0  # start of the first undecoded byte in _buf
        self._consumed = 0  # stream offset of _buf[0]
        self._error: FrameDecodeError | None = None
        self.frames = 0  # datagrams decoded so far

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf) - self._pos

    @property
    def failed(self) -> bool:
        return self._error is not None

    def feed(self, chunk: bytes | bytearray | memoryview) -> Iterator[bytes]:
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += chunk
        return self._drain()

    def _drain(self) -> Iterator[bytes]:
        # state lives on self (not in locals), so interleaved or abandoned generators
        # still see a consistent buffer
        buf = self._buf
        prefix = self.prefix
        unpack = _STRUCT[prefix].unpack_from
        max_len = self.max_len
        try:
            while True:
                pos = self._pos
                if len(buf) - pos < prefix:
                    break
                n = unpack(buf, pos)[0]
                if n > max_len:
                    self._error = FrameLengthError(n, max_len, self._consumed + pos)
                    raise self._error
                stop = pos + prefix + n
                if stop > len(buf):
                    break
                self._pos = stop
                self.frames += 1
                yield bytes(buf[pos + prefix:stop])
        finally:
            # drop what is decoded; bytearray deletes from the front in O(1) amortised
            if self._pos:
                del buf[:self._pos]
                self._consumed += self._pos
                self._pos = 0

    def eof(self) -> None:
        """The stream ended: raise ``FrameTruncatedError`` unless at a frame boundary."""
        if self._error is not None:
            raise self._error
        if self.pending:
            self._error = FrameTruncatedError(self.pending)
            raise self._error

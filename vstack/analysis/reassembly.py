"""IP fragment reassembly, IPv4 (RFC 791 s3.2, RFC 815) and IPv6 (RFC 8200 s4.5), sans-IO.

``Reassembler.push(packet, now)`` takes one fragment (bytes) and returns ``None`` while the
datagram is incomplete, or a :class:`Reassembled` with the whole datagram as one
unfragmented IP packet and the original fragments (in arrival order) once the last hole is
filled. ``expire(now)`` drops the datagrams older than ``timeout``. No sockets, no clocks:
the caller passes ``now``.

The reassembled packet:

* IPv4: the first fragment's header (options included) with the total length set, MF and
  the offset cleared (DF kept), the header checksum recomputed;
* IPv6: the first fragment's unfragmentable part (the header and the extension headers
  before the Fragment header) with the Fragment header removed, its Next Header put in the
  field that pointed to it, the payload length set.

Bad input never raises anything but :class:`FragmentError` (a packet that is not a
fragment, or a malformed one); everything else is handled and counted:

* **duplicates** (same offset, same bytes) are ignored (``duplicates``);
* **overlaps** (any other overlap, RFC 5722 for IPv6; Linux does the same for IPv4 since
  4.19): the whole datagram is dropped (``overlaps``);
* **oversized** (ending past 65535 bytes, more than ``max_fragments`` fragments, or data
  past the end a last fragment set, or two different ends): dropped (``oversized``);
* **timeouts**: a datagram not complete ``timeout`` seconds after its first fragment is
  dropped (``timeouts``);
* **memory**: at most ``max_datagrams`` datagrams and ``max_bytes`` buffered bytes; beyond
  either, the oldest datagram is dropped (``evicted``).

``dropped_fragments`` counts every fragment thrown away with its datagram.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field

DEFAULT_TIMEOUT_S = 30.0  # Linux's ipfrag_time; RFC 8200 s4.5 says 60 s at most
DEFAULT_MAX_DATAGRAMS = 256
DEFAULT_MAX_BYTES = 4 << 20
DEFAULT_MAX_FRAGMENTS = 128  # per datagram
MAX_IP = 65535  # IPv4 total length / IPv6 payload length

FRAGMENT_HDR = 44
# IPv6 extension headers that may precede the Fragment header (RFC 8200 s4.1), with the
# unit of their length field: 8 bytes (hdr ext len + 1), AH: 4 bytes (payload len + 2)
_EXT8 = frozenset({0, 43, 60, 135, 139, 140})
_AH = 51


class FragmentError(ValueError):
    """Not a fragment, or a malformed one (counted and dropped by the caller)."""


@dataclass(frozen=True, slots=True)
class Reassembled:
    packet: bytes  # the whole datagram as one unfragmented IP packet
    fragments: tuple[bytes, ...]  # the fragments it was made of, in arrival order


@dataclass(slots=True)
class _Datagram:
    first_seen: float
    head: bytes = b""  # IPv4 header / IPv6 unfragmentable part (from offset 0)
    nh_pos: int = -1  # IPv6: where the Next Header that names the Fragment header sits
    next_header: int = 0  # IPv6: the Fragment header's Next Header
    end: int = -1  # data length, known once the last fragment (MF=0) came
    parts: dict[int, bytes] = field(default_factory=dict)  # offset -> data
    packets: list[bytes] = field(default_factory=list)
    size: int = 0  # bytes buffered (the packets)


@dataclass(slots=True)
class ReassemblyStats:
    fragments: int = 0
    reassembled: int = 0
    duplicates: int = 0
    overlaps: int = 0
    oversized: int = 0
    timeouts: int = 0
    evicted: int = 0
    malformed: int = 0
    dropped_fragments: int = 0


_Key = tuple[int, bytes, bytes, int, int]  # family, src, dst, protocol (IPv4), ident


class Reassembler:
    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_datagrams: int = DEFAULT_MAX_DATAGRAMS,
                 max_bytes: int = DEFAULT_MAX_BYTES,
                 max_fragments: int = DEFAULT_MAX_FRAGMENTS) -> None:
        if timeout <= 0 or max_datagrams < 1 or max_bytes < 1 or max_fragments < 2:
            raise ValueError("reassembly limits must be positive (max_fragments >= 2)")
        self.timeout = timeout
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.max_fragments = max_fragments
        self.stats = ReassemblyStats()
        self._q: OrderedDict[_Key, _Datagram] = OrderedDict()  # oldest first
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._q)

    @property
    def buffered(self) -> int:
        return self._bytes

    # ------------------------------------------------------------------ input
    def push(self, packet: bytes, now: float) -> Reassembled | None:
        """One fragment; the reassembled datagram when it completes one."""
        self.expire(now)
        try:
            key, offset, more, data, head, nh_pos, nxt = _fragment_info(packet)
        except FragmentError:
            self.stats.malformed += 1
            raise
        self.stats.fragments += 1
        d = self._q.get(key)
        if d is None:
            d = self._q[key] = _Datagram(now)
        end = offset + len(data)
        old = d.parts.get(offset)
        if old is not None and old == data:
            self.stats.duplicates += 1
            return None
        if (end > _limit(key[0], head) or len(d.parts) >= self.max_fragments
                or (more and d.end >= 0 and end > d.end)
                or (not more and d.end >= 0 and end != d.end)
                or (not more and any(o + len(p) > end for o, p in d.parts.items()))):
            self.stats.oversized += 1
            self._drop(key, extra=1)
            return None
        for o, p in d.parts.items():
            if o < end and offset < o + len(p):
                self.stats.overlaps += 1
                self._drop(key, extra=1)
                return None
        d.parts[offset] = data
        d.packets.append(packet)
        d.size += len(packet)
        self._bytes += len(packet)
        if not more:
            d.end = end
        if offset == 0:
            d.head, d.nh_pos, d.next_header = head, nh_pos, nxt
        done = self._complete(key, d)
        if done is not None:
            return done
        self._bound()
        return None

    def expire(self, now: float) -> int:
        """Drop the datagrams whose first fragment came ``timeout`` or more ago."""
        n = 0
        while self._q:
            key, d = next(iter(self._q.items()))
            if now - d.first_seen < self.timeout:
                break
            self.stats.timeouts += 1
            self._drop(key)
            n += 1
        return n

    def clear(self) -> None:
        for key in list(self._q):
            self._drop(key)

    # ------------------------------------------------------------------ internals
    def _complete(self, key: _Key, d: _Datagram) -> Reassembled | None:
        if d.end < 0 or not d.head:
            return None
        have = 0
        for o in sorted(d.parts):
            if o != have:
                return None  # a hole (no overlaps exist: o > have)
            have += len(d.parts[o])
        if have != d.end:
            return None
        if d.end > _limit(key[0], d.head):  # the first fragment's header is the longest
            self.stats.oversized += 1
            self._drop(key)
            return None
        data = b"".join(d.parts[o] for o in sorted(d.parts))
        del self._q[key]
        self._bytes -= d.size
        self.stats.reassembled += 1
        if key[0] == 4:
            h = bytearray(d.head)
            struct.pack_into("!H", h, 2, len(h) + len(data))
            h[6] &= 0x40  # keep DF; clear MF and the offset
            h[7] = 0
            h[10] = h[11] = 0
            struct.pack_into("!H", h, 10, _checksum(h))
            pkt = bytes(h) + data
        else:
            h = bytearray(d.head)
            h[d.nh_pos] = d.next_header
            struct.pack_into("!H", h, 4, len(h) - 40 + len(data))
            pkt = bytes(h) + data
        return Reassembled(pkt, tuple(d.packets))

    def _bound(self) -> None:
        while len(self._q) > self.max_datagrams or self._bytes > self.max_bytes:
            key = next(iter(self._q))
            self.stats.evicted += 1
            self._drop(key)

    def _drop(self, key: _Key, extra: int = 0) -> None:
        d = self._q.pop(key, None)
        n = extra
        if d is not None:
            self._bytes -= d.size
            n += len(d.packets)
        self.stats.dropped_fragments += n


def _fragment_info(pkt: bytes) -> tuple[_Key, int, bool, bytes, bytes, int, int]:
    """(key, offset, more fragments, data, head, IPv6 next-header position, IPv6 next
    header) of one fragment; FragmentError if it is not one or is malformed."""
    n = len(pkt)
    if n < 1:
        raise FragmentError("empty packet")
    v = pkt[0] >> 4
    if v == 4:
        if n < 20:
            raise FragmentError(f"IPv4 header truncated ({n} < 20 bytes)")
        ihl = (pkt[0] & 0x0F) * 4
        total = pkt[2] << 8 | pkt[3]
        if ihl < 20 or total < ihl or total > n:
            raise FragmentError(f"bad IPv4 lengths (header {ihl}, total {total}, {n} read)")
        ff = pkt[6] << 8 | pkt[7]
        more = bool(ff & 0x2000)
        offset = (ff & 0x1FFF) * 8
        if not more and offset == 0:
            raise FragmentError("not a fragment")
        data = pkt[ihl:total]
        if more and len(data) % 8:
            raise FragmentError(f"IPv4 fragment of {len(data)} bytes, not a multiple of 8")
        if more and not data:
            raise FragmentError("empty IPv4 fragment")
        key = (4, pkt[12:16], pkt[16:20], pkt[9], pkt[4] << 8 | pkt[5])
        return key, offset, more, data, pkt[:ihl], -1, 0
    if v == 6:
        if n < 40:
            raise FragmentError(f"IPv6 header truncated ({n} < 40 bytes)")
        total = 40 + (pkt[4] << 8 | pkt[5])
        if total > n or total == 40:
            raise FragmentError(f"bad IPv6 payload length ({total - 40}, {n} read)")
        nh, off, nh_pos = pkt[6], 40, 6
        while nh != FRAGMENT_HDR:
            if nh not in _EXT8 and nh != _AH:
                raise FragmentError("not a fragment (no IPv6 Fragment header)")
            if off + 8 > total:
                raise FragmentError(f"IPv6 extension header {nh} truncated at {off}")
            length = (pkt[off + 1] + 2) * 4 if nh == _AH else (pkt[off + 1] + 1) * 8
            nh_pos = off  # this header's Next Header field
            nh = pkt[off]
            off += length
        if off + 8 > total:
            raise FragmentError(f"IPv6 fragment header truncated at {off}")
        nxt = pkt[off]
        fo = pkt[off + 2] << 8 | pkt[off + 3]
        offset = fo & 0xFFF8
        more = bool(fo & 1)
        data = pkt[off + 8:total]
        if more and (not data or len(data) % 8):
            raise FragmentError(f"IPv6 fragment of {len(data)} bytes, not a multiple of 8")
        key = (6, pkt[8:24], pkt[24:40], 0, int.from_bytes(pkt[off + 4:off + 8], "big"))
        return key, offset, more, data, pkt[:off], nh_pos, nxt
    raise FragmentError(f"IP version {v}")


def _limit(family: int, head: bytes) -> int:
    """The most data a datagram with this header / unfragmentable part may carry."""
    return MAX_IP - (len(head) if family == 4 else len(head) - 40)


def _checksum(b: bytes | bytearray) -> int:
    if len(b) % 2:
        b = bytes(b) + b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

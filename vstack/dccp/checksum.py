"""DCCP checksum (RFC 4340 §9) with partial coverage (CsCov, §9.2), sans-IO.

The checksum is the 16-bit one's complement of the one's complement sum of a pseudo-header
(§9.1: IPv4 per RFC 793, IPv6 per RFC 2460 §8.1, next header 33) and the first
``coverage`` bytes of the DCCP packet, where coverage is (§9.2):

- CsCov = 0: the whole packet (header, options and application data);
- CsCov = 1..15: the header and options plus (CsCov - 1) * 4 bytes of application data,
  that is ``(Data Offset + CsCov - 1) * 4`` bytes.

The pseudo-header's length field is the length of the *whole* DCCP packet, not the coverage
(Linux fixed exactly this bug when it added partial checksums; tcpdump agrees).

The one's complement sum is computed with one ``int.from_bytes`` per region: since
2**16 == 1 (mod 0xFFFF), the big-endian integer of a byte string is congruent to the sum of
its 16-bit words modulo 0xFFFF, which is the end-around-carry sum. That keeps the hot path in C.
"""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache

IPPROTO_DCCP = 33

Address = str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = [
    "IPPROTO_DCCP",
    "Address",
    "address_bytes",
    "check",
    "checksum_coverage",
    "compute_checksum",
    "internet_checksum",
    "pseudo_header",
    "pseudo_sum",
]


def address_bytes(addr: Address) -> bytes:
    """Packed 4- or 16-byte form of an IPv4/IPv6 address given as str, bytes or ipaddress."""
    if isinstance(addr, bytes | bytearray):
        if len(addr) not in (4, 16):
            raise ValueError(f"address must be 4 or 16 bytes, got {len(addr)}")
        return bytes(addr)
    if isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return addr.packed
    return _str_address(addr)


@lru_cache(maxsize=1024)
def _str_address(addr: str) -> bytes:
    try:
        return socket.inet_pton(socket.AF_INET, addr)
    except OSError:
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, addr)
    except OSError:
        raise ValueError(f"not an IPv4 or IPv6 address: {addr!r}") from None


def pseudo_header(src: Address, dst: Address, length: int, proto: int = IPPROTO_DCCP) -> bytes:
    """The IPv4 (RFC 793) or IPv6 (RFC 2460 §8.1) pseudo-header for a transport checksum."""
    s, d = address_bytes(src), address_bytes(dst)
    if len(s) != len(d):
        raise ValueError("source and destination address families differ")
    if len(s) == 4:
        return s + d + bytes((0, proto)) + length.to_bytes(2, "big")
    return s + d + length.to_bytes(4, "big") + b"\x00\x00\x00" + bytes((proto,))


@lru_cache(maxsize=4096)
def _addr_sum(src: Address, dst: Address, proto: int) -> tuple[int, bool]:
    # Keyed on the addresses as given (str, bytes, ipaddress: all hashable), so the hot path
    # does one dict lookup per packet.
    s, d = address_bytes(src), address_bytes(dst)
    if len(s) != len(d):
        raise ValueError("source and destination address families differ")
    return (int.from_bytes(s + d, "big") + proto) % 0xFFFF, len(s) == 16


def pseudo_sum(src: Address, dst: Address, length: int, proto: int = IPPROTO_DCCP) -> int:
    """An int congruent (mod 0xFFFF) to the pseudo-header's 16-bit-word sum.

    The address part is cached per address pair.
    """
    if isinstance(src, bytearray) or isinstance(dst, bytearray):  # unhashable
        src, dst = address_bytes(src), address_bytes(dst)
    s, v6 = _addr_sum(src, dst, proto)
    # IPv4: 16-bit length; IPv6: 32-bit length = two words.
    return s + (length >> 16) + (length & 0xFFFF) if v6 else s + length


def _fold(total: int) -> int:
    """One's complement checksum (inverted sum) from an integer congruent to the word sum."""
    s = total % 0xFFFF
    if s == 0 and total != 0:
        s = 0xFFFF
    return ~s & 0xFFFF


def _words(data: bytes | bytearray | memoryview) -> int:
    if len(data) & 1:
        return int.from_bytes(bytes(data) + b"\x00", "big")
    return int.from_bytes(data, "big")


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 Internet checksum of ``data`` (odd length padded with a zero byte)."""
    return _fold(_words(data) + initial)


def checksum_coverage(data: bytes | bytearray | memoryview) -> int:
    """Bytes covered by the checksum (§9.2), before clamping: may exceed ``len(data)``.

    Needs at least 6 bytes (Data Offset and CsCov); raises ValueError otherwise.
    """
    if len(data) < 6:
        raise ValueError("DCCP header shorter than 6 bytes")
    cscov = data[5] & 0x0F
    if cscov == 0:
        return len(data)
    return (data[4] + cscov - 1) * 4


def compute_checksum(
    data: bytes | bytearray | memoryview,
    src: Address,
    dst: Address,
    *,
    total_len: int | None = None,
) -> int:
    """The checksum a DCCP packet *should* carry, as if its checksum field were zero.

    ``data`` is the packet as received; its bytes 6-7 are ignored. Coverage longer than the
    packet is clamped to the packet (tcpdump's behaviour; ``decode`` rejects such packets).
    ``total_len`` overrides the pseudo-header length (for a truncated capture).
    """
    n = len(data)
    cov = min(checksum_coverage(data), n)
    length = n if total_len is None else total_len
    field = (data[6] << 8) | data[7]
    total = _words(memoryview(data)[:cov]) - field + pseudo_sum(src, dst, length)
    return _fold(total)


def check(data: bytes | bytearray | memoryview, src: Address, dst: Address) -> bool:
    """The checksum verdict: True when the packet's checksum field is correct."""
    if len(data) < 8:
        return False
    return compute_checksum(data, src, dst) == ((data[6] << 8) | data[7])

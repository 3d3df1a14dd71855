"""IP fragment reassembly (vstack.analysis.reassembly): any fragmentation, any order, any
duplicates give back the original datagram, IPv4 and IPv6 (with extension headers before
the Fragment header); overlaps, oversized datagrams, timeouts and memory bounds are
handled and counted; random bytes give only FragmentError. Fragments are built with the
analysis module's own builders, not by the code under test."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vstack.analysis.packet import build_ipv4, build_ipv6, build_udp, parse, verify_l4_checksum
from vstack.analysis.reassembly import FragmentError, Reassembled, Reassembler

S4, D4 = "10.0.0.1", "192.0.2.7"
S6, D6 = "fd00::1", "2001:db8::7"
UDP, FRAG, DSTOPT, HBH = 17, 44, 60, 0


def _ext(nh: int, body_len8: int = 0) -> bytes:
    """A destination-options / hop-by-hop header of (body_len8 + 1) * 8 bytes (PadN)."""
    pad = 6 + 8 * body_len8
    return bytes([nh, body_len8, 1, pad - 2]) + bytes(pad - 2)


def _split(data: bytes, sizes: list[int]) -> list[tuple[int, bytes]]:
    """Cut ``data`` into pieces of the given sizes (multiples of 8; the last takes the
    rest): [(offset, piece)]."""
    out, off = [], 0
    for s in sizes:
        if off + s >= len(data):
            break
        out.append((off, data[off:off + s]))
        off += s
    out.append((off, data[off:]))
    return out


def v4_case(payload: bytes, sizes: list[int], ident: int) -> tuple[bytes, list[bytes]]:
    orig = build_udp(S4, D4, 4000, 5000, payload, ident=ident)
    pieces = _split(orig[20:], sizes)
    frags = [build_ipv4(S4, D4, UDP, p, ident=ident, mf=i < len(pieces) - 1, frag_offset=o)
             for i, (o, p) in enumerate(pieces)]
    return orig, frags


def v6_case(payload: bytes, sizes: list[int], ident: int, exts: int) -> tuple[bytes, list[bytes]]:
    udp = build_udp(S6, D6, 4000, 5000, payload)[40:]
    # the unfragmentable part: 0..2 extension headers (hop-by-hop first, then dest opts)
    kinds = [HBH, DSTOPT][:exts]
    nexts = [*kinds[1:], UDP] if kinds else []
    unfrag = b"".join(_ext(n) for n in nexts)
    orig = build_ipv6(S6, D6, kinds[0] if kinds else UDP, unfrag + udp)
    fnexts = [*kinds[1:], FRAG] if kinds else []
    unfrag_f = b"".join(_ext(n) for n in fnexts)
    pieces = _split(udp, sizes)
    frags = []
    for i, (o, p) in enumerate(pieces):
        more = i < len(pieces) - 1
        fh = struct.pack("!BBHI", UDP, 0, o | more, ident)
        frags.append(build_ipv6(S6, D6, kinds[0] if kinds else FRAG, unfrag_f + fh + p))
    return orig, frags


sizes_st = st.lists(st.integers(1, 40).map(lambda n: n * 8), min_size=1, max_size=12)


def _feed(r: Reassembler, order: list[bytes], now: float = 0.0) -> list[Reassembled]:
    return [x for x in (r.push(f, now) for f in order) if x is not None]


@settings(max_examples=150, deadline=None)
@given(payload=st.binary(min_size=0, max_size=2000), sizes=sizes_st, ident=st.integers(0, 0xFFFF),
       v6=st.booleans(), exts=st.integers(0, 2), data=st.data())
def test_any_fragmentation_order_and_duplicates_give_the_original(
        payload: bytes, sizes: list[int], ident: int, v6: bool, exts: int,
        data: st.DataObject) -> None:
    orig, frags = v6_case(payload, sizes, ident, exts) if v6 else v4_case(payload, sizes, ident)
    order = data.draw(st.permutations(frags))
    dups = data.draw(st.lists(st.sampled_from(frags), max_size=4))
    cut = data.draw(st.integers(0, len(order)))
    seq = [*order[:cut], *dups, *order[cut:]]
    if len(frags) == 1 and not v6:  # MF=0, offset 0: not a fragment (IPv4)
        with pytest.raises(FragmentError):
            Reassembler().push(frags[0], 0.0)
        return
    r = Reassembler()
    results = []
    completed_at = -1
    for i, f in enumerate(seq):
        out = r.push(f, float(i))
        if out is not None:
            results.append(out)
            completed_at = i
    assert len(results) >= 1
    got = results[0]
    assert got.packet == orig
    assert completed_at >= 0 and set(seq[:completed_at + 1]) >= set(frags)
    assert sorted(got.fragments) == sorted(frags)  # each fragment once, duplicates ignored
    assert verify_l4_checksum(got.packet) and not parse(got.packet).fragment
    if completed_at == len(seq) - 1:  # nothing came after: nothing is held
        assert len(r) == 0 and r.buffered == 0


def test_duplicates_after_completion_start_nothing_that_completes() -> None:
    orig, frags = v4_case(b"x" * 100, [32, 32], 7)
    r = Reassembler()
    assert _feed(r, frags)[0].packet == orig
    assert _feed(r, frags[:1]) == [] and len(r) == 1  # a new, incomplete datagram
    assert r.expire(1e9) == 1 and len(r) == 0 and r.buffered == 0


@pytest.mark.parametrize("v6", [False, True])
def test_overlap_drops_the_whole_datagram(v6: bool) -> None:
    _, frags = (v6_case(b"a" * 64, [24, 24], 9, 1) if v6
                else v4_case(b"a" * 64, [24, 24], 9))
    _, other = (v6_case(b"b" * 64, [16, 24], 9, 1) if v6 else v4_case(b"b" * 64, [16, 24], 9))
    r = Reassembler()
    assert r.push(frags[0], 0) is None
    assert r.push(other[1], 0) is None  # offset 16 overlaps 0..24 with other bytes
    assert r.stats.overlaps == 1 and len(r) == 0 and r.buffered == 0
    assert r.stats.dropped_fragments == 2
    assert r.push(frags[1], 0) is None and r.push(frags[2], 0) is None  # head gone
    assert r.push(frags[0], 0) is not None  # ... until it comes again
    assert r.stats.reassembled == 1


def test_oversized_and_inconsistent_ends_are_dropped() -> None:
    r = Reassembler()
    big = build_ipv4(S4, D4, UDP, b"z" * 16, ident=1, mf=True, frag_offset=65520)
    assert r.push(big, 0) is None and r.stats.oversized == 1 and len(r) == 0
    # IPv6: payload past 65535
    fh = struct.pack("!BBHI", UDP, 0, 65528 | 1, 5)
    assert r.push(build_ipv6(S6, D6, FRAG, fh + b"q" * 16), 0) is None
    assert r.stats.oversized == 2
    # a last fragment ending before data already held
    a = build_ipv4(S4, D4, UDP, b"a" * 32, ident=2, mf=True, frag_offset=32)
    last = build_ipv4(S4, D4, UDP, b"b" * 8, ident=2, mf=False, frag_offset=8)
    assert r.push(a, 0) is None and r.push(last, 0) is None
    assert r.stats.oversized == 3 and len(r) == 0
    # too many fragments
    r2 = Reassembler(max_fragments=4)
    for i in range(5):
        assert r2.push(build_ipv4(S4, D4, UDP, b"c" * 8, ident=3, mf=True,
                                  frag_offset=8 * (i + 1)), 0) is None
    assert r2.stats.oversized == 1 and len(r2) == 0


def test_timeouts_and_memory_bounds() -> None:
    r = Reassembler(timeout=30.0, max_datagrams=4, max_bytes=10_000)
    _, frags = v4_case(b"t" * 200, [64], 11)
    assert r.push(frags[0], 0.0) is None
    assert r.expire(29.9) == 0 and len(r) == 1
    assert r.expire(30.0) == 1 and r.stats.timeouts == 1 and len(r) == 0
    assert r.push(frags[1], 31.0) is None  # the head timed out: no completion
    r.clear()
    for ident in range(10):  # more datagrams than allowed: the oldest go
        _, fr = v4_case(b"m" * 200, [64], 100 + ident)
        r.push(fr[0], 40.0)
    assert len(r) == 4 and r.stats.evicted == 6
    r.clear()
    for ident in range(4):  # more bytes than allowed
        _, fr = v4_case(b"m" * 6000, [4000], 200 + ident)
        r.push(fr[0], 50.0)
    assert r.buffered <= 10_000 and r.stats.evicted >= 8
    # the survivor still completes
    orig, fr = v4_case(b"m" * 6000, [4000], 203)
    done = r.push(fr[1], 50.0)
    assert done is not None and done.packet == orig


@settings(max_examples=300, deadline=None)
@given(blobs=st.lists(st.binary(max_size=120), max_size=20))
def test_random_bytes_only_raise_fragment_error(blobs: list[bytes]) -> None:
    r = Reassembler()
    for b in blobs:
        for pkt in (b, b"\x45" + b[1:], b"\x60" + b[1:]):
            try:
                out = r.push(pkt, 0.0)
            except FragmentError:
                continue
            assert out is None or isinstance(out.packet, bytes)
    assert r.buffered >= 0


def test_not_fragments_are_refused() -> None:
    r = Reassembler()
    for pkt in (build_udp(S4, D4, 1, 2, b"x"), build_udp(S6, D6, 1, 2, b"x"), b"", b"\x70"):
        with pytest.raises(FragmentError):
            r.push(pkt, 0)
    assert r.stats.malformed == 4 and r.stats.fragments == 0

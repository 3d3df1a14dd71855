"""The DCCP fast paths of issue 6 against the reference code:

* ``plain_data`` (the receive hot path's parser) agrees with ``decode`` on every packet,
  and recognises exactly the X=1 DCCP-Data without options and with CsCov 0;
* ``DccpConnection.receive_data`` (no DccpPacket) leaves a connection exactly as
  ``receive(decode(...))`` does, for in-window, duplicate, reordered and out-of-window
  sequence numbers: same events, statistics, acks on the wire and Ack Vector;
* ``DataEncoder`` (headers packed into preallocated buffers) writes byte for byte what
  ``encode`` writes.
"""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from vstack.dccp import seq as sq
from vstack.dccp.connection import DccpConnection, State
from vstack.dccp.options import NdpCount, Padding
from vstack.dccp.packet import (
    DataEncoder,
    DccpPacket,
    PacketType,
    decode,
    encode,
    plain_data,
)

from .test_dccp_conn_harness import Pair

ports = st.integers(0, 0xFFFF)
seqs = st.integers(0, sq.SEQ_MASK)
payloads = st.binary(max_size=300)


@settings(max_examples=300)
@given(ptype=st.sampled_from([PacketType.DATA, PacketType.DATAACK, PacketType.ACK]),
       sport=ports, dport=ports, seq=seqs, payload=payloads,
       with_opt=st.booleans(), cscov=st.integers(0, 3), ccval=st.integers(0, 15),
       x=st.booleans())
def test_plain_data_agrees_with_decode(ptype: PacketType, sport: int, dport: int, seq: int,
                                       payload: bytes, with_opt: bool, cscov: int,
                                       ccval: int, x: bool) -> None:
    if not x:
        seq &= 0xFFFFFF
    cscov = cscov if (cscov - 1) * 4 <= len(payload) else 0
    pkt = DccpPacket(ptype, sport, dport, seq, ack=None if ptype == PacketType.DATA else 5,
                     x=x, ccval=ccval, cscov=cscov,
                     options=(NdpCount(3),) if with_opt else (), payload=payload)
    wire = encode(pkt, "10.0.0.1", "10.0.0.2")
    got = plain_data(memoryview(wire))
    plain = ptype == PacketType.DATA and x and not with_opt and cscov == 0
    assert (got is not None) == plain
    if got is not None:
        ref = decode(wire, "10.0.0.1", "10.0.0.2")
        assert got == (ref.sport, ref.dport, ref.seq, ref.payload)
        assert type(got[3]) is bytes


def test_plain_data_refuses_short_and_padded() -> None:
    assert plain_data(b"\0" * 15) is None
    padded = encode(DccpPacket(PacketType.DATA, 1, 2, 3, options=(Padding(),), payload=b"x"),
                    None, None)  # Data Offset 5: an option, however empty
    assert plain_data(padded) is None


def _open_pair() -> Pair:
    p = Pair()
    p.handshake()
    p.deliver_all()
    p.settle()
    assert p.s is not None and p.s.state == State.OPEN and p.c.state == State.OPEN
    return p


def _state(c: DccpConnection) -> tuple[object, ...]:
    return (c.state, copy.copy(c.stats), c.seq.gsr, c.seq.gar, bytes(c.ackvec._states),
            c.ackvec.tail, sorted(c._seen), c._ack_now, c._ack_at, c._data_since_ack,
            c._rx_since_ack, c._osr)


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(-40, 2000), st.binary(max_size=20)),
                      min_size=1, max_size=60))
def test_receive_data_equals_receive(steps: list[tuple[int, bytes]]) -> None:
    p = _open_pair()
    srv = p.s
    assert srv is not None
    twin = copy.deepcopy(srv)
    gsr = srv.seq.gsr
    assert gsr is not None
    now = p.now
    for off, payload in steps:
        now += 0.001
        seq = sq.add(gsr, off)
        pkt = DccpPacket(PacketType.DATA, srv.dport, srv.sport, seq, payload=payload)
        srv.receive(decode(encode(pkt, None, None), verify=False), now)
        fast = plain_data(encode(pkt, None, None))
        assert fast is not None
        twin.receive_data(fast[2], fast[3], now)
        assert srv.ack_due == twin.ack_due
        a = [encode(q, None, None) for q in srv.packets_to_send(now)]
        b = [encode(q, None, None) for q in twin.packets_to_send(now)]
        assert a == b
        assert _state(srv) == _state(twin)
        ea = [srv.next_event() for _ in range(len(srv._events))]
        eb = [twin.next_event() for _ in range(len(twin._events))]
        assert ea == eb


def test_receive_data_outside_open_goes_through_receive() -> None:
    p = Pair()
    c = p.c  # CLOSED before connect: a Data packet gets Reset(No Connection), as receive()
    c.receive_data(7, b"x", 0.0)
    out = c.packets_to_send(0.0)
    assert [q.type for q in out] == [PacketType.RESET]


@settings(max_examples=300)
@given(sport=ports, dport=ports, seq=seqs, payload=st.binary(max_size=1500),
       ack=st.one_of(st.none(), seqs), offset=st.integers(0, 64))
def test_data_encoder_is_byte_identical_to_encode(sport: int, dport: int, seq: int,
                                                  payload: bytes, ack: int | None,
                                                  offset: int) -> None:
    enc = DataEncoder(sport, dport)
    buf = bytearray(offset + 24 + len(payload) + 7)
    buf[:] = b"\xaa" * len(buf)  # stale bytes from an earlier packet must not leak
    n = enc.pack_into(buf, offset, seq, payload, ack)
    ptype = PacketType.DATA if ack is None else PacketType.DATAACK
    ref = encode(DccpPacket(ptype, sport, dport, seq, ack=ack, payload=payload), None, None)
    assert bytes(buf[offset:offset + n]) == ref
    assert buf[:offset] == b"\xaa" * offset
    assert buf[offset + n:] == b"\xaa" * (len(buf) - offset - n)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 200), min_size=1, max_size=80),
       acks=st.lists(st.booleans(), min_size=1, max_size=80))
def test_packets_to_send_plain_is_the_same_packets(sizes: list[int], acks: list[bool]) -> None:
    """``packets_to_send_plain`` hands plain Data as (seq, payload); encoded with the
    connection's DataEncoder they are byte for byte what ``packets_to_send`` gives."""
    p = _open_pair()
    cli = p.c
    twin = copy.deepcopy(cli)
    enc = DataEncoder(cli.sport, cli.dport)
    now = p.now
    for i, n in enumerate(sizes):
        now += 0.001
        for c in (cli, twin):
            c.send(bytes([i & 0xFF]) * n, now)
            if acks[i % len(acks)]:
                c._ack_now = True  # a due ack: piggybacked as a DataAck (with options)
        ref = [encode(q, None, None) for q in cli.packets_to_send(now)]
        got = []
        for q in twin.packets_to_send_plain(now):
            if isinstance(q, tuple):
                buf = bytearray(16 + len(q[1]))
                enc.pack_into(buf, 0, q[0], q[1])
                got.append(bytes(buf))
            else:
                got.append(encode(q, None, None))
        assert got == ref
        assert cli.stats == twin.stats and cli._ndp == twin._ndp
        assert cli.ccid.pipe == twin.ccid.pipe


def test_packets_to_send_plain_gives_tuples_for_plain_data() -> None:
    p = _open_pair()
    cli = p.c
    for i in range(3):
        cli.send(bytes([i]) * 10, p.now)
    out = cli.packets_to_send_plain(p.now)
    plain = [q for q in out if isinstance(q, tuple)]
    assert plain and all(len(q[1]) == 10 for q in plain)
    seqs = [q[0] if isinstance(q, tuple) else q.seq for q in out]
    assert seqs == sorted(seqs)  # one sequence, in order

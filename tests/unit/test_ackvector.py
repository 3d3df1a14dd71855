"""Ack Vector generation/processing (RFC 4340 §11.4), sequence arithmetic (§7.1, §7.6)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vstack.dccp import seq as sq
from vstack.dccp.ackvector import MAX_RUN, AckVectorReceiver, CellState, decode_cells
from vstack.dccp.options import AckVector, decode_options, encode_options

seqnos = st.integers(0, sq.SEQ_MASK)


@settings(max_examples=200, deadline=None)
@given(base=seqnos, offsets=st.lists(st.integers(0, 600), min_size=1, max_size=120))
def test_cells_round_trip_exactly(base: int, offsets: list[int]) -> None:
    rx = AckVectorReceiver()
    got = [sq.add(base, o) for o in offsets]
    for q in got:
        rx.add(q)
    head = rx.head
    assert head is not None and head == sq.add(base, max(offsets))
    cells = rx.cells()
    assert all(0 <= run <= MAX_RUN and state in (0, 3) for state, run in cells)
    # through the codec, as the peer would see it
    (opt,) = decode_options(encode_options([AckVector.from_runs(cells)]))[:1]
    assert isinstance(opt, AckVector)
    received: set[int] = set()
    missing: set[int] = set()
    for r in decode_cells(head, opt.runs()):
        (received if r.state == CellState.RECEIVED else missing).update(r)
    assert received == set(got)
    # the vector covers exactly tail..head; the gaps are "not received"
    span = {sq.add(base, o) for o in range(min(offsets), max(offsets) + 1)}
    assert missing == span - set(got)


def test_duplicates_and_old_packets_are_reported() -> None:
    rx = AckVectorReceiver()
    assert rx.add(10) and rx.add(12)
    assert not rx.add(12)  # duplicate
    assert rx.add(11)  # fills the hole
    assert rx.cells() == [(0, 2)]
    assert rx.is_received(11) and rx.is_received(5) is None


def test_long_runs_split_into_63() -> None:
    rx = AckVectorReceiver()
    for q in range(200):
        rx.add(q)
    assert rx.cells() == [(0, 63), (0, 63), (0, 63), (0, 7)]


def test_ack_of_ack_trims_state() -> None:
    rx = AckVectorReceiver()
    for q in range(100, 150):
        rx.add(q)
    rx.record_sent(our_seqno=7000, ackno=149)  # our Ack 7000 carried a vector from 149
    for q in range(150, 160):
        rx.add(q)
    rx.record_sent(our_seqno=7001, ackno=159)
    assert len(rx) == 60
    assert not rx.on_acked(6999)  # unknown packet: nothing happens
    assert rx.on_acked(7000)  # the peer saw our vector up to 149
    assert rx.tail == 150 and len(rx) == 10
    assert rx.cells() == [(0, 9)]
    assert rx.records == 1  # 7000 (and anything older) forgotten
    assert rx.on_acked(7001)
    assert len(rx) == 0 and rx.tail == 160
    # after a full trim new packets continue from the tail, holes included
    rx.add(162)
    assert rx.head == 162 and rx.cells() == [(0, 0), (3, 1)]
    assert rx.trimmed == 2


def test_state_is_bounded_without_acks_of_acks() -> None:
    rx = AckVectorReceiver(max_packets=100)
    for q in range(1000):
        rx.add(q)
    assert len(rx) == 100 and rx.tail == 900


@settings(max_examples=300, deadline=None)
@given(ref=seqnos, delta=st.integers(-(1 << 22), (1 << 22)))
def test_short_seqno_extension(ref: int, delta: int) -> None:
    actual = sq.add(ref, delta)
    assert sq.extend(actual & 0xFFFFFF, ref) == actual


@settings(max_examples=300, deadline=None)
@given(a=seqnos, d=st.integers(1, (1 << 47) - 1))
def test_circular_order(a: int, d: int) -> None:
    b = sq.add(a, d)
    assert sq.lt(a, b) and sq.gt(b, a) and not sq.lt(b, a)
    assert sq.dist(b, a) == d and sq.sub(b, a) == d
    assert sq.between(sq.add(a, d // 2), a, b)
    assert not sq.between(sq.sub(a, 1), a, b)


def test_validity_windows() -> None:
    s = sq.SeqState(local_window=100, remote_window=100)
    s.start(1000)
    s.set_isr(5000)
    for _ in range(10):
        s.next_seq()
    assert s.swl == 5000 and s.swh == 5075  # max(GSR+1-W/4, ISR), GSR + 3W/4
    assert s.awl == 1000 and s.awh == 1010
    s.gsr = 6000
    assert s.swl == 6000 + 1 - 25
    # §7.5.3 table: Reset needs GSR < seqno, Data only SWL <= seqno
    assert not s.check(7, 6000, 1010) and s.check(7, 6001, 1010)
    assert s.check(2, 5990, None) and not s.check(2, 5900, None)
    assert s.check(8, 9_999_999, 1005)  # Sync: no upper bound on seqno
    assert not s.check(3, 6001, 2000)  # ack beyond AWH


@settings(max_examples=400, deadline=None)
@given(
    isr=seqnos,
    ahead=st.integers(0, 1000),
    w=st.integers(32, 2000),
    off=st.integers(-3000, 3000),
)
def test_window_fast_path_matches_definition(isr: int, ahead: int, w: int, off: int) -> None:
    s = sq.SeqState(remote_window=w)
    s.start(0)
    s.set_isr(isr)
    s.gsr = sq.add(isr, ahead)
    x = sq.add(s.gsr, off)
    assert s.seq_valid(2, x) == sq.between(x, s.swl, s.swh)

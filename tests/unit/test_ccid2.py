"""CCID2 sender (RFC 4341): window growth, loss response, RTO, Ack Vector round trips."""

from __future__ import annotations

from vstack.dccp import seq as sq
from vstack.dccp.ackvector import AckRange, AckVectorReceiver, CellState, decode_cells
from vstack.dccp.ccid2 import Ccid2Config, Ccid2Sender
from vstack.dccp.options import AckVector, decode_options, encode_options

BASE = 1000


def sender(**kw: object) -> Ccid2Sender:
    return Ccid2Sender(Ccid2Config(**kw))  # type: ignore[arg-type]


def send_n(s: Ccid2Sender, start: int, n: int, now: float = 0.0) -> list[int]:
    out = []
    for i in range(n):
        assert s.can_send()
        s.on_sent(start + i, now)
        out.append(start + i)
    return out


def ack_all(s: Ccid2Sender, seqs: list[int], now: float) -> None:
    """Ack via an Ack Vector built by a real receiver."""
    rx = AckVectorReceiver()
    for q in seqs:
        rx.add(q)
    head = rx.head
    assert head is not None
    s.on_ack(head, decode_cells(head, rx.cells()), now)


def test_initial_window_rfc3390() -> None:
    assert sender(mss=1424).cwnd == 3
    assert sender(mss=500).cwnd == 4
    assert sender(mss=3000).cwnd == 2


def test_full_window_stops_sending() -> None:
    s = sender(initial_cwnd=4)
    send_n(s, BASE, 4)
    assert s.pipe == 4 and not s.can_send()
    ack_all(s, [BASE], 0.1)
    assert s.can_send()


def test_slow_start_adds_one_per_acked_packet() -> None:
    s = sender(initial_cwnd=2)
    seqs = send_n(s, BASE, 2)
    ack_all(s, seqs, 0.1)
    assert s.cwnd == 4 and s.pipe == 0
    seqs = send_n(s, BASE + 2, 4)
    ack_all(s, seqs, 0.2)
    assert s.cwnd == 8


def test_congestion_avoidance_adds_one_per_window() -> None:
    s = sender(initial_cwnd=4)
    s.ssthresh = 4
    nxt = BASE
    for _ in range(3):
        w = s.cwnd
        seqs = send_n(s, nxt, w)
        nxt += w
        ack_all(s, seqs, 0.1)
        assert s.cwnd == w + 1


def test_three_later_acks_mean_loss_and_halve_once_per_window() -> None:
    s = sender(initial_cwnd=10)
    seqs = send_n(s, BASE, 10)
    # BASE and BASE+1 never arrived; the receiver's vector starts at BASE+2
    rx = AckVectorReceiver()
    for q in seqs[2:]:
        rx.add(q)
    head = rx.head
    assert head is not None
    res = s.on_ack(head, decode_cells(head, rx.cells()), 0.1)
    assert sorted(res.newly_acked) == seqs[2:]
    assert res.lost == [BASE, BASE + 1]  # >= NUMDUPACK later packets acknowledged
    assert s.stats.reductions == 1  # two losses in one window: one halving
    assert s.cwnd == s.ssthresh == (10 + 8) // 2
    assert s.pipe == 0
    # a loss of a packet sent before the reduction does not halve again
    s2 = sender(initial_cwnd=10)
    send_n(s2, BASE, 10)
    s2.on_ack(BASE + 5, [AckRange(BASE + 5, BASE + 2, 0), AckRange(BASE + 1, BASE, 3)], 0.1)
    w = s2.cwnd
    s2.on_ack(BASE + 9, [AckRange(BASE + 9, BASE + 7, 0), AckRange(BASE + 6, BASE + 6, 3)], 0.2)
    assert s2.stats.lost == 3 and s2.stats.reductions == 1 and s2.cwnd >= w


def test_loss_detected_without_explicit_state_when_later_packets_acked() -> None:
    s = sender(initial_cwnd=8)
    seqs = send_n(s, BASE, 8)
    before = s.cwnd
    # ack everything except BASE+3, cell by cell (state 3 for the hole)
    ranges = [
        AckRange(BASE + 7, BASE + 4, CellState.RECEIVED),
        AckRange(BASE + 3, BASE + 3, CellState.NOT_RECEIVED),
        AckRange(BASE + 2, BASE, CellState.RECEIVED),
    ]
    res = s.on_ack(BASE + 7, ranges, 0.05)
    assert res.lost == [BASE + 3]
    assert s.stats.lost == 1
    assert s.cwnd < before + 7  # growth then one halving
    assert s.pipe == 0
    assert seqs


def test_ecn_mark_halves_window() -> None:
    s = sender(initial_cwnd=6)
    send_n(s, BASE, 6)
    s.on_ack(BASE + 5, [AckRange(BASE + 5, BASE, CellState.ECN_MARKED)], 0.1)
    assert s.stats.ecn_marked == 6 and s.stats.reductions == 1


def test_rto_collapses_window_and_backs_off() -> None:
    s = sender(initial_cwnd=4, initial_rto=1.0)
    send_n(s, BASE, 4, now=0.0)
    t = s.next_timer()
    assert t == 1.0
    assert s.on_timeout(0.5) == []  # not yet
    lost = s.on_timeout(1.0)
    assert lost == [BASE, BASE + 1, BASE + 2, BASE + 3]
    assert s.cwnd == 1 and s.ssthresh == 2 and s.rto == 2.0
    assert s.pipe == 0 and s.next_timer() is None
    # a late ack of a packet declared lost does not corrupt the pipe
    s.on_sent(BASE + 4, 2.0)
    s.on_ack(BASE + 4, [AckRange(BASE + 4, BASE, CellState.RECEIVED)], 2.1)
    assert s.pipe == 0


def test_rtt_estimator_rfc6298() -> None:
    s = sender(initial_cwnd=4, min_rto=0.2)
    s.on_sent(BASE, 0.0)
    s.on_ack(BASE, None, 0.1)
    assert s.srtt is not None and abs(s.srtt - 0.1) < 1e-9
    assert abs(s.rttvar - 0.05) < 1e-9
    assert abs(s.rto - 0.3) < 1e-9  # SRTT + 4 RTTVAR
    s.on_sent(BASE + 1, 1.0)
    s.on_ack(BASE + 1, None, 1.3)
    assert abs(s.srtt - (0.875 * 0.1 + 0.125 * 0.3)) < 1e-9


def test_ack_ratio_at_most_half_the_window() -> None:
    s = sender(initial_cwnd=3)
    assert s.desired_ack_ratio() == 1
    s.cwnd = 4
    assert s.desired_ack_ratio() == 2
    s.cwnd = 100
    assert s.desired_ack_ratio() == 2  # capped at max_ack_ratio


def test_cumulative_fallback_without_ack_vectors() -> None:
    s = sender(initial_cwnd=5)
    send_n(s, BASE, 5)
    res = s.on_ack_cumulative(BASE + 3, 0.1)
    assert sorted(res.newly_acked) == [BASE, BASE + 1, BASE + 2, BASE + 3]
    assert s.pipe == 1


def test_ack_vector_through_codec_round_trip() -> None:
    rx = AckVectorReceiver()
    got = [BASE + i for i in range(200) if i % 7 != 3]
    for q in got:
        rx.add(q)
    head = rx.head
    assert head is not None
    opt = AckVector.from_runs(rx.cells(), rx.nonce())
    (back,) = [o for o in decode_options(encode_options([opt])) if isinstance(o, AckVector)]
    received = {q for r in decode_cells(head, back.runs()) if r.state == 0 for q in r}
    assert received == set(got)
    # option 39 (nonce 1) from a peer is processed the same way
    s = sender(initial_cwnd=10)
    send_n(s, head - 9, 10)
    res = s.on_ack(head, decode_cells(head, AckVector(1, back.cells).runs()), 0.1)
    assert set(res.newly_acked) == {q for q in range(head - 9, head + 1) if q in set(got)}


def test_sequence_wrap_in_sender() -> None:
    start = sq.SEQ_MASK - 2
    s = sender(initial_cwnd=6)
    seqs = [sq.add(start, i) for i in range(6)]
    for q in seqs:
        s.on_sent(q, 0.0)
    rx = AckVectorReceiver()
    for q in seqs:
        rx.add(q)
    head = rx.head
    assert head == seqs[-1] == 2
    res = s.on_ack(head, decode_cells(head, rx.cells()), 0.1)
    assert sorted(res.newly_acked) == sorted(seqs) and s.pipe == 0

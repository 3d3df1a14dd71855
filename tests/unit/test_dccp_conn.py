"""DCCP connection (RFC 4340 §8) in memory: handshake, data, close, bad input."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from vstack.dccp import features as ft
from vstack.dccp import seq as sq
from vstack.dccp.connection import (
    TRANSITIONS,
    ConnectionClosed,
    DccpConnection,
    HandshakeComplete,
    PeerTimeout,
    ProtocolError,
    ResetReceived,
    State,
)
from vstack.dccp.options import (
    AckVector,
    ChangeL,
    ChangeR,
    ConfirmL,
    ConfirmR,
    Mandatory,
    NdpCount,
    Timestamp,
)
from vstack.dccp.packet import DccpPacket, PacketType, ResetCode

from .test_dccp_conn_harness import CPORT, SERVICE, SPORT, Pair, make_config

PT = PacketType


def opened() -> Pair:
    p = Pair()
    p.handshake()
    assert p.s is not None
    assert p.c.state == State.OPEN and p.s.state == State.OPEN
    return p


def test_handshake_negotiates_ccid2_and_ack_vectors() -> None:
    p = opened()
    assert p.s is not None
    assert p.types("s")[:2] == [PT.REQUEST, PT.ACK]
    assert p.types("c")[0] == PT.RESPONSE
    for conn in (p.c, p.s):
        assert conn.features.local[ft.CCID] == 2 and conn.features.remote[ft.CCID] == 2
        assert conn.features.local[ft.SEND_ACK_VECTOR] == 1
        assert conn.features.remote[ft.SEND_ACK_VECTOR] == 1
        assert conn.features.local[ft.ECN_INCAPABLE] == 1  # §12.1: we read no ECN marks
        assert not conn.features.pending
    assert any(isinstance(e, HandshakeComplete) for e in p.events["c"])
    assert any(isinstance(e, HandshakeComplete) for e in p.events["s"])


def test_data_both_ways_and_graceful_close() -> None:
    p = opened()
    assert p.s is not None
    for i in range(50):
        assert p.c.send(b"c%d" % i, p.now)
        assert p.s.send(b"s%d" % i, p.now)
        p.collect()
        p.deliver_all()
        p.advance(0.001)
    p.settle(max_time=1.0)
    assert p.delivered("s") == [b"c%d" % i for i in range(50)]
    assert p.delivered("c") == [b"s%d" % i for i in range(50)]
    assert p.c.rtt_ms is not None
    assert p.c.loss == 0
    # acks carried Ack Vectors, and acks of acks trimmed the receiver state
    assert any(isinstance(o, AckVector) for _, pk in p.log for o in pk.options)
    assert p.c.ackvec.trimmed > 0 or p.s.ackvec.trimmed > 0
    p.c.close(p.now)
    p.collect()
    p.deliver_all()
    assert p.types("s")[-1] == PT.CLOSE and p.types("c")[-1] == PT.RESET
    assert p.log[-1][1].reset_code == ResetCode.CLOSED
    assert p.c.state == State.TIMEWAIT and p.s.state == State.CLOSED
    assert p.events["c"][-1] == ConnectionClosed(graceful=True)
    assert p.events["s"][-1] == ConnectionClosed(graceful=True)
    p.advance(p.c.config.timewait + 1)
    assert p.c.state == State.CLOSED


def test_server_close_uses_closereq() -> None:
    p = opened()
    assert p.s is not None
    p.s.close(p.now)
    p.collect()
    p.deliver_all()
    assert p.types("c")[-2:] == [PT.CLOSEREQ, PT.RESET]
    assert p.types("s")[-1] == PT.CLOSE
    assert p.c.state == State.TIMEWAIT and p.s.state == State.CLOSED


def test_data_sent_before_open_is_queued_not_lost() -> None:
    p = Pair()
    for i in range(5):
        assert p.c.send(b"early%d" % i, 0.0)
    p.handshake()
    p.settle(max_time=1.0)
    assert p.delivered("s") == [b"early%d" % i for i in range(5)]


def test_queue_bound_drops_and_counts() -> None:
    p = Pair(client_cfg=make_config(queue_limit=4))
    assert [p.c.send(b"x", 0.0) for _ in range(6)] == [True] * 4 + [False] * 2
    assert p.c.stats.send_dropped == 2
    assert not p.c.send(b"y" * (p.c.config.mps + 1), 0.0)
    assert p.c.stats.send_oversize == 1


def test_full_window_queues_until_acks_arrive() -> None:
    p = opened()
    assert p.s is not None
    cwnd = p.c.ccid.cwnd
    for i in range(cwnd + 5):
        assert p.c.send(b"%d" % i, p.now)
    p.collect()
    data = [f for f in p.flights if f.pkt.payload]
    assert len(data) == cwnd  # the window stops the sender
    assert p.c.queue_length == 5
    p.settle(max_time=1.0)
    assert len(p.delivered("s")) == cwnd + 5


def test_request_retransmitted_with_backoff_and_new_seqno() -> None:
    p = Pair(client_cfg=make_config(request_timeout=1.0))
    p.c.connect(0.0)
    p.collect()
    first = p.drop().pkt
    times = []
    for _ in range(3):
        t = p.c.next_timer()
        assert t is not None
        times.append(t)
        p.now = t
        p.fire_timers()
    reqs = [f.pkt for f in p.flights]
    assert [r.type for r in reqs] == [PT.REQUEST] * 3
    assert [r.seq for r in reqs] == [first.seq + 1, first.seq + 2, first.seq + 3]
    assert all(r.service_code == SERVICE for r in reqs)
    assert times == [1.0, 3.0, 7.0]  # 1 s, then doubling (§8.1.1)
    p.deliver_all()
    assert p.c.state == State.OPEN


def test_unanswered_request_reports_peer_timeout() -> None:
    p = Pair(client_cfg=make_config(max_retransmits=3))
    p.c.connect(0.0)
    for _ in range(10):
        p.collect()
        p.flights.clear()  # the server is not there
        t = p.c.next_timer()
        if t is None:
            break
        p.now = t
        p.c.handle_timer(t)
    p.drain_events()
    assert isinstance(p.events["c"][-2], PeerTimeout)
    assert p.events["c"][-1] == ConnectionClosed(graceful=False)
    assert p.c.state == State.CLOSED and p.c.next_timer() is None


def test_peer_vanishing_mid_flow_reports_peer_timeout() -> None:
    p = Pair(client_cfg=make_config(max_rto_timeouts=4))
    p.handshake()
    for i in range(40):
        p.c.send(b"%d" % i, p.now)
        p.collect()
        p.flights.clear()  # the server vanished: nothing comes back
        t = p.c.next_timer()
        if p.c.is_closed or t is None:
            break
        p.now = t
        p.c.handle_timer(t)
    p.drain_events()
    assert any(isinstance(e, PeerTimeout) for e in p.events["c"])
    assert p.c.state == State.CLOSED


def test_unanswered_close_reports_peer_timeout() -> None:
    p = Pair(client_cfg=make_config(max_retransmits=4))
    p.handshake()
    p.c.close(p.now)
    for _ in range(20):
        p.collect()
        p.flights.clear()
        t = p.c.next_timer()
        if t is None:
            break
        p.now = t
        p.c.handle_timer(t)
    p.drain_events()
    assert p.c.stats.retransmits == p.c.config.max_retransmits
    assert any(isinstance(e, PeerTimeout) for e in p.events["c"])


def test_partopen_ack_lost_is_retransmitted_with_confirms() -> None:
    p = Pair()
    p.c.connect(0.0)
    p.collect()
    p.deliver(0)  # Request -> server, Response queued
    p.deliver(0)  # Response -> client: PARTOPEN, Ack queued
    assert p.c.state == State.PARTOPEN
    lost = p.drop().pkt
    assert lost.type == PT.ACK and any(isinstance(o, ConfirmL) for o in lost.options)
    t = p.c.next_timer()
    assert t is not None
    p.now = t
    p.fire_timers()
    again = p.flights[0].pkt
    assert again.type == PT.ACK
    assert [o for o in again.options if isinstance(o, ConfirmL | ConfirmR)] == [
        o for o in lost.options if isinstance(o, ConfirmL | ConfirmR)
    ]
    p.deliver_all()
    assert p.s is not None and p.s.state == State.OPEN


def test_bad_service_code_gets_reset_8() -> None:
    p = Pair(client_cfg=make_config(service_code=0x1))
    p.c.connect(0.0)
    p.collect()
    p.deliver(0)
    assert p.s is not None and p.s.state == State.CLOSED
    reset = p.flights[0].pkt
    assert reset.type == PT.RESET and reset.reset_code == ResetCode.BAD_SERVICE_CODE
    assert isinstance(p.events["s"][0], ProtocolError)
    assert p.events["s"][-1] == ConnectionClosed(graceful=False)
    p.deliver_all()
    assert p.c.state == State.TIMEWAIT
    assert ResetReceived(ResetCode.BAD_SERVICE_CODE, b"\0\0\0") in p.events["c"]
    assert p.events["c"][-1] == ConnectionClosed(graceful=False)


def test_listener_resets_non_request_without_state() -> None:
    p = Pair()
    stray = DccpPacket(type=PT.ACK, sport=CPORT, dport=SPORT, seq=10, ack=99)
    assert p.listener.receive(stray, 0.0) is None
    (r,) = p.listener.packets_to_send()
    assert r.type == PT.RESET and r.reset_code == ResetCode.NO_CONNECTION
    assert r.seq == 100 and r.ack == 10  # §8.5 step 2: P.ackno + 1, P.seqno


def _inject(p: Pair, to: DccpConnection, pkt: DccpPacket) -> None:
    to.receive(pkt, p.now)
    p.collect()


def test_out_of_window_packet_gets_sync_and_changes_nothing() -> None:
    p = opened()
    assert p.s is not None
    gsr = p.s.seq.gsr
    assert gsr is not None
    before = (p.s.state, p.s.seq.gsr, p.s.seq.gss - 0, len(p.delivered("s")))
    bad = DccpPacket(type=PT.DATA, sport=CPORT, dport=SPORT, seq=(gsr + 5000), payload=b"evil")
    _inject(p, p.s, bad)
    sync = p.flights[-1].pkt
    assert sync.type == PT.SYNC and sync.ack == gsr + 5000
    assert p.s.state == before[0] and p.s.seq.gsr == before[1]
    assert len(p.delivered("s")) == before[3]
    assert p.s.stats.out_of_window == 1
    # the real client never sent that seqno: it drops the Sync (§8.5 step 5), no loop
    n = len(p.types("s"))
    p.deliver_all()
    assert PT.SYNCACK not in p.types("s")[n:]
    assert p.c.stats.out_of_window == 1
    assert p.c.state == State.OPEN and p.s.state == State.OPEN
    # rate limit: a flood of bad packets yields at most 8 Syncs per second (§7.5.4)
    p.flights.clear()
    for k in range(30):
        _inject(p, p.s, replace(bad, seq=gsr + 6000 + k))
    syncs = [f for f in p.flights if f.pkt.type == PT.SYNC]
    assert len(syncs) <= 8 and p.s.stats.syncs_suppressed >= 22


def test_off_path_reset_is_ignored() -> None:
    p = opened()
    gsr, gss = p.c.seq.gsr, p.c.seq.gss
    assert gsr is not None
    for seqno, ackno in ((gsr + 10_000, gss), (gsr + 1, gss + 10_000), (gsr, gss)):
        rst = DccpPacket(
            type=PT.RESET, sport=SPORT, dport=CPORT, seq=seqno, ack=ackno, reset_code=2
        )
        _inject(p, p.c, rst)
        assert p.c.state == State.OPEN
    assert not any(isinstance(e, ResetReceived) for e in p.events["c"])
    syncs = [f.pkt for f in p.flights if f.pkt.type == PT.SYNC]
    assert syncs and all(s.ack == gsr for s in syncs)  # §8.5 step 6: Sync acking GSR
    # an in-window Reset is accepted
    good = DccpPacket(type=PT.RESET, sport=SPORT, dport=CPORT, seq=gsr + 1, ack=p.c.seq.gss,
                      reset_code=2)  # fmt: skip
    _inject(p, p.c, good)
    assert p.c.state == State.TIMEWAIT
    assert ResetReceived(2, b"\0\0\0") in p.events["c"]


def test_off_path_response_in_request_state_is_ignored() -> None:
    p = Pair()
    p.c.connect(0.0)
    p.collect()
    req = p.flights[0].pkt
    fake = DccpPacket(type=PT.RESPONSE, sport=SPORT, dport=CPORT, seq=5, ack=req.seq + 999,
                      service_code=SERVICE)  # fmt: skip
    p.c.receive(fake, 0.0)
    assert p.c.state == State.REQUEST
    fake_rst = DccpPacket(type=PT.RESET, sport=SPORT, dport=CPORT, seq=5, ack=req.seq + 999,
                          reset_code=3)  # fmt: skip
    p.c.receive(fake_rst, 0.0)
    assert p.c.state == State.REQUEST
    p.deliver_all()
    assert p.c.state == State.OPEN


def test_short_seqnos_refused_unless_allowed() -> None:
    p = opened()
    gsr = p.s.seq.gsr if p.s else None
    assert p.s is not None and gsr is not None
    short = DccpPacket(type=PT.DATA, sport=CPORT, dport=SPORT, seq=(gsr + 1) & 0xFFFFFF, x=False,
                       payload=b"short")  # fmt: skip
    p.s.receive(short, p.now)
    assert p.s.stats.invalid == 1
    p.s.features.local[ft.ALLOW_SHORT_SEQNOS] = 1
    p.s.receive(short, p.now)
    p.drain_events()
    assert p.delivered("s")[-1] == b"short"
    assert p.s.seq.gsr == gsr + 1  # extended to 48 bits (§7.6)


def test_transition_table_cites_rfc_and_names_real_handlers() -> None:
    for (state, ptype), tr in TRANSITIONS.items():
        assert tr.rfc.startswith("§")
        assert callable(getattr(DccpConnection, tr.handler))
        assert isinstance(state, State) and isinstance(ptype, PT)
    assert TRANSITIONS[(State.REQUEST, PT.RESPONSE)].next_state == State.PARTOPEN
    assert TRANSITIONS[(State.RESPOND, PT.ACK)].next_state == State.OPEN


# ---- feature negotiation against a Linux-6.1-like Response ------------------------------


def linux_response(req: DccpPacket, seq: int = 1000) -> DccpPacket:
    """What Linux 6.1 answers (kernel-dccp-peer README): Confirms plus Mandatory Changes."""
    return DccpPacket(
        type=PT.RESPONSE,
        sport=SPORT,
        dport=CPORT,
        seq=seq,
        ack=req.seq,
        service_code=SERVICE,
        options=(
            Timestamp(0x4B6A),
            ConfirmL(1, (2, 2)),
            ConfirmR(1, (2, 2)),
            Mandatory(), ChangeL(2, (0,)),
            Mandatory(), ChangeL(4, (1,)),
            Mandatory(), ChangeR(6, (1,)),
            Mandatory(), ChangeL(6, (1,)),
        ),
    )  # fmt: skip


def test_every_change_in_linux_response_is_confirmed() -> None:
    c = DccpConnection.client(sport=CPORT, dport=SPORT, config=make_config())
    c.connect(0.0)
    (req,) = c.packets_to_send(0.0)
    assert ChangeL(1, (2,)) in req.options and ChangeR(1, (2,)) in req.options
    c.receive(linux_response(req), 0.005)
    assert c.state == State.PARTOPEN
    (ack,) = c.packets_to_send(0.005)
    assert ack.type == PT.ACK and ack.ack == 1000
    confirms = [o for o in ack.options if isinstance(o, ConfirmL | ConfirmR)]
    # Confirm R for each Change L, Confirm L for each Change R; SP: value then our prefs
    assert ConfirmR(2, (0, 0, 1)) in confirms
    assert ConfirmR(4, (1, 1, 0)) in confirms
    assert ConfirmL(6, (1, 1, 0)) in confirms
    assert ConfirmR(6, (1, 1, 0)) in confirms
    assert len(confirms) == 4
    assert c.features.remote[ft.ECN_INCAPABLE] == 1
    assert c.features.local[ft.SEND_ACK_VECTOR] == 1
    assert any(isinstance(o, AckVector) for o in ack.options)  # we now send Ack Vectors
    # the Confirms are repeated on every PARTOPEN packet
    c.send(b"hello", 0.006)
    (dataack,) = c.packets_to_send(0.006)
    assert dataack.type == PT.DATAACK
    assert len([o for o in dataack.options if isinstance(o, ConfirmL | ConfirmR)]) == 4


def test_missing_confirm_means_change_is_retransmitted() -> None:
    """Our server's Change R(Send Ack Vector) stays pending until confirmed (§6.6.3)."""
    p = Pair()
    strip = {"on": True}

    def tap(to: str, pkt: DccpPacket) -> DccpPacket | None:
        if to == "s" and strip["on"]:
            opts = tuple(o for o in pkt.options if not isinstance(o, ConfirmL | ConfirmR))
            return replace(pkt, options=opts)
        return pkt

    p.tap = tap
    p.handshake()
    assert p.s is not None and p.s.state == State.OPEN
    assert ("R", ft.SEND_ACK_VECTOR) in p.s.features.pending_features()
    # the feature timer makes the server send an Ack carrying the Change again
    n_changes = sum(1 for d, pk in p.log if d == "c" for o in pk.options if isinstance(o, ChangeR))
    p.settle(max_time=2.0)
    n_after = sum(1 for d, pk in p.log if d == "c" for o in pk.options if isinstance(o, ChangeR))
    assert n_after > n_changes
    strip["on"] = False
    p.advance(1.0)
    p.settle(max_time=2.0)
    assert not p.s.features.pending


def test_mandatory_unknown_feature_resets_with_mandatory_error() -> None:
    c = DccpConnection.client(sport=CPORT, dport=SPORT, config=make_config())
    c.connect(0.0)
    (req,) = c.packets_to_send(0.0)
    resp = linux_response(req)
    resp = replace(resp, options=(*resp.options, Mandatory(), ChangeL(200, (1,))))
    c.receive(resp, 0.01)
    (rst,) = c.packets_to_send(0.01)
    assert rst.type == PT.RESET and rst.reset_code == ResetCode.MANDATORY_ERROR
    assert rst.reset_data == bytes((32, 200, 1))
    assert isinstance(c.next_event(), ProtocolError)
    assert c.state == State.CLOSED


def test_unknown_non_mandatory_feature_gets_empty_confirm() -> None:
    c = DccpConnection.client(sport=CPORT, dport=SPORT, config=make_config())
    c.connect(0.0)
    (req,) = c.packets_to_send(0.0)
    resp = linux_response(req)
    resp = replace(resp, options=(*resp.options, ChangeR(77, (1,))))
    c.receive(resp, 0.01)
    (ack,) = c.packets_to_send(0.01)
    assert ConfirmL(77, ()) in ack.options
    assert c.state == State.PARTOPEN


# ---- more behaviour ----------------------------------------------------------------------


def test_one_way_flow_acks_the_acks_so_receiver_state_stays_small() -> None:
    p = opened()
    assert p.s is not None
    for i in range(2000):
        p.c.send(b"%d" % i, p.now)
        if i % 4 == 0:
            p.collect()
            p.deliver_all()
            p.advance(0.0005)
    p.settle(max_time=1.0)
    assert len(p.delivered("s")) == 2000
    assert p.s.ackvec.trimmed > 10
    assert len(p.s.ackvec) < 300  # trimmed by acks of acks, far below the 16k bound
    assert any(pk.type == PT.DATAACK for d, pk in p.log if d == "s")


def test_ack_ratio_follows_the_window_and_is_confirmed() -> None:
    p = opened()
    assert p.s is not None
    for i in range(30):
        p.c.send(b"%d" % i, p.now)
        p.collect()
        p.deliver_all()
        p.advance(0.001)
    p.settle(max_time=1.0)
    changes = [o for d, pk in p.log if d == "s" for o in pk.options if isinstance(o, ChangeL)]
    assert any(o.feature == ft.ACK_RATIO for o in changes)
    assert p.s.features.remote[ft.ACK_RATIO] == p.c.features.local[ft.ACK_RATIO]
    assert p.c.features.local[ft.ACK_RATIO] <= max(1, p.c.ccid.cwnd // 2)
    assert not p.c.features.pending


def test_ndp_count_sent_when_negotiated() -> None:
    p = opened()
    assert p.s is not None
    p.c.features.local[ft.SEND_NDP_COUNT] = 1
    p.c._ack_now = True  # one non-data packet, then data
    p.collect()
    p.c.send(b"after-ack", p.now)
    p.collect()
    data = [f.pkt for f in p.flights if f.pkt.payload == b"after-ack"]
    sent = [pk for d, pk in p.log if d == "s"]
    assert sent[-1] is data[0] and sent[-2].type == PT.ACK
    # §7.7: the length of the run of non-data packets just before this one
    assert all(pk.type not in (PT.DATA, PT.DATAACK) for pk in sent[:-1])
    assert NdpCount(len(sent) - 1) in data[0].options


def test_server_respond_timeout_is_peer_timeout() -> None:
    p = Pair(server_cfg=make_config(handshake_timeout=5.0))
    p.c.connect(0.0)
    p.collect()
    p.deliver(0)  # Request reaches the server; the client then vanishes
    assert p.s is not None and p.s.state == State.RESPOND
    p.flights.clear()
    p.now = 5.0
    p.s.handle_timer(5.0)
    p.drain_events()
    assert isinstance(p.events["s"][-2], PeerTimeout)
    assert p.s.state == State.CLOSED


def test_wrong_ports_are_counted_not_processed() -> None:
    p = opened()
    assert p.s is not None
    stray = DccpPacket(type=PT.DATA, sport=CPORT + 1, dport=SPORT, seq=1, payload=b"x")
    p.s.receive(stray, p.now)
    assert p.s.stats.invalid == 1 and p.s.state == State.OPEN


def test_confirm_with_invalid_value_is_option_error() -> None:
    c = DccpConnection.client(sport=CPORT, dport=SPORT, config=make_config())
    c.connect(0.0)
    (req,) = c.packets_to_send(0.0)
    resp = replace(linux_response(req), options=(ConfirmL(1, (3, 3)), ConfirmR(1, (2, 2))))
    c.receive(resp, 0.01)
    (rst,) = c.packets_to_send(0.01)
    assert rst.type == PT.RESET and rst.reset_code == ResetCode.OPTION_ERROR
    assert c.state == State.CLOSED


def test_server_priority_reconciliation() -> None:
    assert ft.reconcile_sp([3, 2, 1], [1, 2]) == 2
    assert ft.reconcile_sp([3], [1, 2]) is None
    srv = ft.FeatureNegotiator(is_server=True, local_prefs={ft.SEND_NDP_COUNT: (1, 0)})
    res = srv.process([ChangeR(ft.SEND_NDP_COUNT, (0, 1))])
    assert res.confirms_owed and srv.local[ft.SEND_NDP_COUNT] == 1  # the server's list wins
    assert srv.options() == [ConfirmL(ft.SEND_NDP_COUNT, (1, 1, 0))]
    cli = ft.FeatureNegotiator(is_server=False, local_prefs={ft.SEND_NDP_COUNT: (1, 0)})
    cli.process([ChangeR(ft.SEND_NDP_COUNT, (0, 1))])
    assert cli.local[ft.SEND_NDP_COUNT] == 0  # the server's (the peer's) list wins


_fuzz_options = st.lists(
    st.sampled_from(
        [
            Mandatory(),
            ChangeL(1, (3,)),
            ChangeR(2, (1,)),
            ChangeL(3, (10,)),
            ChangeL(5, (0,)),
            ConfirmL(6, ()),
            ConfirmR(1, (2, 2)),
            ChangeR(99, (1,)),
            AckVector(0, b"\x3f\xc0\x05"),
            AckVector(1, b""),
            Timestamp(5),
            NdpCount(3),
        ]
    ),
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(
    ptype=st.sampled_from(list(PT)),
    dseq=st.integers(-300, 300),
    dack=st.one_of(st.none(), st.integers(-300, 300)),
    opts=_fuzz_options,
    rcode=st.integers(0, 255),
)
def test_arbitrary_packets_never_crash(
    ptype: PT, dseq: int, dack: int | None, opts: list[object], rcode: int
) -> None:
    p = opened()
    assert p.s is not None
    gsr = p.s.seq.gsr
    assert gsr is not None
    pkt = DccpPacket(
        type=ptype, sport=CPORT, dport=SPORT, seq=sq.add(gsr, dseq),
        ack=None if dack is None else sq.add(p.s.seq.gss, dack),
        options=tuple(opts),  # type: ignore[arg-type]
        payload=b"fuzz", reset_code=rcode if ptype == PT.RESET else None,
        service_code=SERVICE if ptype in (PT.REQUEST, PT.RESPONSE) else None,
    )  # fmt: skip
    p.s.receive(pkt, p.now)
    p.collect()
    p.advance(1.0)
    assert p.s.state in set(State)
    assert p.s.next_timer() is None or p.s.next_timer() >= 0  # type: ignore[operator]


def test_request_payload_delivered_once() -> None:
    p = Pair()
    p.c.connect(0.0, payload=b"in-request")
    p.collect()
    p.duplicate(0)
    p.deliver(0)
    t = p.c.next_timer()
    assert t is not None
    p.now = t
    p.fire_timers()  # a retransmitted Request carries the same data (§8.1.1)
    p.settle(max_time=1.0)
    assert p.delivered("s") == [b"in-request"]


def test_handshake_timestamps_seed_the_rto() -> None:
    p = Pair()
    p.c.connect(0.0)
    p.collect()
    p.now = 0.004
    p.deliver(0)  # Request arrives after 4 ms
    p.now = 0.008
    p.deliver(0)  # Response arrives after 4 ms: RTT 8 ms via Timestamp Echo
    assert p.c.rtt_ms is not None and abs(p.c.rtt_ms - 8.0) < 0.1
    assert p.c.ccid.rto == p.c.ccid.config.min_rto  # not the 1 s initial RTO any more
    p.deliver_all()
    assert p.s is not None and p.s.rtt_ms is not None


def test_valid_sync_gets_syncack_and_moves_the_window() -> None:
    p = opened()
    assert p.s is not None
    gsr, gss = p.c.seq.gsr, p.c.seq.gss
    assert gsr is not None
    # a Sync far ahead (Syncs have no upper seqno bound, §7.5.3) acking our latest packet
    sync = DccpPacket(type=PT.SYNC, sport=SPORT, dport=CPORT, seq=gsr + 500, ack=gss)
    _inject(p, p.c, sync)
    reply = p.flights[-1].pkt
    assert reply.type == PT.SYNCACK and reply.ack == gsr + 500
    assert p.c.seq.gsr == gsr + 500 and p.c.state == State.OPEN
    assert p.c.stats.syncs_received == 1

"""Hypothesis stateful test: a DCCP pair over a lossy, reordering, duplicating network.

Properties (issue 3, item 7):
* no datagram is ever delivered twice, and only datagrams that were sent arrive;
* every datagram the sender accepted (``send`` returned True) and of which at
  least one copy reached the receiver without being rejected as out of window
  (the receiver counts those) is delivered - DCCP does not retransmit, so a
  datagram whose every copy the network dropped is legitimately missing;
* the handshake completes under loss once the network stops losing.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vstack.dccp.connection import HandshakeComplete, State
from vstack.dccp.packet import PacketType

from .test_dccp_conn_harness import Pair, make_config

REORDER_DEPTH = 4  # a delivered packet is one of the first few in flight


class DccpPairMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.p = Pair(
            client_cfg=make_config(seed=1, queue_limit=16),
            server_cfg=make_config(seed=2, queue_limit=16),
        )
        self.sent: dict[str, list[bytes]] = {"c": [], "s": []}  # accepted by send()
        self.n = 0
        self.dropped_by_net = 0

    @initialize()
    def start(self) -> None:
        self.p.c.connect(self.p.now)
        self.p.collect()

    def _send(self, side: str) -> None:
        conn = self.p.c if side == "c" else self.p.s
        if conn is None:
            return
        self.n += 1
        data = b"%s-%d" % (side.encode(), self.n)
        if conn.send(data, self.p.now):
            self.sent[side].append(data)
        self.p.collect()

    @rule(k=st.integers(1, 4))
    def client_sends(self, k: int) -> None:
        for _ in range(k):
            self._send("c")

    @rule(k=st.integers(1, 4))
    def server_sends(self, k: int) -> None:
        for _ in range(k):
            self._send("s")

    @precondition(lambda self: self.p.flights)
    @rule(i=st.integers(0, REORDER_DEPTH - 1))
    def deliver(self, i: int) -> None:
        self.p.deliver(i % min(len(self.p.flights), REORDER_DEPTH))

    @precondition(lambda self: self.p.flights)
    @rule(i=st.integers(0, REORDER_DEPTH - 1))
    def lose(self, i: int) -> None:
        self.p.drop(i % min(len(self.p.flights), REORDER_DEPTH))
        self.dropped_by_net += 1

    @precondition(lambda self: self.p.flights)
    @rule(i=st.integers(0, REORDER_DEPTH - 1))
    def duplicate(self, i: int) -> None:
        self.p.duplicate(i % min(len(self.p.flights), REORDER_DEPTH))

    @rule(dt=st.sampled_from([0.001, 0.01, 0.05, 0.3, 1.0]))
    def tick(self, dt: float) -> None:
        self.p.advance(dt)

    @invariant()
    def delivered_once_and_only_what_was_sent(self) -> None:
        for side, peer in (("s", "c"), ("c", "s")):
            got = self.p.delivered(side)
            dup = [d for d, n in Counter(got).items() if n > 1]
            assert not dup, f"delivered twice at {side}: {dup}"
            assert set(got) <= set(self.sent[peer])

    @invariant()
    def no_local_or_remote_errors(self) -> None:
        for side in ("c", "s"):
            for e in self.p.events[side]:
                assert isinstance(e, HandshakeComplete) or type(e).__name__ == "DatagramReceived", e

    def teardown(self) -> None:
        p = self.p
        p.settle(max_time=400.0)
        assert p.s is not None, "the handshake did not complete under loss"
        assert p.c.state == State.OPEN and p.s.state == State.OPEN
        assert any(isinstance(e, HandshakeComplete) for e in p.events["c"])
        assert any(isinstance(e, HandshakeComplete) for e in p.events["s"])
        for side, peer in (("s", "c"), ("c", "s")):
            got = p.delivered(side)
            assert len(got) == len(set(got))
            # what reached the receiver (and was not rejected) is delivered exactly once
            assert set(got) == p.arrived[side], (side, set(got) ^ p.arrived[side])
            assert set(got) <= set(self.sent[peer])
            conn = p.s if peer == "c" else p.c
            assert conn.queue_length == 0  # nothing stuck behind the window
            for data in self.sent[peer]:
                # the sender put every accepted datagram on the wire...
                assert p.wire_copies[data] > 0, f"{data!r} accepted but never sent"
                # ...and unless the network dropped every copy, it was delivered
                # (or counted as rejected out of window by the receiver)
                if p.wire_copies[data] > p.dropped_copies[data]:
                    assert data in got or data in p.rejected[side], f"{data!r} lost in the stack"
        # and the close still works after all that
        p.c.close(p.now)
        p.settle(max_time=400.0)
        assert p.c.state in (State.TIMEWAIT, State.CLOSED) and p.s.state == State.CLOSED
        assert PacketType.CLOSE in p.types("s")


DccpPairMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDccpPair = DccpPairMachine.TestCase


class DccpCloseMachine(DccpPairMachine):
    """The same network, and either side closes at some point, under loss."""

    def __init__(self) -> None:
        super().__init__()
        self.closed_by: str | None = None
        # a client that aborts in REQUEST cannot reach a server in RESPOND (it knows no
        # ackno for a Reset); the server's handshake timeout ends that connection
        self.p.server_cfg.handshake_timeout = 100.0
        self.p.listener.config.handshake_timeout = 100.0

    @precondition(lambda self: self.closed_by is None)
    @rule(side=st.sampled_from(["c", "s"]))
    def close(self, side: str) -> None:
        conn = self.p.c if side == "c" else self.p.s
        if conn is None:
            return
        conn.close(self.p.now)
        self.closed_by = side
        self.p.collect()

    @invariant()
    def no_local_or_remote_errors(self) -> None:
        pass  # a close under loss may legitimately end with Reset(No Connection) etc.

    def teardown(self) -> None:
        p = self.p
        if self.closed_by is None:
            p.c.close(p.now)
        p.settle(max_time=2000.0)
        conns = [("c", p.c)] + ([("s", p.s)] if p.s is not None else [])
        for name, conn in conns:
            assert conn.is_closed, (name, conn.state)
            assert conn.next_timer() is None or conn.state == State.TIMEWAIT
            evs = p.events[name]
            if evs:
                assert type(evs[-1]).__name__ == "ConnectionClosed", evs[-3:]
                assert sum(type(e).__name__ == "ConnectionClosed" for e in evs) == 1
            got = p.delivered(name)
            assert len(got) == len(set(got))


DccpCloseMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDccpClose = DccpCloseMachine.TestCase

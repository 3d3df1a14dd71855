"""Regression tests for the review of the DCCP fast path (issue 6)."""

from __future__ import annotations

import asyncio
from typing import Any

from vstack.dccp import endpoint as ep_mod
from vstack.dccp import features as ft
from vstack.dccp.ccid2 import Ccid2Config, Ccid2Sender
from vstack.dccp.options import ConfirmR


def test_congestion_avoidance_after_the_window_cap_shrank_adds_one() -> None:
    """A cwnd cut by ``set_max_cwnd`` does not turn the packets counted towards the old,
    larger window into a burst of growth (RFC 4341 §5: +1 per window)."""
    s = Ccid2Sender(Ccid2Config(initial_cwnd=50))
    s.ssthresh = 50
    s._ca_count = 40  # 40 of the 50 acks this window needs
    s.set_max_cwnd(10)
    s.set_max_cwnd(1000)
    s.ssthresh = 10  # congestion avoidance from here
    assert s.cwnd == 10
    s._grow(1)
    assert s.cwnd == 10
    s._ca_count = 40  # even if the count got past cwnd some other way
    s._grow(1)
    assert s.cwnd == 11


def test_a_confirm_of_a_replaced_nn_change_keeps_the_new_one_pending() -> None:
    f = ft.FeatureNegotiator(is_server=False)
    f.change_local(ft.ACK_RATIO, (50,))
    f.change_local(ft.ACK_RATIO, (5,))  # cwnd fell before the first was confirmed
    f.process([ConfirmR(ft.ACK_RATIO, (50,))])
    assert ("L", ft.ACK_RATIO) in f.pending_features()
    f.process([ConfirmR(ft.ACK_RATIO, (5,))])
    assert not f.pending and f.local[ft.ACK_RATIO] == 5


class _Raw:
    dccp_checksum = True

    def __init__(self) -> None:
        self.sent = 0

    def sendto(self, data: Any, remote: str, port: int = 0) -> bool:
        self.sent += 1
        return True


class _Conn:
    sport, dport = 1000, 2000

    def __init__(self) -> None:
        self.events = ["ev"]

    def packets_to_send_plain(self, now: float) -> list[tuple[int, bytes]]:
        return [(5, b"hello"), (6, b"world")]

    def next_event(self) -> str | None:
        return self.events.pop() if self.events else None

    def next_timer(self) -> float | None:
        return 1e9


def test_a_local_send_failure_drops_the_packets_but_not_the_connection() -> None:
    """An encoding failure (here: no usable local address for the pseudo-header) is
    counted as drops; the connection's events and timer still go on."""
    loop = asyncio.new_event_loop()
    try:
        got: list[Any] = []
        ep = ep_mod.DccpEndpoint(_Conn(), _Raw(), "", "10.0.0.2", loop)  # type: ignore[arg-type]
        ep.on_event = got.append
        ep.pump()
        assert ep.stats.tx_dropped == 2 and ep.stats.tx_packets == 0
        assert got == ["ev"] and ep._timer is not None
        ep._timer.cancel()
    finally:
        loop.close()

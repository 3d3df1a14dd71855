"""Flow scale (issue 6, ``bench flows``): the compact per-flow state keeps its behaviour.

In-process datapath on a socketpair (no root): flows are freed when they leave (objects
counted, not RSS), the table never holds more than ``max_flows``, idle expiry by the
periodic sweep is exact to the sweep's granularity, the first packet's fields kept as one
int give back the same event fields, and the UDP stacks' shared reader (``ReaderMux``)
delivers to the right stack and gives its epoll back when the last socket leaves.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.aio import Echo, until
from vstack.analysis.classifier import classify, note_fields
from vstack.analysis.packet import build_tcp, build_udp
from vstack.config import Config
from vstack.datapath import Datapath
from vstack.decision.events import Event
from vstack.execution.engine import StackEngine
from vstack.execution.selector import Decision
from vstack.execution.stacks.base import ReaderMux
from vstack.execution.stacks.udp import UdpStack

LO = "127.0.0.1"


def _alive(cls: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is cls)


class _Drop:
    def decide(self, event: Event, now: float) -> Decision:
        return Decision(drop=True, rule="t")


async def _bed(selector: Any = None, **ex: Any) -> tuple[Datapath, socket.socket,
                                                         socket.socket, int, Any]:
    loop = asyncio.get_running_loop()
    tr, _echo = await loop.create_datagram_endpoint(Echo, local_addr=(LO, 0))
    port = tr.get_extra_info("sockname")[1]
    cfg = Config()
    cfg.vnic.fwmark = 0
    cfg.execution.metrics_interval_s = 3600  # the test calls tick() itself
    for k, v in ex.items():
        setattr(cfg.execution, k, v)
    app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    app.setblocking(False)
    dp = Datapath(cfg, selector)
    dp.attach(tun.fileno(), loop)
    return dp, app, tun, port, tr


def _close(dp: Datapath, app: socket.socket, tun: socket.socket, tr: Any) -> None:
    dp.close()
    tr.close()
    app.close()
    tun.close()


def _send(app: socket.socket, i: int, port: int, payload: bytes = b"x") -> None:
    app.send(build_udp(f"10.0.{i >> 8 & 255}.{i & 255}", LO, 1024 + i, port, payload))


async def _created(dp: Datapath, n: int) -> None:
    await until(lambda: dp.stats()["flows_created"] == n)


def test_flows_are_freed_when_the_datapath_closes() -> None:
    async def main() -> None:
        n = 40
        before_e, before_u = _alive(StackEngine), _alive(UdpStack)
        dp, app, tun, port, tr = await _bed()
        try:
            for i in range(n):
                _send(app, i, port)
            await until(lambda: dp.stats()["flows_created"] == n)
            assert _alive(StackEngine) - before_e == n
            assert _alive(UdpStack) - before_u == n
            mux = ReaderMux.of(asyncio.get_running_loop())
            assert len(mux) >= n  # one registration per UDP stack socket
        finally:
            _close(dp, app, tun, tr)
        assert _alive(StackEngine) == before_e and _alive(UdpStack) == before_u
        assert len(ReaderMux.of(asyncio.get_running_loop())) == 0
        assert not dp._fast4 and not dp._wire  # no stale fast-path entries

    asyncio.run(main())


def test_the_table_never_holds_more_than_max_flows() -> None:
    async def main() -> None:
        before = _alive(StackEngine)
        dp, app, tun, port, tr = await _bed(max_flows=8)
        try:
            for i in range(30):
                _send(app, i, port)
                await _created(dp, i + 1)
                assert len(dp.table) <= 8
            s = dp.stats()
            assert s["flows"] == 8 and s["flows_evicted"] == 22
            # the evicted flows are gone: engines, their sockets and fast-path entries
            assert _alive(StackEngine) - before == 8
            assert len(dp._fast4) == 8 and len(dp._wire) == 8
            assert len(ReaderMux.of(asyncio.get_running_loop())) == 8
        finally:
            _close(dp, app, tun, tr)

    asyncio.run(main())


def test_idle_expiry_is_exact_to_the_sweep() -> None:
    """A flow is expired by the first sweep at least ``idle_timeout_s`` after the sweep
    that last saw it active; a flow with traffic in between stays."""
    async def main() -> None:
        dp, app, tun, port, tr = await _bed(idle_timeout_s=5.0)
        events: list[Event] = []
        dp.metrics_listeners.append(events.append)
        try:
            _send(app, 1, port)
            _send(app, 2, port)
            await until(lambda: dp.stats()["flows_created"] == 2)
            t = time.monotonic() + 100
            dp.tick(t)  # both had a packet since creation: seen active at t
            assert dp.stats()["flows"] == 2
            _send(app, 2, port, b"again")  # flow 2 active again before the next sweep
            await until(lambda: dp.stats()["fast_packets"] >= 1)
            dp.tick(t + 4.99)
            assert dp.stats()["flows"] == 2  # idle 4.99 s < 5 s
            dp.tick(t + 5.0)
            assert dp.stats()["flows"] == 1 and dp.stats()["flows_expired"] == 1
            idle = [e for e in events if e.type == "flow.idle"]
            assert len(idle) == 1 and idle[0].fields["sport"] == 1025
            dp.tick(t + 9.98)  # flow 2 last seen active at t + 4.99
            assert dp.stats()["flows"] == 1
            dp.tick(t + 9.99)
            assert dp.stats()["flows"] == 0 and len(ReaderMux.of(
                asyncio.get_running_loop())) == 0
        finally:
            _close(dp, app, tun, tr)

    asyncio.run(main())


def test_dropped_flows_have_no_endpoint_or_stack_and_a_switch_builds_them() -> None:
    async def main() -> None:
        dp, app, tun, port, tr = await _bed(_Drop())
        got: list[bytes] = []
        loop = asyncio.get_running_loop()
        loop.add_reader(app.fileno(), lambda: got.append(app.recv(65535)))
        try:
            _send(app, 7, port, b"dropped")
            await until(lambda: dp.stats()["flows_created"] == 1)
            key, e = next(iter(dp.table.items()))
            assert e.endpoint is None and not e.stacks and e.send is None
            assert e.totals()[4] == 1  # the first packet: dropped
            dp.switch(key, "udp", rule="t")
            assert e.endpoint is not None and set(e.stacks) == {"udp"}
            _send(app, 7, port, b"carried")
            await until(lambda: len(got) == 1)
            assert got[0].endswith(b"carried")
        finally:
            loop.remove_reader(app.fileno())
            dp.close()
            tr.close()
            app.close()
            tun.close()

    asyncio.run(main())


def test_metrics_events_carry_the_first_packets_fields() -> None:
    async def main() -> None:
        dp, app, tun, port, tr = await _bed()
        events: list[Event] = []
        dp.metrics_listeners.append(events.append)
        try:
            pkt = build_udp("10.0.0.9", LO, 4000, port, b"abcde", dscp=46)
            app.send(pkt)
            await until(lambda: dp.stats()["flows_created"] == 1)
            dp.tick(time.monotonic() + 1)
            (ev,) = [e for e in events if e.type == "flow.metrics"]
            want = classify(pkt).fields(stack="udp")
            assert {k: ev.fields[k] for k in want} == want
        finally:
            _close(dp, app, tun, tr)

    asyncio.run(main())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 63), st.integers(0, 1400), st.integers(1, 65535),
       st.integers(1, 65535), st.integers(0, 255), st.booleans(), st.booleans())
def test_note_gives_the_fields_back(dscp: int, n: int, sport: int, dport: int, flags: int,
                                    tcp: bool, v6: bool) -> None:
    src, dst = ("fd00::1", "fd01::2") if v6 else ("10.0.0.1", "10.0.0.2")
    if tcp:
        pkt = build_tcp(src, dst, sport, dport, b"p" * n, flags=flags, dscp=dscp)
    else:
        pkt = build_udp(src, dst, sport, dport, b"p" * n, dscp=dscp)
    c = classify(pkt)
    assert note_fields(c.key, c.note(), iface="i", stack="s") == c.fields(iface="i",
                                                                          stack="s")


def test_reader_mux_calls_the_readable_ones_and_gives_its_epoll_back() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        mux = ReaderMux.of(loop)
        assert ReaderMux.of(loop) is mux
        calls: list[int] = []
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(3)]

        class H:
            def __init__(self, i: int, s: socket.socket) -> None:
                self.i, self.s = i, s

            def on_readable(self) -> None:
                calls.append(self.i)
                self.s.recv(100)

        for i, (a, _b) in enumerate(pairs):
            a.setblocking(False)
            mux.add(a.fileno(), H(i, a))
        assert len(mux) == 3
        pairs[2][1].send(b"x")
        pairs[0][1].send(b"y")
        await until(lambda: len(calls) == 2)
        assert sorted(calls) == [0, 2]
        mux.remove(pairs[0][0].fileno())
        mux.remove(pairs[0][0].fileno())  # idempotent
        pairs[0][1].send(b"z")
        pairs[1][1].send(b"w")
        await until(lambda: len(calls) == 3)
        await asyncio.sleep(0.01)
        assert calls[2] == 1 and len(calls) == 3  # removed: not called
        ep = mux._ep
        assert ep is not None
        for a, _b in pairs[1:]:
            mux.remove(a.fileno())
        assert mux._ep is None and ep.closed and len(mux) == 0
        for a, b in pairs:
            a.close()
            b.close()

    asyncio.run(main())


def test_the_sweep_visits_idle_flows_in_slices_and_never_expires_an_active_one(
        monkeypatch: Any) -> None:
    """Above ``COLD_PER_TICK`` flows, flows idle at the previous tick are checked a slice
    per tick: a cold flow that had traffic is noticed within a round (metrics over its
    own interval), and expiry asks a due flow for traffic first."""
    import vstack.datapath as dpm

    monkeypatch.setattr(dpm, "COLD_PER_TICK", 3)

    async def main() -> None:
        dp, app, tun, port, tr = await _bed(idle_timeout_s=100.0)
        dp.config.execution.metrics_interval_s = 1.0  # rounds <= 100 / 1 / 4 = 25 ticks
        events: list[Event] = []
        dp.metrics_listeners.append(events.append)
        try:
            for i in range(10):
                _send(app, i, port)
            await until(lambda: dp.stats()["flows_created"] == 10)
            t = time.monotonic() + 1000
            dp.tick(t)  # all new: all checked, all active
            assert len([e for e in events if e.type == "flow.metrics"]) == 10
            dp.tick(t + 1)  # all active at the previous tick: all checked, none active
            events.clear()
            _send(app, 4, port, b"later")  # a cold flow gets traffic
            await until(lambda: dp.stats()["fast_packets"] >= 1)
            seen = 0
            for k in range(2, 6):  # a round of 10 cold flows takes 4 ticks of 3
                dp.tick(t + k)
                seen += len([e for e in events if e.type == "flow.metrics"])
                events.clear()
            assert seen == 1
            assert dp.stats()["flows"] == 10
            # flow 4 was seen active at some tick in t+2..t+5: its interval is its own
            _send(app, 5, port, b"just before expiry")
            await until(lambda: dp.stats()["fast_packets"] >= 2)
            dp.tick(t + 101)  # due: 1..8 (last t+1); 5 had traffic: kept
            left = {e.fields["sport"] for e in events if e.type == "flow.metrics"}
            assert left == {1029} and dp.stats()["flows"] == 2  # 4 (seen later) and 5
            assert dp.stats()["flows_expired"] == 8
        finally:
            _close(dp, app, tun, tr)

    asyncio.run(main())


def test_a_reload_changes_the_fallback_stack_all_flows_share() -> None:
    async def main() -> None:
        dp, app, tun, port, tr = await _bed()
        try:
            _send(app, 1, port)
            await until(lambda: dp.stats()["flows_created"] == 1)
            _key, e = next(iter(dp.table.items()))
            assert e.env.fallback == "udp"
            cfg = Config()
            cfg.vnic = dp.config.vnic
            cfg.execution.default_stack = "udplite"
            dp.reload(cfg)
            assert e.env.fallback == "udplite" and e.stack_name == "udplite"
        finally:
            _close(dp, app, tun, tr)

    asyncio.run(main())


def test_reader_mux_one_failing_reader_does_not_starve_the_others() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        mux = ReaderMux.of(loop)
        bad_a, bad_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        good_a, good_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        got: list[bytes] = []

        class Bad:
            def on_readable(self) -> None:
                raise RuntimeError("a flow's bug")

        class Good:
            def on_readable(self) -> None:
                got.append(good_a.recv(100))

        for s in (bad_a, good_a):
            s.setblocking(False)
        mux.add(bad_a.fileno(), Bad())
        mux.add(good_a.fileno(), Good())
        bad_b.send(b"x")  # stays unread: reported at every wakeup
        for i in range(3):
            good_b.send(bytes([i]))
        await until(lambda: len(got) == 3)
        assert got == [b"\x00", b"\x01", b"\x02"] and mux.errors >= 1
        mux.remove(bad_a.fileno())
        mux.remove(good_a.fileno())
        assert loop not in ReaderMux._muxes  # the empty mux lets its loop go
        for s in (bad_a, bad_b, good_a, good_b):
            s.close()

    asyncio.run(main())


def test_tick_with_flows_that_never_expire() -> None:
    """``idle_timeout_s = inf`` (never expire) is valid: the sweep still runs."""
    async def main() -> None:
        dp, app, tun, port, tr = await _bed(_Drop(), idle_timeout_s=float("inf"))
        try:
            for i in range(5):
                _send(app, i, port)
            await _created(dp, 5)
            dp.tick()
            dp.tick()
            assert dp.stats()["flows"] == 5
        finally:
            _close(dp, app, tun, tr)

    asyncio.run(main())

"""The stack manager's cache in-process, without root (a datagram socketpair stands in for
the TUN, as in tests/net/test_datapath_loop.py): a failed DCCP stack leaves the cache and
the flow falls back to UDP with a ``stack.error`` event, a later switch builds a fresh
stack; one cached stack per name (retarget and other options supersede the old one, which
is closed); the loss in ``flow.metrics`` is per interval; IP fragments are reassembled and
carried by the flow's stack to its NAT target."""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
from typing import Any

from tests.aio import Echo
from tests.aio import until as _until
from vstack.analysis.flowkey import FlowKey
from vstack.analysis.packet import build_ipv4, build_ipv6, build_udp, parse
from vstack.config import Config, Target
from vstack.datapath import Datapath
from vstack.dccp.endpoint import DccpServer
from vstack.decision.checker import check
from vstack.decision.events import EVENT_SCHEMA, Event
from vstack.decision.parser import parse_rules
from vstack.execution import engine as engine_mod
from vstack.execution.selector import Decision
from vstack.execution.stacks.dccp import DccpStack

APP = "10.0.0.1"
LO = "127.0.0.1"


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LO, 0))
        return int(s.getsockname()[1])


class Bed:
    """Datapath on a socketpair; two UDP echoes; a DCCP-UDP echo that NAT maps the flow's
    destination to for the dccp stack."""

    def __init__(self, selector: Any = None) -> None:
        self.selector = selector

    async def start(self) -> Bed:
        loop = asyncio.get_running_loop()
        self.echoes: list[Echo] = []
        self.ports: list[int] = []
        for _ in range(2):
            tr, proto = await loop.create_datagram_endpoint(Echo, local_addr=(LO, 0))
            self.echoes.append(proto)
            self.ports.append(tr.get_extra_info("sockname")[1])
        self.dport = _free_udp_port()
        self.srv: DccpServer | None = await self.start_dccp()
        cfg = Config()
        cfg.vnic.fwmark = 0
        cfg.execution.metrics_interval_s = 60.0
        cfg.stacks["dccp"] = {"transport": "udp"}
        cfg.nat[f"{LO}:{self.ports[0]}"] = {"dccp": Target(LO, self.dport)}
        self.app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.app.setblocking(False)
        self._tun = tun
        self.dp = Datapath(cfg, self.selector)
        self.dp.attach(tun.fileno(), loop)
        self.events: list[Event] = []
        self.dp.metrics_listeners.append(self.events.append)
        self.got: list[bytes] = []
        loop.add_reader(self.app.fileno(), self._readable)
        self.key = FlowKey(17, APP, 40100, LO, self.ports[0])
        return self

    async def start_dccp(self) -> DccpServer:
        return await DccpServer.start(port=self.dport, bind=LO, transport="udp", echo=True)

    def _readable(self) -> None:
        while True:
            try:
                self.got.append(parse(pkt := self.app.recv(65535)).payload(pkt))
            except BlockingIOError:
                return

    def send(self, payload: bytes) -> None:
        self.app.send(build_udp(APP, LO, self.key.sport, self.key.dport, payload))

    async def round_trip(self, payload: bytes) -> None:
        self.send(payload)
        await _until(lambda: payload in self.got)

    def engine(self) -> Any:
        return self.dp.table.get(self.key)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.app.fileno())
        self.dp.close()
        if self.srv is not None:
            self.srv.close()


def test_failed_dccp_stack_falls_back_to_udp_and_a_later_switch_rebuilds() -> None:
    async def main() -> None:
        b = await Bed().start()
        try:
            await b.round_trip(b"on udp")
            b.dp.switch(b.key, "dccp", rule="t")
            await b.round_trip(b"on dccp 1")
            e = b.engine()
            first = e.active
            assert isinstance(first, DccpStack) and e.stacks["dccp"] is first
            assert b.srv is not None
            b.srv.close()  # the peer restarts: it answers our next packet with a Reset
            b.srv = await b.start_dccp()
            b.send(b"into the reset")
            await _until(lambda: any(ev.type == "stack.error" for ev in b.events))
            (ev,) = [ev for ev in b.events if ev.type == "stack.error"]
            assert set(ev.fields) == set(EVENT_SCHEMA["stack.error"])
            assert ev.fields["failed_stack"] == "dccp" and ev.fields["fatal"] is True
            assert ev.fields["remote"] is True and ev.fields["stack"] == "udp"
            assert ev.flow == b.key
            # out of the cache, closed; the flow is on UDP and traffic keeps flowing
            assert "dccp" not in e.stacks and e.stack_name == "udp" and e.rule == "fallback"
            assert first.failed and first._closed and first.client is not None
            assert first.client.ep.closed  # released: no timer, socket closed
            await b.round_trip(b"back on udp")  # the fast path no longer holds the dead stack
            assert b"back on udp" in b.echoes[0].seen
            # a later use_stack(dccp) builds a fresh stack: a new handshake
            b.dp.switch(b.key, "dccp", rule="t")
            assert e.active is not first and isinstance(e.active, DccpStack)
            await b.round_trip(b"on dccp 2")
            assert e.failures == 1
        finally:
            b.close()
    asyncio.run(main())


def test_stack_error_event_passes_the_rule_checker() -> None:
    src = ('rule dccp_down: on stack.error if fatal == true and failed_stack == "dccp" '
           'and remote == true and stack == "udp" then log("dccp failed", reason)\n')
    diags = check(parse_rules(src))
    assert not [d for d in diags if d.severity == "error"], diags
    bad = check(parse_rules('rule r: on stack.error if nope == 1 then log("x")\n'))
    assert [d for d in bad if d.severity == "error"]  # the schema is really consulted


def test_one_cached_stack_per_name_superseded_ones_are_closed(monkeypatch: Any) -> None:
    monkeypatch.setattr(engine_mod, "RETIRE_S", 0.05)

    async def main() -> None:
        b = await Bed().start()
        try:
            await b.round_trip(b"a")
            b.dp.switch(b.key, "dccp")
            await b.round_trip(b"b")
            b.dp.switch(b.key, "udp")
            e = b.engine()
            dccp = e.stacks["dccp"]
            udp = e.active
            assert set(e.stacks) == {"udp", "dccp"}
            # the same options again: the cached one; other options: a fresh one
            b.dp.switch(b.key, "dccp")
            assert e.active is dccp
            b.dp.switch(b.key, "dccp", {"queue": 7})
            dccp2 = e.active
            assert dccp2 is not dccp and e.stacks["dccp"] is dccp2 and dccp in e.retiring
            await _until(lambda: dccp not in e.retiring)
            assert dccp._closed
            b.dp.switch(b.key, "udp")
            assert e.active is udp
            # retarget: the udp stack for the old target and the dccp stack built for the
            # old NAT mapping are superseded, and closed
            b.dp.retarget(b.key, LO, b.ports[1])
            assert set(e.stacks) == {"udp"} and e.active is not udp
            await _until(lambda: not e.retiring)
            assert dccp2._closed and udp._sock is None
            await b.round_trip(b"c")
            assert b"c" in b.echoes[1].seen
            po, _bo, pi, _bi, _dr = e.totals()  # closed stacks' counters are kept
            assert po == 3 and pi == 3
        finally:
            b.close()
    asyncio.run(main())


def test_loss_is_per_interval() -> None:
    async def main() -> None:
        b = await Bed().start()
        try:
            await b.round_trip(b"x")
            b.dp.switch(b.key, "dccp")
            await b.round_trip(b"y")
            e = b.engine()
            st = e.active
            st.refresh_metrics = lambda: None  # keep the figures this test sets
            losses = []
            for sent, lost in ((100, 10), (100, 0), (50, 25)):
                st.metrics.packets_out += sent
                st.metrics.lost += lost
                b.dp.tick()
                (m,) = [ev for ev in b.events if ev.type == "flow.metrics"]
                b.events.clear()
                losses.append(m.fields["loss"])
            assert losses[1] == 0.0 and losses[2] == 0.5
            assert 0.09 < losses[0] <= 0.1
        finally:
            b.close()
    asyncio.run(main())


def _frags4(src: str, dst: str, sport: int, dport: int, payload: bytes,
            ident: int) -> list[bytes]:
    whole = build_udp(src, dst, sport, dport, payload, ident=ident)[20:]
    cuts = [0, 1480, 2960, len(whole)]
    return [build_ipv4(src, dst, 17, whole[a:b], ident=ident, mf=b < len(whole),
                       frag_offset=a) for a, b in itertools.pairwise(cuts)]


def _frags6(src: str, dst: str, sport: int, dport: int, payload: bytes,
            ident: int) -> list[bytes]:
    whole = build_udp(src, dst, sport, dport, payload)[40:]
    cuts = [0, 1232, 2464, len(whole)]
    return [build_ipv6(src, dst, 44, struct.pack("!BBHI", 17, 0, a | (b < len(whole)), ident)
                       + whole[a:b]) for a, b in itertools.pairwise(cuts)]


def test_fragments_are_reassembled_and_go_through_the_flows_stack_and_nat() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        tr4, echo4 = await loop.create_datagram_endpoint(Echo, local_addr=(LO, 0))
        tr6, echo6 = await loop.create_datagram_endpoint(Echo, local_addr=("::1", 0))
        p4, p6 = tr4.get_extra_info("sockname")[1], tr6.get_extra_info("sockname")[1]
        cfg = Config()
        cfg.vnic.fwmark = 0
        cfg.execution.metrics_interval_s = 60.0
        # virtual destinations, NAT-mapped to the loopback echoes
        cfg.nat["192.0.2.9:7"] = {"udp": Target(LO, p4)}
        cfg.nat["[2001:db8::9]:7"] = {"udp": Target("::1", p6)}
        app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        app.setblocking(False)
        for s in (app, tun):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        dp = Datapath(cfg)
        dp.attach(tun.fileno(), loop)
        got: list[bytes] = []

        def readable() -> None:
            while True:
                try:
                    got.append(app.recv(65535))
                except BlockingIOError:
                    return
        loop.add_reader(app.fileno(), readable)
        try:
            big4, big6 = bytes(range(256)) * 14, bytes(reversed(range(256))) * 13
            frags = _frags4(APP, "192.0.2.9", 41000, 7, big4, 77)
            for f in reversed(frags):  # any order
                app.send(f)
            await _until(lambda: echo4.seen == [big4])
            await _until(lambda: len(got) == 1)
            r = parse(got[0])
            assert (r.src, r.dst) == ("192.0.2.9", APP) and r.payload(got[0]) == big4
            for f in _frags6("fd00::1", "2001:db8::9", 41001, 7, big6, 78):
                app.send(f)
            await _until(lambda: echo6.seen == [big6])
            # an incomplete datagram is held, then timed out and counted
            app.send(_frags4(APP, "192.0.2.9", 41002, 7, big4, 79)[0])
            await _until(lambda: dp.stats()["fragments"] == 7)
            assert len(dp.reassembler) == 1
            dp.tick(now_mono=loop.time() + 10 ** 6)
            stats = dp.stats()
            assert stats["reassembled"] == 2 and stats["fragments_dropped"] == 1
            assert len(dp.reassembler) == 0
            assert {f.stack for f in dp.flows()} == {"udp"}
        finally:
            loop.remove_reader(app.fileno())
            dp.close()
            tr4.close()
            tr6.close()
    asyncio.run(main())


class _PickDccp:
    """A selector that puts every new flow on a DCCP stack that cannot open."""

    def decide(self, event: Event, now: float) -> Decision:
        return Decision(stack="dccp", rule="pick", options={"transport": "sctp"})


def test_a_new_flow_whose_stack_fails_to_open_uses_the_default_stack() -> None:
    async def main() -> None:
        b = await Bed(_PickDccp()).start()
        try:
            await b.round_trip(b"first")  # carried by udp, not raw, not dropped
            e = b.engine()
            assert e.stack_name == "udp" and e.rule == "fallback"
            assert "dccp" not in e.stacks
            assert b.echoes[0].seen == [b"first"]
        finally:
            b.close()
    asyncio.run(main())

"""The datapath in-process, without root: a datagram socketpair stands in for the TUN (it
keeps packet boundaries, and ``os.read``/``os.write`` work on it the same way), the UDP
stack talks to real echo servers on loopback. Exercises the fast path, the GSO batches,
the slow path, NAT retargeting, the Actuator, metrics and idle events, and bad input.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.aio import Echo
from vstack.analysis.flowkey import FlowKey
from vstack.analysis.packet import build_tcp, build_udp, parse, verify_l4_checksum
from vstack.config import Config
from vstack.datapath import Datapath, FlowNotFound
from vstack.decision.events import EVENT_SCHEMA, Event
from vstack.execution.engine import EngineError
from vstack.execution.selector import Decision

APP4, APP6 = "10.0.0.1", "fd00::1"


class Harness:
    """The application side of the socketpair. Replies are collected as they arrive (the
    pair's buffer is small without root: an unread queue would overflow)."""

    def __init__(self, dp: Datapath, app: socket.socket) -> None:
        self.dp = dp
        self.app = app
        self.got: list[bytes] = []
        asyncio.get_running_loop().add_reader(app.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                self.got.append(self.app.recv(65535))
            except BlockingIOError:
                return

    def send(self, pkt: bytes) -> None:
        self.app.send(pkt)

    async def replies(self, n: int, timeout: float = 5.0) -> list[bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.got) < n and loop.time() < deadline:
            await asyncio.sleep(0.005)
        out, self.got = self.got[:n], self.got[n:]
        return out


async def _setup(family: int = 4, selector: Any = None, **execution: Any) -> tuple[
        Harness, list[Echo], list[int]]:
    loop = asyncio.get_running_loop()
    host = "127.0.0.1" if family == 4 else "::1"
    echoes, ports = [], []
    for _ in range(2):
        tr, proto = await loop.create_datagram_endpoint(Echo, local_addr=(host, 0))
        echoes.append(proto)
        ports.append(tr.get_extra_info("sockname")[1])
    cfg = Config()
    cfg.vnic.fwmark = 0  # SO_MARK needs CAP_NET_ADMIN; loopback needs no bypass
    for k, v in execution.items():
        setattr(cfg.execution, k, v)
    app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    app.setblocking(False)
    for s in (app, tun):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    dp = Datapath(cfg, selector)
    dp.attach(tun.fileno(), loop)
    h = Harness(dp, app)
    h._keep = tun  # type: ignore[attr-defined]
    return h, echoes, ports


def _check_reply(pkt: bytes, src: str, sport: int, dst: str, dport: int, payload: bytes) -> None:
    p = parse(pkt)
    assert (p.src, p.dst) == (src, dst)
    assert p.l4 is not None and (p.l4.sport, p.l4.dport) == (sport, dport)  # type: ignore[union-attr]
    assert p.payload(pkt) == payload
    assert verify_l4_checksum(pkt)


@pytest.mark.parametrize("family", [4, 6])
def test_udp_round_trip_fast_path_and_checksums(family: int) -> None:
    async def main() -> None:
        h, echoes, ports = await _setup(family)
        app = APP4 if family == 4 else APP6
        srv = "127.0.0.1" if family == 4 else "::1"
        payloads = [bytes([i % 256]) * (1 + (i * 53) % 1400) for i in range(300)]
        for i, pl in enumerate(payloads):
            h.send(build_udp(app, srv, 40000, ports[0], pl))
            if i % 10 == 9:
                await asyncio.sleep(0.002)
        got = await h.replies(len(payloads))
        assert len(got) == len(payloads)
        for pkt, pl in zip(got, payloads, strict=True):
            _check_reply(pkt, srv, ports[0], app, 40000, pl)
        s = h.dp.stats()
        assert s["flows_created"] == 1 and s["slow_packets"] == 1
        assert s["fast_packets"] == len(payloads) - 1
        assert echoes[0].seen == payloads
        h.dp.close()
    asyncio.run(main())


def test_equal_size_runs_go_as_one_batch_and_keep_boundaries() -> None:
    async def main() -> None:
        h, echoes, ports = await _setup(batch=64)
        payloads = [i.to_bytes(4, "big") * 150 for i in range(120)]
        h.send(build_udp(APP4, "127.0.0.1", 40001, ports[0], b"first"))
        assert len(await h.replies(1)) == 1
        for pl in payloads:  # queued in the socketpair: the reader sees runs of 64
            h.send(build_udp(APP4, "127.0.0.1", 40001, ports[0], pl))
        got = await h.replies(len(payloads))
        assert [parse(p).payload(p) for p in got] == payloads
        assert echoes[0].seen[1:] == payloads
        assert h.dp.stats()["batched"] >= 1
        h.dp.close()
    asyncio.run(main())


def test_retarget_and_switch_back_lose_nothing() -> None:
    async def main() -> None:
        h, echoes, ports = await _setup()
        key = FlowKey(17, APP4, 40002, "127.0.0.1", ports[0])
        sent = []
        for i in range(300):
            if i in (100, 200):
                # the switch applies between two packets *the datapath reads*: let it
                # read what the app queued so far
                while h.dp.stats()["rx_packets"] < i:
                    await asyncio.sleep(0.001)
                h.dp.retarget(key, "127.0.0.1", ports[1 if i == 100 else 0], rule="test")
            pl = i.to_bytes(4, "big")
            sent.append(pl)
            h.send(build_udp(APP4, "127.0.0.1", 40002, ports[0], pl))
            if i % 10 == 0:
                await asyncio.sleep(0.002)
        got = await h.replies(300)
        assert sorted(parse(p).payload(p) for p in got) == sent
        for p in got:  # replies always come from the address the app talked to
            _check_reply(p, "127.0.0.1", ports[0], APP4, 40002, parse(p).payload(p))
        a, b = echoes[0].seen, echoes[1].seen
        assert not set(a) & set(b) and sorted(a + b) == sent
        assert b == sent[100:200]
        info = {str(f.key): f for f in h.dp.flows()}[str(key)]
        assert info.packets_out == 300 and info.packets_in == 300 and info.rule == "test"
        h.dp.close()
    asyncio.run(main())


def test_actuator_errors_are_clear() -> None:
    async def main() -> None:
        h, _, ports = await _setup()
        key = FlowKey(17, APP4, 40003, "127.0.0.1", ports[0])
        with pytest.raises(FlowNotFound):
            h.dp.switch(key, "udp")
        h.send(build_udp(APP4, "127.0.0.1", 40003, ports[0], b"x"))
        assert len(await h.replies(1)) == 1
        with pytest.raises(EngineError, match="unknown stack 'nope'"):
            h.dp.switch(key, "nope")
        with pytest.raises(ValueError, match="not an IP address"):
            h.dp.retarget(key, "example", 1)
        with pytest.raises(ValueError, match="not an IPv4"):
            h.dp.retarget(key, "::1", 1)
        with pytest.raises(ValueError, match="dscp"):
            h.dp.set_dscp(key, 99)
        h.dp.set_dscp(key, 46)
        h.dp.drop(key)
        h.send(build_udp(APP4, "127.0.0.1", 40003, ports[0], b"y"))
        assert await h.replies(1, timeout=0.3) == []
        assert [f.stack for f in h.dp.flows()] == ["drop"]
        h.dp.switch(key, "udp")  # and back
        h.send(build_udp(APP4, "127.0.0.1", 40003, ports[0], b"z"))
        assert len(await h.replies(1)) == 1
        h.dp.close()
    asyncio.run(main())


def test_metrics_and_idle_events() -> None:
    async def main() -> None:
        h, _, ports = await _setup(idle_timeout_s=0.2, metrics_interval_s=60.0)
        events: list[Event] = []
        h.dp.metrics_listeners.append(events.append)
        for _ in range(5):
            h.send(build_udp(APP4, "127.0.0.1", 40004, ports[0], b"m" * 100))
        assert len(await h.replies(5)) == 5
        h.dp.tick()
        (m,) = [e for e in events if e.type == "flow.metrics"]
        assert set(m.fields) == set(EVENT_SCHEMA["flow.metrics"])
        assert m.fields["packets"] == 10 and m.fields["bytes"] == 1000
        assert m.fields["stack"] == "udp" and m.fields["dport"] == ports[0]
        await asyncio.sleep(0.3)
        h.dp.tick()
        (idle,) = [e for e in events if e.type == "flow.idle"]
        assert set(idle.fields) == set(EVENT_SCHEMA["flow.idle"])
        assert h.dp.stats()["flows"] == 0 and h.dp.stats()["flows_expired"] == 1
        h.dp.close()
    asyncio.run(main())


def test_selector_decides_before_the_first_packet_leaves() -> None:
    class Sel:
        def __init__(self) -> None:
            self.events: list[Event] = []
            self.drop_port = 0

        def decide(self, event: Event, now: float) -> Decision:
            self.events.append(event)
            if event.fields["dport"] == self.drop_port:
                return Decision(drop=True, rule="no")
            raise RuntimeError("selector bug")

    async def main() -> None:
        sel = Sel()
        h, echoes, ports = await _setup(selector=sel)
        sel.drop_port = ports[1]
        h.send(build_udp(APP4, "127.0.0.1", 40005, ports[1], b"dropped"))
        h.send(build_udp(APP4, "127.0.0.1", 40005, ports[0], b"fallback"))
        assert len(await h.replies(1)) == 1
        assert echoes[1].seen == [] and echoes[0].seen == [b"fallback"]
        assert [e.type for e in sel.events] == ["flow.new", "flow.new"]
        assert set(sel.events[0].fields) == set(EVENT_SCHEMA["flow.new"])
        assert h.dp.stats()["decide_errors"] == 1
        h.dp.close()
    asyncio.run(main())


def test_tcp_without_raw_socket_is_dropped_not_crashed() -> None:
    async def main() -> None:
        h, _, ports = await _setup()
        h.send(build_tcp(APP4, "127.0.0.1", 40006, ports[0], b"", flags="S"))
        await asyncio.sleep(0.05)
        s = h.dp.stats()
        assert s["rx_packets"] == 1 and s["errors"] == 0
        h.dp.close()
    if os.geteuid() == 0:
        pytest.skip("as root the raw socket exists and the packet leaves")
    asyncio.run(main())


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=120), min_size=1, max_size=20))
def test_any_bytes_are_counted_never_raised(blobs: list[bytes]) -> None:
    async def main() -> None:
        h, _, ports = await _setup()
        # a live flow, so garbage that happens to carry its 5-tuple meets the fast path
        h.send(build_udp(APP4, "127.0.0.1", 40007, ports[0], b"live"))
        await h.replies(1)
        for b in blobs:
            h.send(b if b else b"\x00")
        await asyncio.sleep(0.02)
        s = h.dp.stats()
        assert s["rx_packets"] == len(blobs) + 1
        assert s["errors"] == 0
        h.dp.close()
    asyncio.run(main())


def test_packet_tap_sees_both_directions() -> None:
    async def main() -> None:
        h, _, ports = await _setup()
        seen: list[tuple[str, bytes]] = []
        h.dp.tap = lambda pkt, now, d: seen.append((d, bytes(pkt)))
        out = build_udp(APP4, "127.0.0.1", 40008, ports[0], b"tapped")
        h.send(out)
        (back,) = await h.replies(1)
        assert seen == [("app->net", out), ("net->app", back)]
        h.dp.close()
    asyncio.run(main())

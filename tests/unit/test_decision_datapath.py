"""The rule engine on the real Datapath (in-process, no root: a datagram socketpair stands
in for the TUN, the UDP stack talks to an echo server on loopback), wired as the daemon
wires it: the engine is the selector and the Datapath its actuator, flow.metrics go to
``engine.submit``, ``vstack switch`` goes through the control socket's handler."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from tests.aio import Echo, until
from vstack.analysis.flowkey import FlowKey
from vstack.analysis.packet import build_udp, parse
from vstack.config import Config
from vstack.control import actuator_handlers
from vstack.datapath import Datapath
from vstack.decision.engine import DecisionEngine
from vstack.decision.events import Event
from vstack.decision.parser import parse_rules

APP = "10.0.0.1"


async def _until(cond: Any) -> None:
    await until(cond, timeout=5.0)


def test_rule_switches_back_a_flow_moved_by_vstack_switch() -> None:
    """``vstack switch`` moves the flow udp -> udplite behind the engine's back; the next
    flow.metrics runs ``use_stack(udp)``, which must really switch it back (the engine
    used to think the flow was still on udp and skipped it as a no-op)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tr, echo = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        port = tr.get_extra_info("sockname")[1]
        cfg = Config()
        cfg.vnic.fwmark = 0  # SO_MARK needs CAP_NET_ADMIN; loopback needs no bypass
        cfg.execution.metrics_interval_s = 3600.0  # ticks only when the test calls tick()
        engine = DecisionEngine(parse_rules("""
            rule start: on flow.new if proto == "udp" then use_stack(udp)
            rule back: on flow.metrics then use_stack(udp)
        """, "t.rules"), None, None, backend="reference")
        dp = Datapath(cfg, engine)
        engine.actuator = dp

        def on_event(ev: Event) -> None:
            engine.submit(ev, ev.time)

        dp.metrics_listeners.append(on_event)
        app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        app.setblocking(False)
        dp.attach(tun.fileno(), loop)
        got: list[bytes] = []

        def readable() -> None:
            while True:
                try:
                    got.append(app.recv(65535))
                except BlockingIOError:
                    return

        loop.add_reader(app.fileno(), readable)
        key = FlowKey(17, APP, 40100, "127.0.0.1", port)
        try:
            app.send(build_udp(APP, "127.0.0.1", 40100, port, b"one"))
            await _until(lambda: len(got) == 1)
            info = dp.flow_info(key)
            assert info is not None and (info.stack, info.rule) == ("udp", "start")
            assert dp.flow_info(FlowKey(17, APP, 1, "127.0.0.1", 1)) is None

            actuator_handlers(dp)["switch"]({"flow": str(key), "stack": "udplite"})
            info = dp.flow_info(key)
            assert info is not None and (info.stack, info.rule) == ("udplite", "cli")
            assert [f.stack for f in dp.flows()] == ["udplite"]
            app.send(build_udp(APP, "127.0.0.1", 40100, port, b"two"))  # some activity
            await _until(lambda: dp.stats()["rx_packets"] == 2)

            dp.tick()  # flow.metrics (stack: udplite) -> rule back -> use_stack(udp)
            info = dp.flow_info(key)
            assert info is not None and (info.stack, info.rule) == ("udp", "back")
            assert engine.stats["fired:back"] == 1 and engine.stats["action_errors"] == 0
            app.send(build_udp(APP, "127.0.0.1", 40100, port, b"three"))
            await _until(lambda: len(got) == 2)
            assert parse(got[1]).payload(got[1]) == b"three"
            assert echo.seen[-1] == b"three"
        finally:
            loop.remove_reader(app.fileno())
            dp.close()
            engine.close()
            tr.close()
            app.close()
            tun.close()

    asyncio.run(main())

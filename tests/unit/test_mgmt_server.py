"""The management UDP port on 127.0.0.1: signed messages reach the engine, others do not."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import pytest

from vstack.decision.events import Event
from vstack.management.auth import Verifier, sign
from vstack.management.server import ManagementServer, RateLimiter

KEY = b"test-key-0123456789abcdef"
FLOW = "udp:10.0.0.1:5000->10.201.1.2:9000"


async def _until(cond, what: str) -> None:
    for _ in range(1000):  # safety net only, not a timing assertion
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def _send(addr: tuple[str, int], data: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(data, addr)


def test_signed_reaches_submit_forged_does_not(caplog: pytest.LogCaptureFixture) -> None:
    got: list[Event] = []

    async def main() -> dict[str, int]:
        loop = asyncio.get_running_loop()
        srv = ManagementServer(loop, ("127.0.0.1", 0), Verifier(KEY), got.append)
        await srv.start()
        try:
            addr = srv.address
            forged = json.loads(sign({"type": "switch", "flow": FLOW, "stack": "dccp"}, KEY,
                                     time.time()))
            forged["stack"] = "tcp"
            _send(addr, json.dumps(forged).encode())
            _send(addr, sign({"type": "switch", "flow": FLOW, "stack": "dccp"}, b"wrong-key",
                             time.time()))
            _send(addr, b"garbage")
            good = sign({"type": "switch", "flow": FLOW, "stack": "dccp"}, KEY, time.time())
            _send(addr, good)
            _send(addr, good)  # replay
            await _until(lambda: sum(srv.counters.values()) >= 5, "five datagrams handled")
            return srv.counters
        finally:
            srv.close()

    with caplog.at_level(logging.WARNING, logger="vstack.management"):
        counters = asyncio.run(main())
    assert [(e.type, e.fields["stack"], str(e.flow)) for e in got] == [
        ("mgmt.switch", "dccp", FLOW)]
    assert counters == {"accepted": 1, "malformed": 1, "unauthenticated": 2, "stale": 0,
                        "replayed": 1, "submit_errors": 0}
    rejections = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejections) == 4
    assert any("replayed" in r.getMessage() for r in rejections)


def test_submit_exception_is_counted_and_port_keeps_serving() -> None:
    calls: list[Event] = []

    def bad_submit(ev: Event) -> None:
        calls.append(ev)
        raise RuntimeError("engine broke")

    async def main() -> dict[str, int]:
        srv = ManagementServer(asyncio.get_running_loop(), ("127.0.0.1", 0), Verifier(KEY),
                               bad_submit)
        await srv.start()
        try:
            for level in (0.1, 0.2):
                _send(srv.address, sign({"type": "congestion", "link": "l", "level": level},
                                        KEY, time.time()))
            await _until(lambda: len(calls) == 2, "two submits")
            return srv.counters
        finally:
            srv.close()

    counters = asyncio.run(main())
    assert counters["accepted"] == 2 and counters["submit_errors"] == 2


def test_rate_limiter_suppresses_and_reports() -> None:
    rl = RateLimiter(burst=3, interval_s=10)
    assert [rl.allow(0.0)[0] for _ in range(5)] == [True, True, True, False, False]
    assert rl.allow(10.0) == (True, 2)  # new window; reports the two suppressed lines
    assert rl.allow(10.5) == (True, 0)


def test_cli_mgmt_send_produces_an_accepted_message() -> None:
    from typer.testing import CliRunner

    from vstack.cli.app import app
    from vstack.management.auth import Accepted

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(10)
        port = rx.getsockname()[1]
        r = CliRunner().invoke(app, ["mgmt", "send", "--key", KEY.decode(), "--to",
                                     f"127.0.0.1:{port}", "switch", f"flow={FLOW}",
                                     "stack=dccp"])
        assert r.exit_code == 0, r.output
        data = rx.recv(65536)
    out = Verifier(KEY).verify(data, time.time())
    assert isinstance(out, Accepted)
    assert out.event.type == "mgmt.switch" and out.event.fields["stack"] == "dccp"
    r = CliRunner().invoke(app, ["mgmt", "send", "--to", "127.0.0.1:1", "congestion"],
                           env={"VSTACK_MGMT_KEY": ""})
    assert r.exit_code == 1 and "no key" in r.output


def test_from_config() -> None:
    from types import SimpleNamespace

    async def main() -> None:
        loop = asyncio.get_running_loop()
        off = SimpleNamespace(listen="", key="", max_skew_s=30.0)
        assert ManagementServer.from_config(loop, off, lambda e: None) is None
        with pytest.raises(ValueError, match="key"):
            ManagementServer.from_config(loop, SimpleNamespace(listen="127.0.0.1:0", key="",
                                                               max_skew_s=30.0), print)
        got: list[Event] = []
        srv = ManagementServer.from_config(
            loop, SimpleNamespace(listen="127.0.0.1:0", key=KEY.decode(), max_skew_s=5.0),
            got.append)
        assert srv is not None and srv.verifier.max_skew_s == 5.0
        await srv.start()
        try:
            _send(srv.address, sign({"type": "congestion", "link": "l", "level": 0.9}, KEY,
                                    time.time()))
            await _until(lambda: len(got) == 1, "accepted")
        finally:
            srv.close()
        assert got[0].fields["level"] == 0.9

    asyncio.run(main())

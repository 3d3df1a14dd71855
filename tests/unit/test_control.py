"""The control socket: a real unix socket in a temp dir, the daemon's handlers faked."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from vstack.analysis.flowkey import FlowKey
from vstack.cli.app import app
from vstack.cli.control import parse_field, parse_hostport
from vstack.control import (
    ControlClient,
    ControlError,
    ControlServer,
    DaemonNotRunning,
    flows_result,
)
from vstack.execution.selector import FlowInfo

FLOW = "udp:10.0.0.1:5000->10.201.1.2:9000"
KEY = FlowKey.parse(FLOW)


class FakeDaemon:
    """The handlers the daemon registers, over an in-memory flow table."""

    def __init__(self) -> None:
        self.stacks = {KEY: "udp"}
        self.switched: list[tuple[str, str]] = []
        self.reloads = 0

    def flows(self, params: dict[str, Any]) -> Any:
        infos = [FlowInfo(key=k, stack=s, interface="veth-a", target="10.201.1.2:9000",
                          packets_out=12, packets_in=7, bytes_out=1200, bytes_in=700,
                          rule="loss_to_dccp", created=1.0, last_seen=2.0)
                 for k, s in self.stacks.items()]
        self.limits = [*getattr(self, "limits", []), params.get("limit")]
        return flows_result(infos, log_dropped=3, limit=params.get("limit"))

    def why(self, params: dict[str, Any]) -> Any:
        key = FlowKey.parse(params["flow"])
        if key not in self.stacks:
            raise KeyError(f"no such flow: {key}")
        return [{"time": 1732838400.5, "rule": "start_udp", "stack": "udp",
                 "facts": {"proto": "udp", "dport": 9000}},
                {"time": 1732838405.5, "rule": "loss_to_dccp", "stack": "dccp",
                 "facts": {"loss": 0.05}, "event": "flow.metrics"}]

    def switch(self, params: dict[str, Any]) -> Any:
        key = FlowKey.parse(params["flow"])
        if params["stack"] not in ("udp", "dccp"):
            raise ValueError(f"unknown stack {params['stack']!r}")
        self.stacks[key] = params["stack"]
        self.switched.append((str(key), params["stack"]))
        return {"stack": params["stack"]}

    async def rules_reload(self, params: dict[str, Any]) -> Any:
        await asyncio.sleep(0)
        self.reloads += 1
        return {"version": f"v{self.reloads}", "rules": 4}

    def stats(self, params: dict[str, Any]) -> Any:
        return {"mgmt": {"accepted": 2, "replayed": 1}, "flows": len(self.stacks)}

    def handlers(self) -> dict[str, Any]:
        return {"flows": self.flows, "why": self.why, "switch": self.switch,
                "rules_reload": self.rules_reload, "stats": self.stats}


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vsctl", dir="/tmp")  # short: AF_UNIX paths are <= 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Running:
    """A ControlServer on its own loop in a helper thread, so the sync client and the CLI
    can be exercised from the test thread."""

    def __init__(self, path: str, handlers: dict[str, Any]) -> None:
        self.server = ControlServer(path, handlers)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def daemon(sockdir: str) -> Iterator[tuple[str, FakeDaemon]]:
    fake = FakeDaemon()
    path = os.path.join(sockdir, "control.sock")
    with Running(path, fake.handlers()):
        yield path, fake


def test_socket_mode_0600_and_removed_on_close(sockdir: str) -> None:
    path = os.path.join(sockdir, "sub", "control.sock")
    with Running(path, {}):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
    assert not os.path.exists(path)


def test_calls_and_results(daemon: tuple[str, FakeDaemon]) -> None:
    path, fake = daemon
    c = ControlClient(path)
    flows = c.call("flows")
    assert flows["log_dropped"] == 3
    assert flows["flows"][0]["flow"] == FLOW
    assert flows["flows"][0]["packets_out"] == 12
    assert c.call("switch", flow=FLOW, stack="dccp") == {"stack": "dccp"}
    assert fake.switched == [(FLOW, "dccp")]
    assert c.call("rules_reload") == {"version": "v1", "rules": 4}
    assert c.call("why", flow=FLOW)[1]["rule"] == "loss_to_dccp"


def test_handler_errors_and_unknown_methods_are_error_responses(
        daemon: tuple[str, FakeDaemon]) -> None:
    path, _ = daemon
    c = ControlClient(path)
    with pytest.raises(ControlError, match="unknown stack") as ei:
        c.call("switch", flow=FLOW, stack="carrier-pigeon")
    assert ei.value.kind == "ValueError"
    with pytest.raises(ControlError, match="unknown method 'nope'"):
        c.call("nope")
    with pytest.raises(ControlError, match="no such flow"):
        c.call("why", flow="udp:1.2.3.4:1->5.6.7.8:2")
    assert c.call("stats")["flows"] == 1  # the server survived all of that


def test_raw_protocol_several_requests_and_bad_lines(daemon: tuple[str, FakeDaemon]) -> None:
    path, _ = daemon
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b'{"id": 7, "method": "stats"}\nnot json\n[1]\n'
                  b'{"id": 8, "method": "switch", "params": {"flow": "' + FLOW.encode()
                  + b'", "stack": "dccp"}}\n')
        f = s.makefile("rb")
        lines = [json.loads(f.readline()) for _ in range(4)]
    assert lines[0]["id"] == 7 and lines[0]["ok"] is True
    assert lines[1]["ok"] is False and lines[1]["error"]["type"] == "BadRequest"
    assert lines[2]["ok"] is False and lines[2]["error"]["type"] == "BadRequest"
    assert lines[3] == {"id": 8, "ok": True, "result": {"stack": "dccp"}}


def test_daemon_not_running(sockdir: str) -> None:
    with pytest.raises(DaemonNotRunning, match="not running"):
        ControlClient(os.path.join(sockdir, "absent.sock")).call("flows")
    # A stale socket file (its daemon died) reads the same.
    stale = os.path.join(sockdir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()
    with pytest.raises(DaemonNotRunning):
        ControlClient(stale).call("flows")


def test_stale_socket_replaced_live_one_refused(sockdir: str) -> None:
    path = os.path.join(sockdir, "control.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # stale
    with Running(path, {"stats": lambda p: {"n": 1}}):
        assert ControlClient(path).call("stats") == {"n": 1}
        second = ControlServer(path, {})
        with pytest.raises(OSError, match="another vstack daemon"):
            asyncio.run(second.start())
        assert ControlClient(path).call("stats") == {"n": 1}  # the first one still serves


def test_not_a_socket_is_left_alone(sockdir: str) -> None:
    path = os.path.join(sockdir, "file")
    with open(path, "w") as fh:
        fh.write("precious")
    with pytest.raises(OSError, match="not a socket"):
        asyncio.run(ControlServer(path, {}).start())
    with open(path) as fh:
        assert fh.read() == "precious"


runner = CliRunner()


def test_cli_flows_table(daemon: tuple[str, FakeDaemon]) -> None:
    path, _ = daemon
    r = runner.invoke(app, ["flows", "--socket", path])
    assert r.exit_code == 0, r.output
    assert FLOW in r.output
    assert "loss_to_dccp" in r.output and "veth-a" in r.output
    assert "3 records dropped" in r.output


def test_cli_flows_limit_and_truncation_warning(daemon: tuple[str, FakeDaemon]) -> None:
    path, fake = daemon
    r = runner.invoke(app, ["flows", "--socket", path])
    assert r.exit_code == 0 and "flows shown" not in r.output
    r = runner.invoke(app, ["flows", "--socket", path, "--limit", "0"])
    assert r.exit_code == 0, r.output
    assert "0 of 1 flows shown" in r.output and FLOW not in r.output
    assert fake.limits[-2:] == [10_000, 0]


def test_cli_why_switch_reload_stats(daemon: tuple[str, FakeDaemon]) -> None:
    path, fake = daemon
    r = runner.invoke(app, ["why", FLOW, "--socket", path])
    assert r.exit_code == 0, r.output
    assert "start_udp" in r.output and "loss=0.05" in r.output and "flow.metrics" in r.output
    r = runner.invoke(app, ["switch", FLOW, "dccp", "--socket", path])
    assert r.exit_code == 0, r.output
    assert fake.switched == [(FLOW, "dccp")]
    r = runner.invoke(app, ["rules", "reload", "--socket", path])
    assert r.exit_code == 0 and "version=v1" in r.output
    r = runner.invoke(app, ["stats", "--socket", path])
    assert r.exit_code == 0 and "mgmt.replayed" in r.output


def test_cli_errors(daemon: tuple[str, FakeDaemon], sockdir: str) -> None:
    path, fake = daemon
    r = runner.invoke(app, ["switch", FLOW, "bogus", "--socket", path])
    assert r.exit_code == 1 and "unknown stack" in r.output
    r = runner.invoke(app, ["why", "not-a-flow", "--socket", path])
    assert r.exit_code == 1 and "not a flow key" in r.output
    r = runner.invoke(app, ["flows", "--socket", os.path.join(sockdir, "none.sock")])
    assert r.exit_code == 2 and "not running" in r.output
    assert fake.switched == []


def test_cli_helpers() -> None:
    assert parse_hostport("127.0.0.1:7400") == ("127.0.0.1", 7400)
    assert parse_hostport("[::1]:7400") == ("::1", 7400)
    with pytest.raises(ValueError):
        parse_hostport("nohost")
    assert parse_field("level=0.7") == ("level", 0.7)
    assert parse_field("stack=dccp") == ("stack", "dccp")
    assert parse_field(f"flow={FLOW}") == ("flow", FLOW)
    assert parse_field("ok=true") == ("ok", True)
    with pytest.raises(ValueError):
        parse_field("novalue")


class FakeActuator:
    """Stands in for the execution engine (engineer A's), which this code does not own."""

    def __init__(self) -> None:
        self.calls: list[tuple[FlowKey, str, str | None]] = []

    def switch(self, flow: FlowKey, stack: str, options: Any = None, *,
               rule: str | None = None) -> None:
        if flow != KEY:
            raise KeyError(f"no such flow: {flow}")
        self.calls.append((flow, stack, rule))

    def flows(self) -> list[FlowInfo]:
        return [FlowInfo(KEY, "udp", "", "10.201.1.2:9000", 1, 2, 3, 4, "static", 0.0, 0.0)]


def test_actuator_handlers_over_the_socket(sockdir: str) -> None:
    from vstack.control import actuator_handlers

    act = FakeActuator()
    path = os.path.join(sockdir, "c.sock")
    with Running(path, actuator_handlers(act, log_dropped=lambda: 0)):  # type: ignore[arg-type]
        c = ControlClient(path)
        assert c.call("flows") == {"flows": [{
            "flow": FLOW, "stack": "udp", "interface": "", "target": "10.201.1.2:9000",
            "packets_out": 1, "packets_in": 2, "bytes_out": 3, "bytes_in": 4,
            "rule": "static", "created": 0.0, "last_seen": 0.0}], "total": 1,
            "log_dropped": 0}
        capped = c.call("flows", limit=0)
        assert capped["flows"] == [] and capped["total"] == 1 and capped["truncated"]
        assert c.call("switch", flow=FLOW, stack="dccp") == {"flow": FLOW, "stack": "dccp"}
        with pytest.raises(ControlError, match="no such flow"):
            c.call("switch", flow="udp:1.1.1.1:1->2.2.2.2:2", stack="dccp")
        with pytest.raises(ControlError, match="not a flow key"):
            c.call("switch", flow="junk", stack="dccp")
    assert act.calls == [(KEY, "dccp", "cli")]

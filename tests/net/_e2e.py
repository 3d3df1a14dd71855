"""Helpers for the end-to-end netns tests (``test_e2e_*.py``): a real ``vstack run`` in the
edge namespace with a generated config, the CLI against its control socket, and small
application / server programs. No timing assertions anywhere: the tests count datagrams."""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vstack.testbed import Testbed
from vstack.testbed import wait_line as _wait_line

PY = sys.executable
RULES_DIR = Path(__file__).resolve().parents[2] / "rules"

# UDP echo on every ADDR:PORT given; records the sequence numbers (first 4 bytes) each got;
# prints them as JSON on SIGTERM.
ECHO = r"""
import json, select, signal, socket, sys
socks = {}
for spec in sys.argv[1:]:
    host, port = spec.rsplit(":", 1)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((host.strip("[]"), int(port)))
    s.setblocking(False)
    socks[s] = spec
seen = {spec: [] for spec in socks.values()}
def done(*_):
    print(json.dumps(seen), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
print("ready", flush=True)
while True:
    r, _, _ = select.select(list(socks), [], [])
    for s in r:
        while True:
            try:
                data, peer = s.recvfrom(65535)
            except BlockingIOError:
                break
            seen[socks[s]].append(int.from_bytes(data[:4], "big"))
            s.sendto(data, peer)
"""

# A windowed echo client: at most WINDOW datagrams outstanding, RATE per second, from
# source port SPORT. A window that sees no reply for 0.5 s is written off (those datagrams
# are lost) and sending goes on. N = 0: until a line arrives on stdin. Prints "first" after
# the first reply, then a JSON summary.
WCLIENT = r"""
import json, select, socket, sys, time
host, port, n, window, rate, sport = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                      int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]))
if n == 0:  # until a line on stdin
    n = 1 << 30
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", sport))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.settimeout(0.5)
out, got, writeoffs, first = set(), set(), 0, False
sent = 0
nxt = time.monotonic()
while sent < n or out:
    if n == 1 << 30 and select.select([sys.stdin], [], [], 0)[0]:
        sys.stdin.readline()
        n = sent
    while sent < n and len(out) < window and time.monotonic() >= nxt:
        s.sendto(sent.to_bytes(4, "big") + b"v" * 96, (host, port))
        out.add(sent)
        sent += 1
        nxt += 1.0 / rate
    s.settimeout(max(0.001, nxt - time.monotonic()) if sent < n and len(out) < window else 0.5)
    try:
        data = s.recv(2048)
    except socket.timeout:
        if len(out) >= window or sent >= n:
            writeoffs += 1
            out.clear()
        continue
    seq = int.from_bytes(data[:4], "big")
    out.discard(seq)
    got.add(seq)
    if not first:
        first = True
        print("first", flush=True)
print(json.dumps({"sent": sent, "replies": len(got), "writeoffs": writeoffs}), flush=True)
"""

# One datagram from SPORT, wait for its echo.
ONESHOT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[3])))
s.settimeout(5)
s.sendto(b"\x00\x00\x00\x00one", (sys.argv[1], int(sys.argv[2])))
print(s.recv(2048)[4:].decode(), flush=True)
"""

# Paced one-way sender: N datagrams at RATE per second from SPORT; prints "first" once
# started and "sent N" at the end.
PACED = r"""
import socket, sys, time
host, port, n, rate, sport = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                              float(sys.argv[4]), int(sys.argv[5]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", sport))
t0 = time.monotonic()
for i in range(n):
    delay = t0 + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    s.sendto(i.to_bytes(4, "big") + b"p" * 196, (host, port))
    if i == 0:
        print("first", flush=True)
print(f"sent {n}", flush=True)
"""


def tmpdir_short() -> Path:
    """A short directory for unix sockets (sun_path holds 107 bytes)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="vse-", dir="/tmp"))


def wait_line(p: subprocess.Popen[str], needle: str, timeout: float = 30) -> list[str]:
    """The lines of ``p.stdout`` up to the first with ``needle``; fail the test without."""
    lines: list[str] = []
    try:
        _wait_line(p, needle, timeout, lines)
    except RuntimeError as e:
        raise AssertionError(str(e)) from None
    return lines


class Daemon:
    """``vstack run`` inside the edge namespace with a generated TOML config; the CLI talks
    to it over ``control.socket`` in a short temporary directory."""

    def __init__(self, tb: Testbed, tmp: Path, body: str) -> None:
        self.tb = tb
        self.tmp = tmp
        self.socket = str(tmp / "ctl.sock")
        self.name = f"vj{secrets.token_hex(3)}"
        self.cfg = tmp / "vstack.toml"
        self.log = tmp / "daemon.log"
        self.cfg.write_text(f'[vnic]\nname = "{self.name}"\n[control]\nsocket = "{self.socket}"\n'
                            + body)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        self._logf = self.log.open("ab")
        self.proc = self.tb.popen(self.tb.edge, [PY, "-m", "vstack", "run", "--config",
                                                 str(self.cfg)],
                                  stdout=self._logf, stderr=subprocess.STDOUT)
        self.wait_log("vstack ready")
        self.wait_log("control socket listening")
        return self

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_log(self, needle: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.text()
            if needle in t:
                return t
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"daemon log never showed {needle!r}:\n{self.text()[-3000:]}")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([PY, "-m", "vstack", *args, "--socket", self.socket],
                           capture_output=True, text=True, timeout=60, check=False)
        if check and p.returncode != 0:
            raise AssertionError(f"vstack {' '.join(args)}: exit {p.returncode}: "
                                 f"{p.stdout}{p.stderr}\n--- daemon:\n{self.text()[-3000:]}")
        return p

    def call(self, method: str, **params: Any) -> Any:
        """One control-socket request (what the CLI sends, without its start-up time)."""
        from vstack.control import ControlClient

        return ControlClient(self.socket).call(method, **params)

    def flows(self, cli: bool = False) -> list[dict[str, Any]]:
        """The daemon's flows: through ``vstack flows --json`` with ``cli``."""
        res = json.loads(self.cli("flows", "--json").stdout) if cli else self.call("flows")
        flows: list[dict[str, Any]] = res["flows"]
        return flows

    def flow(self, sport: int, timeout: float = 20) -> dict[str, Any]:
        """The flow from source port ``sport`` (waits until the daemon has it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for f in self.flows():
                if re.search(rf":{sport}->", f["flow"]):
                    return f
            time.sleep(0.1)
        raise AssertionError(f"no flow from port {sport}: {self.flows()}")

    def wait_flow(self, sport: int, pred: Any, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        f = self.flow(sport, timeout)
        while not pred(f) and time.monotonic() < deadline:
            time.sleep(0.1)
            f = self.flow(sport, timeout)
        return f

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = self.call("stats")
        return s

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc is not None else 0
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(20)
        self._logf.close()
        return rc


def start_echo_peers(tb: Testbed, server: str, udp_port: int = 9000, dccp_port: int = 7001,
                     ) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    """In the server netns: the UDP echo on ``server:udp_port`` and ``vstack serve dccp
    --echo`` on ``dccp_port``, both ready (stop them with ``stop_json`` / ``stop_done``)."""
    echo = tb.popen(tb.server, [PY, "-c", ECHO, f"{server}:{udp_port}"],
                    stdout=subprocess.PIPE, text=True)
    dccp = tb.popen(tb.server, [PY, "-m", "vstack", "serve", "dccp", "--echo", "--port",
                                str(dccp_port), "--bind", server, "--seconds", "170"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_line(echo, "ready")
    wait_line(dccp, "ready")
    return echo, dccp


def stop_json(p: subprocess.Popen[str]) -> Any:
    """SIGTERM a program that prints one JSON line when it stops; return that."""
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=15)
    return json.loads(out.strip().splitlines()[-1])


def stop_done(p: subprocess.Popen[str]) -> int:
    """SIGTERM a ``vstack serve`` server; return its ``done pkts=N``."""
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=15)
    m = re.findall(r"done pkts=(\d+)", out)
    assert m, out[-2000:]
    return int(m[-1])


def finish(app: subprocess.Popen[str]) -> dict[str, Any]:
    """Tell a ``WCLIENT`` started with N = 0 to stop; its summary."""
    assert app.stdin is not None and app.stdout is not None
    app.stdin.write("stop\n")
    app.stdin.flush()
    out, _ = app.communicate(timeout=60)
    res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return res

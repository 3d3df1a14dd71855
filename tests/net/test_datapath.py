"""The datapath end to end: real programs in the edge netns talk through vstack (a real
``vstack run`` process with its TUN) to servers in the server netns over veth.

No timing assertions: every check counts datagrams, replies, bytes and addresses.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.net._e2e import ECHO
from vstack.testbed import Testbed

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


CLIENT = r"""
import json, socket, sys
host, port, n, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pause = int(sys.argv[5]) if len(sys.argv) > 5 else -1  # print "half" at n/2, wait for "go" at 3n/4
fixed = int(sys.argv[6]) if len(sys.argv) > 6 else 0  # every datagram this size (0: varying)
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
dst = (host, port)
maxlen = 1400 if fam == socket.AF_INET6 else 1472
def payload(i):
    size = fixed or 4 + (i * 37) % (maxlen - 4)
    return i.to_bytes(4, "big") + bytes((i + k) & 0xFF for k in range(size - 4))
s = socket.socket(fam, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.settimeout(5)
got = {}
bad = wrong_src = 0
sent = 0
while len(got) < n:
    while sent < n and sent - len(got) < window:
        if pause > 0 and sent == n // 2:
            print("half", flush=True)
        if pause > 0 and sent == 3 * n // 4:
            sys.stdin.readline()
        s.sendto(payload(sent), dst)
        sent += 1
    try:
        data, peer = s.recvfrom(65535)
    except socket.timeout:
        break
    if (peer[0], peer[1]) != dst:
        wrong_src += 1
    seq = int.from_bytes(data[:4], "big")
    if seq >= n or data != payload(seq):
        bad += 1
        continue
    got[seq] = got.get(seq, 0) + 1
print(json.dumps({"sent": sent, "unique": len(got), "dups": sum(v - 1 for v in got.values()),
                  "bad": bad, "wrong_src": wrong_src}), flush=True)
"""


class Daemon:
    """``vstack run`` inside the edge netns, with a config file and a log file."""

    def __init__(self, tb: Testbed, tmp: Path, config: str, name: str = "vstk0") -> None:
        self.tb = tb
        self.cfg = tmp / f"{name}.toml"
        self.log = tmp / f"{name}.log"
        self.cfg.write_text(config)
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        self._logf = self.log.open("ab")
        before = self.text().count("vstack ready")
        self.proc = self.tb.popen(self.tb.edge, [sys.executable, "-m", "vstack", "run",
                                                 "--config", str(self.cfg)],
                                  stdout=self._logf, stderr=subprocess.STDOUT)
        self.wait_log("vstack ready", count=before)
        return self

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_log(self, needle: str, *, count: int = 0,
                 timeout: float = 20) -> str:
        """Wait until the log holds more than ``count`` occurrences of ``needle``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.text()
            if t.count(needle) > count:
                return t
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"daemon log never showed {needle!r}:\n{self.text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(15)
        self._logf.close()
        return rc


def _config(name: str = "vstk0", nat: str = "", extra: str = "") -> str:
    return (f'[vnic]\nname = "{name}"\n[execution]\nmetrics_interval_s = 0.2\n'
            f"idle_timeout_s = 30\n{extra}{nat}")


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    with Testbed(prefix="vt") as tb:
        d = Daemon(tb, tmp, _config()).start()
        l1, l2 = tb.links
        echo = tb.popen(tb.server, [sys.executable, "-c", ECHO, f"{l1.server4}:9000",
                                    f"{l2.server4}:9000", f"[{l1.server6}]:9000"],
                        stdout=subprocess.PIPE, text=True)
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        yield tb, d, tmp
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def _client(tb: Testbed, host: str, n: int, window: int = 64,
            fixed: int = 0) -> dict[str, int]:
    p = tb.run(tb.edge, [sys.executable, "-c", CLIENT, host, "9000", str(n), str(window), "0",
                         str(fixed)], timeout=90)
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_udp_echo_10000_ipv4(bed) -> None:
    tb, d, _ = bed
    r = _client(tb, tb.links[0].server4, 10_000)
    assert r == {"sent": 10_000, "unique": 10_000, "dups": 0, "bad": 0, "wrong_src": 0}
    assert "created: stack=udp target=10.201.1.2:9000" in d.text()


def test_udp_echo_10000_ipv6(bed) -> None:
    tb, d, _ = bed
    r = _client(tb, tb.links[0].server6, 10_000)
    assert r == {"sent": 10_000, "unique": 10_000, "dups": 0, "bad": 0, "wrong_src": 0}
    assert "created: stack=udp target=[fd01:1::2]:9000" in d.text()


def _stat(d: Daemon, name: str) -> int:
    """A datapath counter, summed over the workers (each logs its own ``counters``
    line, ``w0``, ``w1``, ...: the latest of each)."""
    import re

    last: dict[str, int] = {}
    for w, v in re.findall(rf"(w\d+)?\s+\S+: counters .*?{name}=(\d+)", d.text()):
        last[w] = int(v)
    return sum(last.values())


@pytest.mark.parametrize("which", ["server4", "server6"])
def test_equal_size_datagrams_batched_keep_their_boundaries(bed, which: str) -> None:
    # consecutive datagrams of one flow and one size leave as one UDP GSO send; the
    # server must still see each datagram, whole and once
    tb, d, _ = bed
    before = _stat(d, "batched")
    r = _client(tb, getattr(tb.links[0], which), 5000, window=128, fixed=1200)
    assert r == {"sent": 5000, "unique": 5000, "dups": 0, "bad": 0, "wrong_src": 0}
    deadline = time.monotonic() + 5
    while _stat(d, "batched") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _stat(d, "batched") > before


@pytest.mark.parametrize("which", ["server4", "server6"])
def test_ping_through_raw_stack(bed, which: str) -> None:
    tb, d, _ = bed
    addr = getattr(tb.links[1], which)
    p = tb.run(tb.edge, ["ping", "-c", "3", "-i", "0.2", "-W", "2", addr], check=False)
    assert " 0% packet loss" in p.stdout, p.stdout + p.stderr
    proto = "icmp6" if which == "server6" else "icmp"
    d.wait_log(f"flow {proto}:")
    assert "stack=raw" in d.text()


@pytest.mark.parametrize("which", ["server4", "server6"])
def test_http_get_through_raw_stack(bed, which: str, tmp_path) -> None:
    tb, d, _ = bed
    (tmp_path / "hello.txt").write_text("hello through vstack\n" * 500)
    port = 8080 if which == "server4" else 8081
    srv = tb.popen(tb.server, [sys.executable, "-m", "http.server", str(port), "--bind", "::",
                               "--directory", str(tmp_path)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        addr = getattr(tb.links[0], which)
        host = f"[{addr}]" if ":" in addr else addr
        code = ("import urllib.request, time, sys\n"
                "for i in range(50):\n"
                "    try:\n"
                f"        body = urllib.request.urlopen('http://{host}:{port}/hello.txt',"
                " timeout=5).read(); break\n"
                "    except (ConnectionRefusedError, urllib.error.URLError):\n"
                "        time.sleep(0.1)\n"
                "sys.stdout.write(body.decode())\n")
        p = tb.run(tb.edge, [sys.executable, "-c", code], timeout=60)
        assert p.stdout == "hello through vstack\n" * 500
        assert f"tcp:{'[fd56:5354::1]' if ':' in addr else '198.18.0.1'}:" in d.text()
    finally:
        srv.terminate()
        srv.wait(5)


def test_raw_stack_nat_maps_a_virtual_destination(bed, tmp_path) -> None:
    # [nat] entries for the raw stack become nftables DNAT rules (reloaded on SIGHUP)
    tb, d, _ = bed
    l2 = tb.links[1]
    (tmp_path / "v.txt").write_text("virtual\n")
    srv = tb.popen(tb.server, [sys.executable, "-m", "http.server", "8082", "--bind",
                               l2.server4, "--directory", str(tmp_path)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before = d.text().count("configuration reloaded")
    d.cfg.write_text(_config(nat=f'[nat."10.201.9.9:8082"]\nraw = "{l2.server4}:8082"\n'
                                 f'[nat."10.201.9.8"]\nraw = "{l2.server4}"\n'))
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log("configuration reloaded", count=before)
    try:
        code = ("import urllib.request, time, sys\n"
                "for i in range(50):\n"
                "    try:\n"
                "        body = urllib.request.urlopen('http://10.201.9.9:8082/v.txt',"
                " timeout=5).read(); break\n"
                "    except (ConnectionRefusedError, urllib.error.URLError):\n"
                "        time.sleep(0.1)\n"
                "sys.stdout.write(body.decode())\n")
        p = tb.run(tb.edge, [sys.executable, "-c", code], timeout=60)
        assert p.stdout == "virtual\n"
        p = tb.run(tb.edge, ["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.201.9.8"],
                   check=False)
        assert " 0% packet loss" in p.stdout and "from 10.201.9.8" in p.stdout, p.stdout
    finally:
        srv.terminate()
        srv.wait(5)
        before = d.text().count("configuration reloaded")
        d.cfg.write_text(_config())
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log("configuration reloaded", count=before)


def test_live_switch_between_two_targets_loses_nothing(bed) -> None:
    tb, d, _ = bed
    l1, l2 = tb.links
    # a separate echo server process so this test sees only its own datagrams
    echo = tb.popen(tb.server, [sys.executable, "-c", ECHO, f"{l1.server4}:9100",
                                f"{l2.server4}:9100"], stdout=subprocess.PIPE, text=True)
    assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
    n = 4000
    client = tb.popen(tb.edge, [sys.executable, "-c", CLIENT,
                                l1.server4, "9100", str(n), "32", "1"],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    assert client.stdout.readline().strip() == "half"
    # switch the live flow: NAT its virtual destination (server 1) to server 2
    before = d.text().count("retargeted to 10.201.2.2:9100")
    d.cfg.write_text(_config(nat=f'[nat."{l1.server4}:9100"]\nudp = "{l2.server4}:9100"\n'))
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log("retargeted to 10.201.2.2:9100", count=before)
    client.stdin.write("go\n")
    client.stdin.flush()
    r = json.loads(client.stdout.read().strip().splitlines()[-1])
    client.wait(30)
    echo.terminate()
    seen = json.loads(echo.stdout.read().strip().splitlines()[-1])
    echo.wait(5)
    s1, s2 = seen[f"{l1.server4}:9100"], seen[f"{l2.server4}:9100"]
    assert r == {"sent": n, "unique": n, "dups": 0, "bad": 0, "wrong_src": 0}
    assert len(s1) == len(set(s1)) and len(s2) == len(set(s2)), "a server saw a duplicate"
    assert not set(s1) & set(s2), "a datagram reached both servers"
    assert set(s1) | set(s2) == set(range(n)), "a datagram was lost"
    assert s1 and s2 and max(s1) >= n // 2 - 1 and min(s2) <= 3 * n // 4
    # restore the identity mapping for the other tests
    d.cfg.write_text(_config())
    d.proc.send_signal(signal.SIGHUP)


MALFORMED = [
    b"\x45\x00\x00",  # truncated IPv4 header
    b"\x70" + b"\x00" * 39,  # IP version 7
    b"\x46\x00\x00\x14" + b"\x00" * 16,  # IHL 6 but only 20 bytes
    b"\x45\x00\x00\x1c\x00\x00\x00\x00\x40\x11\x00\x00\xc6\x12\x00\x01\x0a\xc9\x01\x02"
    b"\x30\x39\x23\x28\x00\x03",  # UDP length 3 (< 8), truncated UDP header
    b"\x60\x00\x00\x00\x00\x08\x11\x40" + b"\x00" * 20,  # IPv6 header cut short
]

INJECT = r"""
import socket, sys
pkts = [bytes.fromhex(h) for h in sys.argv[2:]]
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
for p in pkts:
    s.sendto(p, (sys.argv[1], 0x0800))
print(len(pkts))
"""


def test_malformed_packets_are_counted_and_dropped(bed) -> None:
    tb, d, _ = bed

    def malformed() -> int:
        return _stat(d, "malformed")

    before = malformed()
    p = tb.run(tb.edge, [sys.executable, "-c", INJECT, "vstk0", *(m.hex() for m in MALFORMED)])
    assert p.stdout.strip() == str(len(MALFORMED))
    deadline = time.monotonic() + 10
    while malformed() < before + len(MALFORMED) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert malformed() == before + len(MALFORMED)
    assert d.proc is not None and d.proc.poll() is None
    # and the daemon still forwards
    r = _client(tb, tb.links[0].server4, 200)
    assert r["unique"] == 200


def _leftovers(tb: Testbed, name: str) -> list[str]:
    found = []
    rules = tb.run(tb.edge, ["ip", "rule"]).stdout + tb.run(tb.edge, ["ip", "-6", "rule"]).stdout
    if "22100" in rules or "0x5654" in rules:
        found.append("rules")
    for fam in ("-4", "-6"):
        if tb.run(tb.edge, ["ip", fam, "route", "show", "table", "22100"], check=False
                  ).stdout.strip():
            found.append(f"routes {fam}")
    if name in tb.run(tb.edge, ["ip", "link"]).stdout:
        found.append("device")
    if "vstack" in tb.run(tb.edge, ["nft", "list", "tables"]).stdout:
        found.append("nft table")
    ino = tb.run(tb.edge, ["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout.strip()
    if Path(f"/run/vstack/{name}.{ino}.state").exists():
        found.append("state file")
    return found


def test_cleanup_after_sigterm_and_after_sigkill(tmp_path) -> None:
    with Testbed(prefix="vc") as tb:
        d = Daemon(tb, tmp_path, _config()).start()
        assert _leftovers(tb, "vstk0") == ["rules", "routes -4", "routes -6", "device",
                                           "nft table", "state file"]
        assert d.stop(signal.SIGTERM) == 0
        assert _leftovers(tb, "vstk0") == []
        d.start()
        assert d.stop(signal.SIGKILL) == -signal.SIGKILL
        # the TUN dies with the process; rules, nft table and state file stay behind
        assert "rules" in _leftovers(tb, "vstk0")
        d.start()
        assert "removed what a previous vstack" in d.text()
        assert d.stop(signal.SIGINT) == 0
        assert _leftovers(tb, "vstk0") == []


def test_setup_failures_are_clear_and_leave_nothing(tmp_path) -> None:
    with Testbed(prefix="vf") as tb:
        tb.run(tb.edge, ["ip", "link", "add", "vstk0", "type", "veth", "peer", "name", "vstkp"])
        cfg = tmp_path / "c.toml"
        cfg.write_text(_config())
        p = tb.run(tb.edge, [sys.executable, "-m", "vstack", "run", "--config", str(cfg)],
                   check=False, timeout=30)
        assert p.returncode != 0
        assert "device name 'vstk0' is taken" in p.stderr
        tb.run(tb.edge, ["ip", "link", "del", "vstk0"])
        assert _leftovers(tb, "vstk0") == []
        cfg.write_text(_config(extra="bogus = 1\n"))
        p = tb.run(tb.edge, [sys.executable, "-m", "vstack", "run", "--config", str(cfg)],
                   check=False, timeout=30)
        assert p.returncode != 0 and "execution.bogus: unknown key" in p.stderr
        p = tb.run(tb.edge, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             sys.executable, "-m", "vstack", "run"], check=False, timeout=30)
        assert p.returncode != 0 and "must run as root" in p.stderr, p.stderr[-500:]
        assert _leftovers(tb, "vstk0") == []


def test_only_the_configured_prefixes_enter_the_tun(tmp_path) -> None:
    with Testbed(prefix="vr") as tb:
        l1, l2 = tb.links
        cfg = ('[vnic]\nname = "vstk0"\naddress6 = ""\nroutes = ["10.201.2.0/24"]\n'
               "[execution]\nmetrics_interval_s = 0.2\n")
        d = Daemon(tb, tmp_path, cfg).start()
        echo = tb.popen(tb.server, [sys.executable, "-c", ECHO, f"{l1.server4}:9000",
                                    f"{l2.server4}:9000"], stdout=subprocess.PIPE, text=True)
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        for host in (l1.server4, l2.server4):
            r = _client(tb, host, 100)
            assert r["unique"] == 100 and r["wrong_src"] == 0
        d.wait_log(f"->{l2.server4}:9000 created")
        assert f"->{l1.server4}:9000 created" not in d.text()  # routed directly
        assert "table 22100" not in tb.run(tb.edge, ["ip", "-6", "rule"]).stdout
        assert d.stop() == 0


def test_rules_engine_and_trace_are_wired(tmp_path) -> None:
    rules = Path(__file__).resolve().parents[2] / "rules" / "default.rules"
    trace = tmp_path / "trace.jsonl"
    with Testbed(prefix="vw") as tb:
        l1 = tb.links[0]
        cfg = (f'[execution]\nmetrics_interval_s = 0.2\n[decision]\nrules = "{rules}"\n'
               f'[log]\nrecord = "{trace}"\n')
        d = Daemon(tb, tmp_path, cfg).start()
        echo = tb.popen(tb.server, [sys.executable, "-c", ECHO, f"{l1.server4}:9000"],
                        stdout=subprocess.PIPE, text=True)
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        r = _client(tb, l1.server4, 200)
        assert r["unique"] == 200
        assert d.stop() == 0
    assert "created: stack=udp target=10.201.1.2:9000 rule=udp_default" in d.text()
    # one trace per worker: trace.jsonl, trace-w1.jsonl, ... (vstack.workers.worker_db);
    # the flow is on whichever worker its queue hash picked
    files = [trace, *sorted(tmp_path.glob("trace-w*.jsonl"))]
    lines = [json.loads(ln) for f in files if f.exists() for ln in f.read_text().splitlines()]
    dirs = [ln["dir"] for ln in lines if ln["kind"] == "packet"]
    assert dirs.count("app->net") == 200 and dirs.count("net->app") == 200
    assert any(ln["kind"] == "event" and ln["type"] == "flow.new" for ln in lines)

"""TUN offloads end to end (issue 6): a real ``vstack run`` with ``[vnic] offload`` in the
edge netns; the application sends with ``UDP_SEGMENT`` (USO super-packets reach vstack
whole), an echo server in the server netns answers with ``UDP_SEGMENT`` (vstack's
``UDP_GRO`` socket receives them coalesced and writes GSO super-packets back into the TUN).

Every datagram and every reply is checked (content, order within the flow); the edge
netns' UDP checksum error counters must not move; the daemon's counters show that
super-packets were read and written. The same traffic runs with ``offload = false`` (the
per-datagram path), a TCP upload exercises TSO (split in user space, raw stack), and a
refused offload set falls back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.net.test_datapath import Daemon
from vstack.testbed import Testbed
from vstack.vnic import offload
from vstack.vnic.tun import open_tun

pytestmark = [pytest.mark.root, pytest.mark.timeout(150)]

GSO_ECHO = r"""
import json, select, signal, socket, sys
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104
socks = []
for spec in sys.argv[1:]:
    host, port = spec.rsplit(":", 1)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setsockopt(SOL_UDP, UDP_GRO, 1)
    s.bind((host.strip("[]"), int(port)))
    s.setblocking(False)
    socks.append(s)
stats = {"recv": 0, "gro": 0, "bytes": 0}
def done(*_):
    print(json.dumps(stats), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
print("ready", flush=True)
while True:
    r, _, _ = select.select(socks, [], [])
    for s in r:
        while True:
            try:
                data, anc, _f, peer = s.recvmsg(65535, socket.CMSG_SPACE(4))
            except BlockingIOError:
                break
            seg = 0
            for lvl, kind, val in anc:
                if lvl == SOL_UDP and kind == UDP_GRO:
                    seg = int.from_bytes(val[:4], sys.byteorder)
            stats["recv"] += 1
            stats["bytes"] += len(data)
            if 0 < seg < len(data):
                stats["gro"] += 1
                s.sendmsg([data], [(SOL_UDP, UDP_SEGMENT, seg.to_bytes(2, sys.byteorder))],
                           0, peer)
            else:
                s.sendto(data, peer)
"""

GSO_CLIENT = r"""
import json, socket, sys
host, port, total, burst, size = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
def payload(i, n):
    return i.to_bytes(4, "big") + bytes((i + k) & 0xFF for k in range(n - 4))
s = socket.socket(fam, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.settimeout(5)
s.connect((host, port))
expected, got = [], []
seq = 0
while seq < total:
    n = min(burst, total - seq)
    # every other burst ends with a shorter datagram (allowed in a GSO send)
    pls = [payload(seq + i, size if i < n - 1 or seq % 2 else size - 100) for i in range(n)]
    s.sendmsg(pls, [(17, 103, size.to_bytes(2, sys.byteorder))])
    expected += pls
    seq += n
    while len(got) < len(expected):
        try:
            got.append(s.recv(65535))
        except socket.timeout:
            break
print(json.dumps({"sent": len(expected), "got": len(got), "equal_in_order": got == expected,
                  "same_set": sorted(got) == sorted(expected)}), flush=True)
"""

TCP_SINK = r"""
import hashlib, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
srv = socket.socket(fam, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(1)
print("ready", flush=True)
c, _ = srv.accept()
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b)
    n += len(b)
c.sendall(f"{n} {h.hexdigest()}".encode())
c.close()
"""

TCP_SEND = r"""
import hashlib, socket, sys
host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = bytes((i * 7 + (i >> 11)) & 0xFF for i in range(total))
c = socket.create_connection((host, port), timeout=20)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
print(c.recv(200).decode(), hashlib.sha256(data).hexdigest(), total, flush=True)
"""


def _config(name: str, offload_on: bool) -> str:
    return (f'[vnic]\nname = "{name}"\noffload = {str(offload_on).lower()}\n'
            "[execution]\nmetrics_interval_s = 0.2\nidle_timeout_s = 30\n")


def _csum_errors(tb: Testbed) -> int:
    total = 0
    text = tb.run(tb.edge, ["cat", "/proc/net/snmp"]).stdout
    rows = [ln.split() for ln in text.splitlines() if ln.startswith("Udp:")]
    mib = dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=True))
    total += mib.get("InCsumErrors", 0)
    for ln in tb.run(tb.edge, ["cat", "/proc/net/snmp6"]).stdout.splitlines():
        if ln.startswith("Udp6InCsumErrors"):
            total += int(ln.split()[1])
    return total


def _counter(d: Daemon, name: str) -> int:
    m = re.findall(rf"counters .*?\b{name}=(\d+)", d.text())
    return int(m[-1]) if m else 0


@pytest.fixture(scope="module", params=[True, False], ids=["offload", "plain"])
def bed(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("off")
    with Testbed(prefix="vo") as tb:
        d = Daemon(tb, tmp, _config("vstk0", request.param)).start()
        l1 = tb.links[0]
        echo = tb.popen(tb.server, [sys.executable, "-c", GSO_ECHO, f"{l1.server4}:9100",
                                    f"[{l1.server6}]:9100"], stdout=subprocess.PIPE, text=True)
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        yield tb, d, request.param
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


@pytest.mark.parametrize("which", ["server4", "server6"])
def test_gso_app_through_vnic_every_datagram_and_reply(bed, which: str) -> None:
    tb, d, offload_on = bed
    errs = _csum_errors(tb)
    host = getattr(tb.links[0], which)
    size = 1200 if which == "server4" else 1100
    p = tb.run(tb.edge, [sys.executable, "-c", GSO_CLIENT, host, "9100", "3000", "20",
                         str(size)], timeout=120)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r == {"sent": 3000, "got": 3000, "equal_in_order": True, "same_set": True}
    assert _csum_errors(tb) == errs
    got = re.findall(r"TUN offloads(?: \S+ refused by this kernel.*; using|:) (\S+)", d.text())
    uso = offload_on and bool(got) and "uso4" in got[0]  # USO: Linux >= 6.2
    deadline = time.monotonic() + 5
    while (uso and not (_counter(d, "super_packets") and _counter(d, "gso_writes"))
           and time.monotonic() < deadline):
        time.sleep(0.1)
    if offload_on:
        assert got, "the daemon did not log its TUN offloads"
        m = re.match(r"(\d+)\.(\d+)", os.uname().release)
        if m and (int(m[1]), int(m[2])) >= (6, 2):
            assert got[0] == "csum,tso4,tso6,uso4,uso6"
    if uso:
        assert _counter(d, "super_packets") > 0  # USO super-packets read whole
        assert _counter(d, "gso_writes") > 0  # GRO replies written back coalesced
    else:
        assert "TUN offloads" not in d.text()
        assert "super_packets" not in d.text()  # the plain Datapath


def test_tcp_upload_through_raw_stack(bed) -> None:
    # with TSO the application's TCP segments reach vstack as 64 KiB super-packets; the
    # raw stack needs them split (user space) with every checksum right, or the upload
    # stalls / the hash differs
    tb, d, offload_on = bed
    before = _counter(d, "split_packets")
    srv = tb.links[0].server4
    sink = tb.popen(tb.server, [sys.executable, "-c", TCP_SINK, srv, "9200"],
                    stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    p = tb.run(tb.edge, [sys.executable, "-c", TCP_SEND, srv, "9200", str(3 << 20)],
               timeout=60)
    n, got, want, total = p.stdout.split()
    assert (int(n), got) == (int(total), want)
    sink.wait(10)
    if offload_on:
        deadline = time.monotonic() + 5
        while _counter(d, "split_packets") == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _counter(d, "split_packets") > before  # TSO super-packets did arrive


def test_refused_offloads_fall_back(caplog) -> None:
    # a set the kernel refuses (here: an unknown flag) -> the best smaller set is used
    name = f"vsof{os.getpid() % 100000}"
    tun = open_tun(name, vnet_hdr=True)
    try:
        with caplog.at_level(logging.WARNING, "vstack.vnic.offload"):
            got = offload.enable_offloads(tun.fd, offload.ALL | 0x8000)
        assert got == offload.ALL
        assert "refused" in caplog.text
        assert offload.enable_offloads(tun.fd, offload.TUN_F_CSUM) == offload.TUN_F_CSUM
    finally:
        tun.close()
    assert not Path(f"/sys/class/net/{name}").exists()

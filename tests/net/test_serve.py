"""``vstack serve udp|dccp`` as real processes on loopback: sink counts and CSV bins, echo.

The DCCP sink over raw IP protocol 33 needs root (raw sockets); it runs in a private
network namespace so that no other test's DCCP traffic reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vstack.cli.serve import BIN_S, BinCounter, read_bins_csv

pytestmark = pytest.mark.timeout(120)


def _port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serve(args: list[str], prefix: list[str] | None = None) -> Iterator[subprocess.Popen[str]]:
    p = subprocess.Popen([*(prefix or []), sys.executable, "-m", "vstack", "serve", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert "ready" in line, line + (p.stdout.read() if p.poll() is not None else "")
        yield p
    finally:
        if p.poll() is None:
            p.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)


def test_bin_counter_rows_include_empty_bins(tmp_path: Path) -> None:
    c = BinCounter()
    base = 1000.0
    c.add(10, base + 0.001)
    c.add(20, base + 0.004)
    c.add(30, base + 0.031)
    rows = c.rows()
    assert [r[1] for r in rows] == [2, 0, 0, 1]
    assert rows[0][0] == pytest.approx(base)
    assert (c.packets, c.bytes) == (3, 60)
    c.write_csv(tmp_path / "b.csv")
    bins = read_bins_csv(tmp_path / "b.csv")
    assert sorted(bins.values()) == [0, 0, 1, 2]
    assert min(bins) == round(base / BIN_S)


def test_udp_sink_counts_and_writes_csv(tmp_path: Path) -> None:
    port, csv_path = _port(), tmp_path / "udp.csv"
    with _serve(["udp", "--port", str(port), "--bind", "127.0.0.1", "--csv", str(csv_path),
                 "--seconds", "30"]) as p:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(400):
                s.sendto(b"x" * (i % 50 + 1), ("127.0.0.1", port))
                if i % 40 == 0:
                    time.sleep(0.005)
        time.sleep(0.5)
        p.terminate()
        out, _ = p.communicate(timeout=10)
    assert "done pkts=400" in out, out
    assert f"bytes={sum(i % 50 + 1 for i in range(400))}" in out
    bins = read_bins_csv(csv_path)
    assert sum(bins.values()) == 400


def test_udp_echo_returns_each_datagram() -> None:
    port = _port()
    with _serve(["udp", "--port", str(port), "--echo", "--bind", "127.0.0.1"]), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        for i in range(50):
            msg = b"echo %d" % i
            s.sendto(msg, ("127.0.0.1", port))
            assert s.recvfrom(2048)[0] == msg


def test_dccp_udp_encap_sink_counts_every_datagram(tmp_path: Path) -> None:
    """DCCP-UDP (RFC 6773): DCCP port P inside, UDP port U outside, two different numbers."""
    from vstack.dccp.endpoint import DccpClient

    port, uport, csv_path = _port(), _port(), tmp_path / "dccp.csv"
    with _serve(["dccp", "--udp-encap", "--port", str(port), "--udp-port", str(uport),
                 "--bind", "127.0.0.1", "--csv", str(csv_path), "--seconds", "60"]) as p:
        async def run() -> None:
            c = DccpClient(("127.0.0.1", port), transport="udp", udp_port=uport)
            try:
                await c.open(timeout=10)
                for i in range(2000):
                    while not c.send(b"d%05d" % i):
                        await asyncio.sleep(0.002)
                c.close()
                await c.wait_closed(timeout=30)
            finally:
                c.release()

        asyncio.run(run())
        time.sleep(0.3)
        p.terminate()
        out, _ = p.communicate(timeout=10)
    assert "done pkts=2000 bytes=12000" in out, out
    assert f"dccp:{port}/udp:{uport} sink" in out and "port_reuse=0" in out, out
    assert sum(read_bins_csv(csv_path).values()) == 2000


def test_serve_rejects_bad_arguments() -> None:
    r = subprocess.run([sys.executable, "-m", "vstack", "serve", "dccp", "--port", "7",
                        "--service", "nope"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "bad --service" in r.stderr
    r = subprocess.run([sys.executable, "-m", "vstack", "serve", "dccp", "--port", "7",
                        "--udp-port", "7"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--udp-port needs --udp-encap" in r.stderr
    r = subprocess.run([sys.executable, "-m", "vstack", "serve", "udp", "--port", "0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0


@pytest.mark.root
def test_dccp_raw_echo_in_private_netns() -> None:
    """``vstack serve dccp --echo`` over IP protocol 33, client in the same namespace."""
    from vstack.dccp.endpoint import DccpClient
    from vstack.kdp import netns

    if os.geteuid() != 0:
        pytest.skip("needs root")
    ns = f"vss{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        port = 7001
        with _serve(["dccp", "--echo", "--port", str(port), "--seconds", "60"],
                    prefix=["ip", "netns", "exec", ns]):
            async def run() -> list[bytes]:
                got: asyncio.Queue[bytes] = asyncio.Queue()
                with netns(ns):
                    c = DccpClient(("127.0.0.1", port), on_datagram=got.put_nowait)
                out = []
                try:
                    await c.open(timeout=10)
                    for i in range(200):
                        while not c.send(b"raw %d" % i):
                            await asyncio.sleep(0.002)
                        out.append(await asyncio.wait_for(got.get(), 10))
                    c.close()
                    await c.wait_closed(timeout=10)
                finally:
                    c.release()
                return out

            assert asyncio.run(run()) == [b"raw %d" % i for i in range(200)]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)

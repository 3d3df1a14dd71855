"""``vstack serve tcp|udplite`` as real processes on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from vstack.execution.stacks.framing import Decoder, encode


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(*args: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-m", "vstack", "serve", *args, "--seconds", "20"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert "ready" in line, line
    return p


def test_serve_tcp_echo_returns_each_framed_datagram() -> None:
    port = _free_port(socket.SOCK_STREAM)
    p = _serve("tcp", "--port", str(port), "--echo", "--bind", "127.0.0.1")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            sent = [b"a" * n for n in (1, 100, 1400)]
            c.sendall(b"".join(encode(d, 2) for d in sent))
            dec, got = Decoder(2), []
            while len(got) < len(sent):
                got.extend(dec.feed(c.recv(65536)))
        assert got == sent
    finally:
        p.terminate()
        out, _ = p.communicate(timeout=10)
    assert "pkts=3" in out


def test_serve_udplite_sink_counts() -> None:
    port = _free_port(socket.SOCK_DGRAM)
    try:
        p = _serve("udplite", "--port", str(port), "--bind", "127.0.0.1")
    except AssertionError:
        pytest.skip("UDP-Lite not available in this kernel")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 136) as c:
            for _ in range(5):
                c.sendto(b"x" * 100, ("127.0.0.1", port))
        time.sleep(0.5)
    finally:
        p.terminate()
        out, _ = p.communicate(timeout=10)
    assert "pkts=5" in out

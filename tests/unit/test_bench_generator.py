"""The throughput bench's generator (``vstack.cli.bench_speed.GENERATOR``) on loopback:
every datagram it counts as sent is a separate datagram of the payload size, for each of
its senders (``send``, ``UDP_SEGMENT``, ``sendmmsg`` through ctypes)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from vstack.cli.bench_speed import GENERATOR


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_generator_datagrams_arrive_whole(mode: int) -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(0.5)
    port = sink.getsockname()[1]
    try:
        out = subprocess.run([sys.executable, "-c", GENERATOR, "127.0.0.1", str(port), "0.05",
                              "0", "1000", str(mode), "2"],
                             capture_output=True, text=True, timeout=30, check=True)
        res = json.loads(out.stdout)
        assert res["errors"] == 0 and res["sent"] > 0, res
        sizes: dict[int, int] = {}
        try:
            while True:
                n = len(sink.recv(65535))
                sizes[n] = sizes.get(n, 0) + 1
        except TimeoutError:
            pass
    finally:
        sink.close()
    assert set(sizes) == {1000}, sizes  # separate datagrams, never coalesced
    # loopback may drop when the sink's buffer is full, never invent datagrams
    assert 0 < sizes[1000] <= res["sent"]

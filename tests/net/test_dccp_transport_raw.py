"""Raw IP protocol 33 sockets in a private network namespace: addresses reported for the
checksum (IPv4 header / IPV6_PKTINFO), and the kernel port filter that spares a connection
every other connection's packets."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest

from vstack.dccp.transport import RawDccpSocket, RxDatagram, checksum_ok, reprotect
from vstack.kdp import netns

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]


@pytest.fixture
def ns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"vsr{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _pkt(sport: int, dport: int, src: str, dst: str) -> bytes:
    hdr = struct.pack("!HHBBH", sport, dport, 5, 0, 0) + bytes([1, 0])
    hdr += (7).to_bytes(6, "big") + struct.pack("!I", 0x44434350)
    return reprotect(hdr, src, dst, 33)


@pytest.mark.parametrize("fam,addr", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")],
                         ids=["ipv4", "ipv6"])
def test_port_filter_and_addresses(ns: str, fam: int, addr: str) -> None:
    async def run() -> tuple[list[RxDatagram], list[RxDatagram], bool]:
        loop = asyncio.get_running_loop()
        with netns(ns):
            tx = RawDccpSocket(fam)
            filtered = RawDccpSocket(fam)
            unfiltered = RawDccpSocket(fam)
        ok = filtered.filter_port(5555)
        got_f: list[RxDatagram] = []
        got_u: list[RxDatagram] = []
        done = asyncio.Event()

        def on_u(dg: RxDatagram) -> None:
            got_u.append(dg)
            if len(got_u) >= 6:
                done.set()

        filtered.attach(loop, got_f.append)
        unfiltered.attach(loop, on_u)
        try:
            for dport in (5555, 6666, 5555, 7777, 5555, 1):
                assert tx.sendto(_pkt(40000, dport, addr, addr), addr)
            await asyncio.wait_for(done.wait(), 5)
            await asyncio.sleep(0.1)
        finally:
            for s in (tx, filtered, unfiltered):
                s.close()
        return got_f, got_u, ok

    got_f, got_u, ok = asyncio.run(run())
    assert ok
    assert [struct.unpack_from("!H", d.data, 2)[0] for d in got_f] == [5555, 5555, 5555]
    # the unfiltered socket sees everything (its own sends included on loopback)
    assert {struct.unpack_from("!H", d.data, 2)[0] for d in got_u} >= {5555, 6666, 7777, 1}
    for d in got_f:
        assert d.src == addr and d.dst == addr
        assert checksum_ok(d.data, d.src, d.dst)

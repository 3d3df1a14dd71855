"""The offload datapath in-process, without root: a datagram socketpair stands in for a TUN
opened with IFF_VNET_HDR (every packet carries a virtio_net_hdr both ways); the UDP stack
talks to real echo servers on loopback.

* a GSO_UDP_L4 super-packet from the "application" leaves as separate datagrams, every
  byte in order (one UDP_SEGMENT sendmsg);
* replies coalesced by UDP_GRO come back as one GSO_UDP_L4 super-packet, which the kernel's
  segmentation (simulated as in test_vnet) turns into datagrams with valid checksums;
* packets with a zero vnet header (offloads refused / plain) take the same paths.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import pytest

from tests.unit.test_vnet import _kernel_segment
from vstack.analysis.packet import build_udp, parse, verify_l4_checksum
from vstack.config import Config
from vstack.fastpath import OffloadDatapath
from vstack.vnic import vnet
from vstack.vnic.offload import to_datagrams

APP4, APP6 = "10.0.0.1", "fd00::1"
SOL_UDP, UDP_SEGMENT = 17, 103


class GsoEcho:
    """Echo server that answers every ``burst`` datagrams with one UDP_SEGMENT sendmsg
    (so vstack's UDP_GRO socket receives them coalesced)."""

    def __init__(self, host: str, burst: int) -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.s = socket.socket(fam, socket.SOCK_DGRAM)
        self.s.bind((host, 0))
        self.s.setblocking(False)
        self.port = self.s.getsockname()[1]
        self.burst = burst
        self.seen: list[bytes] = []
        self.pending: list[bytes] = []
        asyncio.get_running_loop().add_reader(self.s.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data, peer = self.s.recvfrom(65535)
            except BlockingIOError:
                return
            self.seen.append(data)
            self.pending.append(data)
            if len(self.pending) == self.burst:
                seg = len(self.pending[0])
                self.s.sendmsg(self.pending, [(SOL_UDP, UDP_SEGMENT,
                                               seg.to_bytes(2, sys.byteorder))], 0, peer)
                self.pending = []


async def _setup(family: int, burst: int) -> tuple[OffloadDatapath, socket.socket, GsoEcho,
                                                  list[bytes]]:
    loop = asyncio.get_running_loop()
    echo = GsoEcho("127.0.0.1" if family == 4 else "::1", burst)
    cfg = Config()
    cfg.vnic.fwmark = 0
    app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    app.setblocking(False)
    for s in (app, tun):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    dp = OffloadDatapath(cfg)
    dp.attach(tun.fileno(), loop)
    got: list[bytes] = []

    def readable() -> None:
        while True:
            try:
                got.append(app.recv(1 << 17))
            except BlockingIOError:
                return

    loop.add_reader(app.fileno(), readable)
    dp._keep = tun  # type: ignore[attr-defined]
    return dp, app, echo, got


def _app_side(frames: list[bytes]) -> list[bytes]:
    """What the application's socket would receive: the kernel segments GSO frames and
    finishes NEEDS_CSUM checksums (simulated); plain frames arrive as written."""
    out: list[bytes] = []
    for f in frames:
        hdr = vnet.parse_hdr(f)
        pkt = f[vnet.VNET_HDR_LEN:]
        if hdr.gso == vnet.GSO_UDP_L4:
            out += _kernel_segment(hdr, pkt)
        else:
            out += to_datagrams(pkt, hdr)
    return out


async def _wait(cond: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond() and loop.time() < deadline:
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("family", [4, 6])
def test_super_packets_split_and_replies_coalesced(family: int) -> None:
    async def main() -> None:
        burst, size, bursts = 16, 1000, 8
        dp, app, echo, got = await _setup(family, burst)
        app_addr = APP4 if family == 4 else APP6
        srv = "127.0.0.1" if family == 4 else "::1"
        sent: list[bytes] = []
        # the first packet is plain (zero vnet header): the slow path creates the flow,
        # and the echo's first burst is completed by the super-packets that follow
        first = b"\x00\x00\x00\x00" + bytes(size - 4)
        app.send(vnet.NO_OFFLOAD + build_udp(app_addr, srv, 40000, echo.port, first))
        sent.append(first)
        for b in range(bursts):
            n = burst if b else burst - 1
            pls = [(len(sent) + i).to_bytes(4, "big") + bytes([b]) * (size - 4)
                   for i in range(n)]
            vh, pkt = vnet.coalesce_udp(build_udp(app_addr, srv, 40000, echo.port, b""), pls)
            app.send(vh + pkt)
            sent += pls
            # one burst at a time: the echo socket's default buffer holds one, not all
            want = len(sent)
            await _wait(lambda w=want: len(echo.seen) >= w)
        await _wait(lambda: len(_app_side(got)) >= len(sent))
        assert len(echo.seen) == len(sent), (len(echo.seen), len(sent), dp.stats(), len(got))
        assert echo.seen == sent  # every datagram, whole, in order
        st = dp.stats()
        assert st["super_packets"] == bursts
        assert st["errors"] == 0 and st["malformed"] == 0
        replies = _app_side(got)
        assert [parse(r).payload(r) for r in replies] == sent
        for r in replies:
            p = parse(r)
            assert (p.src, p.dst) == (srv, app_addr)
            assert (p.l4.sport, p.l4.dport) == (echo.port, 40000)  # type: ignore[union-attr]
            assert verify_l4_checksum(r)
        # the replies were coalesced by UDP_GRO and written back as super-packets
        assert st["gso_writes"] > 0
        assert any(vnet.parse_hdr(f).gso == vnet.GSO_UDP_L4 for f in got)
        dp.close()

    asyncio.run(main())


def test_plain_packets_with_zero_header_and_bad_input() -> None:
    async def main() -> None:
        dp, app, echo, got = await _setup(4, 1)
        pls = [i.to_bytes(4, "big") + bytes(i % 300) for i in range(200)]
        for pl in pls:
            app.send(vnet.NO_OFFLOAD + build_udp(APP4, "127.0.0.1", 40001, echo.port, pl))
        app.send(b"\x01\x05")  # truncated vnet header
        app.send(vnet.VnetHdr(0, vnet.GSO_UDP_L4, 0, 0, 0, 0).pack() + b"\x45" + bytes(10))
        await _wait(lambda: len(got) >= len(pls))
        assert echo.seen == pls
        replies = _app_side(got)
        assert [parse(r).payload(r) for r in replies] == pls
        assert all(verify_l4_checksum(r) for r in replies)
        assert all(f[:vnet.VNET_HDR_LEN] == vnet.NO_OFFLOAD for f in got)
        assert dp.stats()["malformed"] == 2
        dp.close()

    asyncio.run(main())


def test_needs_csum_packet_is_completed_for_the_slow_path() -> None:
    vh, pkt = vnet.coalesce_udp(build_udp(APP4, "10.0.0.2", 1, 2, b"x"), [b"hello" * 3])
    assert not verify_l4_checksum(pkt)
    (done,) = to_datagrams(pkt, vnet.parse_hdr(vh))
    assert verify_l4_checksum(done) and parse(done).payload(done) == b"hello" * 3

"""The TCP-framed, MPTCP and UDP-Lite stacks driven directly (a real asyncio loop, a
``StackContext``, real kernel sockets) against vstack's own servers on 127.0.0.1 / ::1;
and one netns test through the VNIC with ``default_stack = "tcp"``.

No timing assertions: every check counts datagrams, bytes, errors and drops; timeouts are
only there so that a bug fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vstack.execution.stacks.base import STACKS, Stack, StackContext, StackError
from vstack.execution.stacks.framing import encode
from vstack.execution.stacks.mptcp import IPPROTO_MPTCP, MptcpStack
from vstack.execution.stacks.tcp import TcpStack, parse_tcp_info
from vstack.execution.stacks.udplite import IPPROTO_UDPLITE, UdpLiteStack
from vstack.servers import start_framed_server, start_udplite_server

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
HOSTS = [(4, "127.0.0.1"), (6, "::1")]
N = 2000


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def payload(i: int) -> bytes:
    """Datagram ``i``: its sequence number, then 0..1195 bytes derived from it."""
    return i.to_bytes(4, "big") + bytes((i + k) & 0xFF for k in range((i * 37) % 1196))


def mptcp_available() -> str | None:
    """None if this kernel gives MPTCP sockets, else why not."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP).close()
    except OSError as e:
        return f"kernel refuses MPTCP sockets: {e}"
    return None


class Harness:
    """One stack, what it delivered and what errors it reported."""

    def __init__(self, name: str, family: int, target: tuple[str, int],
                 **options: Any) -> None:
        self.got: list[bytes] = []
        self.errors: list[StackError] = []
        self.error_seen = asyncio.Event()
        self.ctx = StackContext(loop=asyncio.get_running_loop(), family=family,
                                target=target, deliver=self.got.append,
                                on_error=self._on_error, options=dict(options))
        self.stack: Stack = STACKS[name](self.ctx)

    def _on_error(self, e: StackError) -> None:
        self.errors.append(e)
        self.error_seen.set()

    def delivered(self, want: list[bytes]) -> Callable[[], bool]:
        return lambda: self.got == want

    async def until(self, cond: Callable[[], bool], what: str, timeout: float = 20) -> None:
        async def wait() -> None:
            while not cond():
                await asyncio.sleep(0.005)
        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"never happened: {what}; errors={self.errors} "
                                 f"metrics={self.stack.metrics}") from None


def _stream_params() -> list[Any]:
    out = []
    for name in ("tcp", "mptcp"):
        for fam, host in HOSTS:
            out.append(pytest.param(name, fam, host, id=f"{name}-v{fam}"))
    return out


def _skip_mptcp(name: str) -> None:
    if name == "mptcp" and (why := mptcp_available()):
        pytest.skip(why)


# ------------------------------------------------------------------ stream stacks
@pytest.mark.parametrize(("name", "fam", "host"), _stream_params())
def test_stream_echo_2000_exactly_once_in_order(name: str, fam: int, host: str) -> None:
    _skip_mptcp(name)

    async def main() -> None:
        prefix = 4 if fam == 6 else 2
        srv = await start_framed_server(0, echo=True, bind=host, mptcp=name == "mptcp",
                                        prefix=prefix)
        h = Harness(name, fam, (host, srv.port), prefix=prefix)
        st = h.stack
        st.open()
        sent = [payload(i) for i in range(N)]
        for i, p in enumerate(sent):
            # the datapath hands memoryviews (base.Stack.send says bytes)
            st.send(p if i % 2 else memoryview(p))  # type: ignore[arg-type]
            if i % 100 == 99:
                await asyncio.sleep(0)
        await h.until(lambda: len(h.got) >= N, f"{N} echoes")
        await asyncio.sleep(0.05)  # anything extra (a duplicate) would arrive now
        assert h.got == sent
        m = st.metrics
        assert (m.packets_out, m.packets_in, m.drops, m.lost) == (N, N, 0, 0)
        assert m.bytes_out == m.bytes_in == sum(map(len, sent))
        assert srv.stats.packets == srv.stats.echoed == N
        assert srv.stats.connections == 1
        assert st.ready and h.errors == []
        assert isinstance(st, TcpStack)
        assert m.rtt_ms > 0 and st.tcp_info is not None and st.tcp_info.state == 1
        if isinstance(st, MptcpStack):
            assert st.negotiated is True and not st.plain_tcp
        st.close()
        st.close()  # idempotent
        assert not st.ready
        srv.close()
        await srv.wait_closed()

    run(main())


@pytest.mark.parametrize("name", ["tcp", "mptcp"])
def test_server_vanishing_is_reported_not_hung(name: str) -> None:
    _skip_mptcp(name)

    async def main() -> None:
        srv = await start_framed_server(0, echo=True, bind="127.0.0.1",
                                        mptcp=name == "mptcp")
        h = Harness(name, 4, ("127.0.0.1", srv.port), reconnect=0)
        h.stack.open()
        h.stack.send(b"before")
        await h.until(lambda: h.got == [b"before"], "first echo")
        srv.close()  # resets every connection
        await srv.wait_closed()
        await asyncio.wait_for(h.error_seen.wait(), 20)
        assert len(h.errors) == 1
        e = h.errors[0]
        assert e.stack == name and e.remote, e
        assert not h.stack.ready
        drops = h.stack.metrics.drops
        h.stack.send(b"after")  # a failed stack (reconnect = 0) drops and counts
        assert h.stack.metrics.drops == drops + 1
        h.stack.close()

    run(main())


def test_connection_refused_is_remote_and_reported_once_per_outage() -> None:
    async def main() -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there
        h = Harness("tcp", 4, ("127.0.0.1", port), reconnect=0.02)
        st = h.stack
        assert isinstance(st, TcpStack)
        st.open()
        await asyncio.wait_for(h.error_seen.wait(), 20)
        await h.until(lambda: st.failures >= 3, "three failed retries")
        assert len(h.errors) == 1  # retries fail quietly
        assert h.errors[0].remote and "refused" in h.errors[0].reason.lower()
        # the server comes: the stack connects and sends what waited in its buffer
        srv = await start_framed_server(port, echo=True, bind="127.0.0.1")
        st.send(b"queued")
        await h.until(lambda: h.got == [b"queued"], "the queued datagram echoed")
        assert st.connects == 1
        st.close()
        srv.close()
        await srv.wait_closed()

    run(main())


def test_reconnect_after_the_server_restarts() -> None:
    async def main() -> None:
        srv = await start_framed_server(0, echo=True, bind="127.0.0.1")
        port = srv.port
        h = Harness("tcp", 4, ("127.0.0.1", port), reconnect=0.02)
        st = h.stack
        assert isinstance(st, TcpStack)
        st.open()
        st.send(b"one")
        await h.until(lambda: h.got == [b"one"], "first echo")
        srv.close()
        await srv.wait_closed()
        await asyncio.wait_for(h.error_seen.wait(), 20)
        srv = await start_framed_server(port, echo=True, bind="127.0.0.1")
        await h.until(lambda: st.ready, "reconnected")
        st.send(b"two")
        await h.until(lambda: h.got == [b"one", b"two"], "echo after the restart")
        assert st.connects == 2 and len(h.errors) == 1
        st.close()
        srv.close()
        await srv.wait_closed()

    run(main())


def test_buffer_bound_drops_are_counted() -> None:
    """1000 bytes of buffer: 9 frames of 2 + 100 bytes fit, the other 91 are dropped."""

    async def main() -> None:
        srv = await start_framed_server(0, echo=True, bind="127.0.0.1")
        h = Harness("tcp", 4, ("127.0.0.1", srv.port), buffer=1000)
        st = h.stack
        st.open()
        for i in range(100):  # one burst: the connection is not even up yet
            st.send(bytes([i]) * 100)
        m = st.metrics
        assert (m.packets_out, m.drops) == (9, 91)
        await h.until(lambda: len(h.got) == 9, "the 9 buffered datagrams echoed")
        assert h.got == [bytes([i]) * 100 for i in range(9)]
        st.send(b"x" * 65_528)  # larger than max_datagram: dropped, counted
        assert m.drops == 92 and isinstance(st, TcpStack) and st.oversize == 1
        st.close()
        srv.close()
        await srv.wait_closed()

    run(main())


def test_peer_that_stops_reading_makes_drops_not_blocking() -> None:
    async def main() -> None:
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        h = Harness("tcp", 4, ("127.0.0.1", ls.getsockname()[1]), buffer=256 * 1024)
        st = h.stack
        st.open()
        chunk = b"z" * 60_000
        for _ in range(3000):  # kernel buffers fill, then ours, then drops
            for _ in range(10):
                st.send(chunk)
            await asyncio.sleep(0.001)
            if st.metrics.drops:
                break
        assert st.metrics.drops > 0
        assert h.errors == []
        assert isinstance(st, TcpStack) and st.state == "connected"
        st.close()
        ls.close()

    run(main())


def test_bad_frame_from_the_peer_is_a_remote_error() -> None:
    async def main() -> None:
        async def garbage(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(encode(b"fine") + b"\xff\xff" + b"junk")
            await w.drain()
            await asyncio.sleep(5)

        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        h = Harness("tcp", 4, ("127.0.0.1", port), max_datagram=1000, reconnect=0)
        st = h.stack
        st.open()
        await asyncio.wait_for(h.error_seen.wait(), 20)
        assert h.got == [b"fine"]
        assert h.errors[0].remote and "bad frame" in h.errors[0].reason
        assert isinstance(st, TcpStack) and st.framing_errors == 1
        st.close()
        server.close()

    run(main())


def test_tcp_info_offsets_match_the_kernel() -> None:
    """Fields whose values are known on an established loopback connection."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    c = socket.create_connection(ls.getsockname())
    a, _ = ls.accept()
    c.sendall(b"x" * 1000)
    a.recv(1000)
    a.sendall(b"y")
    c.recv(1)
    info = parse_tcp_info(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104))
    for s in (a, c, ls):
        s.close()
    assert info.state == 1  # TCP_ESTABLISHED
    lo_mtu = int(Path("/sys/class/net/lo/mtu").read_text())
    assert info.pmtu == min(lo_mtu, 0xFFFF)  # loopback's MTU, capped at IPv4's maximum
    assert info.snd_mss > 0 and info.rcv_mss > 0
    assert info.rtt_us > 0 and info.rttvar_us > 0
    assert info.snd_cwnd >= 1 and info.lost == 0 and info.total_retrans == 0
    with pytest.raises(ValueError):
        parse_tcp_info(b"\x00" * 50)


# ------------------------------------------------------------------ UDP-Lite
@pytest.mark.parametrize(("fam", "host"), HOSTS, ids=["v4", "v6"])
def test_udplite_2000_all_received(fam: int, host: str) -> None:
    async def main() -> None:
        srv = await start_udplite_server(0, echo=True, bind=host)
        h = Harness("udplite", fam, (host, srv.port), send_cscov=8 + 4)
        st = h.stack
        st.open()
        sent = [payload(i) for i in range(N)]

        def room(i: int) -> Callable[[], bool]:
            return lambda: i - len(h.got) < 64

        for i, p in enumerate(sent):
            # a window of 64 in flight: loopback has no loss, only full buffers
            await h.until(room(i), "the window opens")
            st.send(memoryview(p))  # type: ignore[arg-type]
        await h.until(lambda: len(h.got) >= N, f"{N} echoes")
        await asyncio.sleep(0.05)
        assert sorted(h.got) == sorted(sent) and len(h.got) == N
        assert srv.stats.packets == N
        m = st.metrics
        assert (m.packets_out, m.packets_in, m.drops) == (N, N, 0)
        assert h.errors == []
        st.close()
        srv.close()

    run(main())


def test_udplite_server_gone_is_reported() -> None:
    async def main() -> None:
        srv = await start_udplite_server(0, echo=True, bind="127.0.0.1")
        h = Harness("udplite", 4, ("127.0.0.1", srv.port))
        h.stack.open()
        h.stack.send(b"a")
        await h.until(lambda: h.got == [b"a"], "first echo")
        srv.close()
        for _ in range(200):  # ICMP port unreachable -> ECONNREFUSED on a later call
            h.stack.send(b"b")
            await asyncio.sleep(0.005)
            if h.errors:
                break
        assert h.errors and h.errors[0].remote and h.errors[0].stack == "udplite"
        h.stack.close()

    run(main())


def test_udplite_runs_and_super_packets_all_received() -> None:
    """The datapath hands a UDP-Lite flow runs of equal-size datagrams (``send_many``)
    and, on the offload TUN, super-packet payloads (``send_gso``): every datagram
    leaves, one send each (the kernel refuses UDP_SEGMENT on UDP-Lite), no errors."""
    async def main() -> None:
        srv = await start_udplite_server(0, echo=True, bind="127.0.0.1")
        h = Harness("udplite", 4, ("127.0.0.1", srv.port), send_cscov=8 + 4)
        st = h.stack
        st.open()
        st.open()  # a second open keeps the first socket
        run3 = [payload(i)[:100].ljust(100, b"r") for i in range(3)]
        st.send_many([memoryview(p) for p in run3])  # type: ignore[attr-defined]
        blob = b"".join(payload(i)[:100].ljust(100, b"g") for i in range(3, 7))[:-30]
        st.send_gso(memoryview(blob), 100)  # type: ignore[attr-defined]
        want = run3 + [blob[k:k + 100] for k in range(0, len(blob), 100)]
        await h.until(lambda: len(h.got) >= len(want), f"{len(want)} echoes")
        await asyncio.sleep(0.05)
        assert sorted(h.got) == sorted(want)
        m = st.metrics
        assert (m.packets_out, m.bytes_out, m.drops) == (7, 670, 0)
        assert h.errors == []
        st.close()
        srv.close()

    run(main())


def test_udp_gso_refused_falls_back_one_by_one() -> None:
    """A socket that refuses UDP_SEGMENT (SO_NO_CHECK: EINVAL): the first GSO send turns
    GSO off and resends one by one; later runs go one by one; nothing lost, no errors."""
    async def main() -> None:
        r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        r.bind(("127.0.0.1", 0))
        r.settimeout(5)
        h = Harness("udp", 4, r.getsockname())
        st = h.stack
        st.open()
        st._sock.setsockopt(socket.SOL_SOCKET, 11, 1)  # type: ignore[attr-defined]
        st.send_many([memoryview(b"a" * 100)] * 3)  # type: ignore[attr-defined]
        assert st.gso is False  # type: ignore[attr-defined]
        st.send_gso(memoryview(b"b" * 250), 100)  # type: ignore[attr-defined]
        st.gso = True  # type: ignore[attr-defined]
        st.send_gso(memoryview(b"c" * 200), 100)  # type: ignore[attr-defined]
        got = [r.recv(65535) for _ in range(8)]
        assert got == [b"a" * 100] * 3 + [b"b" * 100] * 2 + [b"b" * 50] + [b"c" * 100] * 2
        m = st.metrics
        assert (m.packets_out, m.bytes_out, m.drops) == (8, 750, 0)
        assert h.errors == [] and st.gso is False  # type: ignore[attr-defined]
        st.close()
        r.close()

    run(main())


def test_bad_options_name_the_key() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()

        def ctx(**opts: Any) -> StackContext:
            return StackContext(loop=loop, family=4, target=("127.0.0.1", 9),
                                deliver=lambda _b: None, on_error=lambda _e: None,
                                options=opts)

        cases: list[tuple[type[Stack], dict[str, Any], str]] = [
            (TcpStack, {"prefix": 3}, "stacks.tcp.prefix"),
            (TcpStack, {"buffer": -1}, "stacks.tcp.buffer"),
            (TcpStack, {"nodelay": "yes"}, "stacks.tcp.nodelay"),
            (TcpStack, {"colour": 1}, "colour"),
            (TcpStack, {"max_datagram": 70_000}, "max_len"),
            (MptcpStack, {"fallback": 1}, "stacks.mptcp.fallback"),
            (UdpLiteStack, {"send_cscov": 5}, "stacks.udplite.send_cscov"),
            (UdpLiteStack, {"recv_cscov": 70_000}, "stacks.udplite.recv_cscov"),
            (UdpLiteStack, {"dscp": 64}, "stacks.udplite.dscp"),
        ]
        for cls, opts, needle in cases:
            with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
                cls(ctx(**opts))
            with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
                getattr(cls, "check_options")(opts)  # noqa: B009  (config-time check)
        assert TcpStack.check_options({"prefix": 4})["buffer"] == 1 << 20
        assert MptcpStack.check_options(None)["fallback"] is True
        assert UdpLiteStack.check_options({"send_cscov": 12})["send_cscov"] == 12
        assert {"tcp", "mptcp", "udplite"} <= set(STACKS)

    run(main())


# ------------------------------------------------------------------ root: marks, wire
@pytest.mark.root
def test_fwmark_and_device_are_set_on_the_sockets() -> None:
    async def main() -> None:
        srv = await start_framed_server(0, echo=True, bind="127.0.0.1")
        usrv = await start_udplite_server(0, echo=True, bind="127.0.0.1")
        for name, port in (("tcp", srv.port), ("udplite", usrv.port)):
            h = Harness(name, 4, ("127.0.0.1", port))
            h.ctx.fwmark = 0x5A5A
            h.ctx.interface = "lo"
            h.stack.open()
            s = h.stack._sock  # type: ignore[attr-defined]
            assert s.getsockopt(socket.SOL_SOCKET, 36) == 0x5A5A  # SO_MARK
            assert s.getsockopt(socket.SOL_SOCKET, 25, 16).rstrip(b"\0") == b"lo"
            h.stack.send(b"ping")
            await h.until(h.delivered([b"ping"]), f"{name} echo over lo")
            h.stack.close()
        srv.close()
        usrv.close()
        await srv.wait_closed()

    run(main())


@pytest.mark.root
@pytest.mark.parametrize(("opts", "want"), [({}, 8 + 16), ({"send_cscov": 8 + 4}, 12)],
                         ids=["full", "header+4"])
def test_udplite_coverage_on_the_wire(opts: dict[str, int], want: int) -> None:
    """A raw IPPROTO_UDPLITE socket sees the Checksum Coverage field the stack sent
    (RFC 3828 §3.1: bytes 4-5 of the header). For full coverage Linux writes the
    datagram's length (8 + 16 here), which the RFC allows as well as 0."""

    async def main() -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_UDPLITE)
        raw.settimeout(5)
        srv = await start_udplite_server(0, bind="127.0.0.1")
        h = Harness("udplite", 4, ("127.0.0.1", srv.port), **opts)
        h.stack.open()
        h.stack.send(b"0123456789abcdef")
        await h.until(lambda: srv.stats.packets == 1, "the server got it")
        cov = None
        for _ in range(50):
            pkt = raw.recv(65535)
            ihl = (pkt[0] & 0x0F) * 4
            if int.from_bytes(pkt[ihl + 2:ihl + 4], "big") == srv.port:
                cov = int.from_bytes(pkt[ihl + 4:ihl + 6], "big")
                break
        assert cov == want
        h.stack.close()
        srv.close()
        raw.close()

    run(main())


MPTCP_OFF = textwrap.dedent("""
    import asyncio, json
    from vstack.execution.stacks.base import StackContext
    from vstack.execution.stacks.mptcp import MptcpStack, MptcpUnavailable
    from vstack.servers import start_framed_server

    async def main():
        srv = await start_framed_server(0, echo=True, bind="127.0.0.1")
        got, errs = [], []
        ctx = StackContext(loop=asyncio.get_running_loop(), family=4,
                           target=("127.0.0.1", srv.port), deliver=got.append,
                           on_error=errs.append)
        st = MptcpStack(ctx)
        st.open()
        st.send(b"hello")
        for _ in range(1000):
            if got:
                break
            await asyncio.sleep(0.01)
        ctx2 = StackContext(loop=ctx.loop, family=4, target=ctx.target,
                            deliver=got.append, on_error=errs.append,
                            options={"fallback": False})
        try:
            MptcpStack(ctx2).open()
            refused = ""
        except MptcpUnavailable as e:
            refused = str(e)
        print(json.dumps({"got": [g.decode() for g in got], "plain_tcp": st.plain_tcp,
                          "errors": [[e.reason, e.remote] for e in errs],
                          "refused": refused}))
        st.close()
        srv.close()

    asyncio.run(main())
""")


@pytest.mark.root
def test_mptcp_disabled_falls_back_with_a_clear_error() -> None:
    if mptcp_available():
        pytest.skip(mptcp_available() or "")
    ns = f"vsmp{os.getpid() % 1000:03d}{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        ex = ["ip", "netns", "exec", ns]
        subprocess.run([*ex, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run([*ex, "sysctl", "-q", "-w", "net.mptcp.enabled=0"], check=True)
        p = subprocess.run([*ex, sys.executable, "-c", MPTCP_OFF], capture_output=True,
                           text=True, timeout=30, cwd=Path(__file__).parents[2])
        assert p.returncode == 0, p.stderr
        r = json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert r["got"] == ["hello"] and r["plain_tcp"] is True
    assert len(r["errors"]) == 1
    reason, remote = r["errors"][0]
    assert "net.mptcp.enabled = 0" in reason and "falling back to TCP" in reason
    assert remote is False
    assert "net.mptcp.enabled = 0" in r["refused"]


# ------------------------------------------------------------------ root: through the VNIC
UDP_CLIENT = textwrap.dedent("""
    import json, socket, sys
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    def payload(i):
        return i.to_bytes(4, "big") + bytes((i + k) & 0xFF for k in range((i * 37) % 1196))
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(15)  # a loaded 2-core host can stall this long; a lost reply ends the run
    got, bad, wrong_src, sent = {}, 0, 0, 0
    while len(got) < n:
        while sent < n and sent - len(got) < 64:
            s.sendto(payload(sent), (host, port))
            sent += 1
        try:
            data, peer = s.recvfrom(65535)
        except socket.timeout:
            break
        wrong_src += (peer[0], peer[1]) != (host, port)
        seq = int.from_bytes(data[:4], "big")
        if seq >= n or data != payload(seq):
            bad += 1
            continue
        got[seq] = got.get(seq, 0) + 1
    print(json.dumps({"sent": sent, "unique": len(got), "dups": sum(v - 1 for v in got.values()),
                      "bad": bad, "wrong_src": wrong_src}), flush=True)
""")

FRAMED_ECHO = ("import asyncio; from vstack.servers import serve_framed; "
               "asyncio.run(serve_framed(9100, echo=True, bind='::', "
               "ready=lambda s: print('ready', flush=True)))")

# ``vstack run`` with the TCP/MPTCP/UDP-Lite stacks registered (the daemon imports only
# the stacks it knows; importing these modules is what registers them)
DAEMON = ("import vstack.execution.stacks.tcp, vstack.execution.stacks.mptcp, "
          "vstack.execution.stacks.udplite; from vstack.cli import main; main()")


@pytest.mark.root
@pytest.mark.timeout(180)
def test_unmodified_udp_client_through_the_vnic_over_tcp(tmp_path: Path) -> None:
    """An ordinary UDP client in the edge netns; vstack (``default_stack = "tcp"``) carries
    its flow as framed TCP to the framed echo server in the server netns; the replies come
    back to the client as UDP from the address it sent to."""
    import signal
    import time

    from vstack.testbed import Testbed

    cfg = tmp_path / "vstack.toml"
    cfg.write_text('[vnic]\nname = "vstk0"\n[execution]\ndefault_stack = "tcp"\n'
                   "metrics_interval_s = 0.2\n[stacks.tcp]\nprefix = 2\nreconnect = 0.2\n")
    log = tmp_path / "vstack.log"
    with Testbed(prefix="vx") as tb, log.open("wb") as logf:
        echo = tb.popen(tb.server, [sys.executable, "-c", FRAMED_ECHO],
                        stdout=subprocess.PIPE, text=True)
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        d = tb.popen(tb.edge, [sys.executable, "-c", DAEMON, "run", "--config", str(cfg)],
                     stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while "vstack ready" not in log.read_text():
            assert d.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        try:
            link = tb.links[0]
            for host in (link.server4, link.server6):
                p = tb.run(tb.edge, [sys.executable, "-c", UDP_CLIENT, host, "9100", str(N)],
                           timeout=90)
                r = json.loads(p.stdout.strip().splitlines()[-1])
                assert r == {"sent": N, "unique": N, "dups": 0, "bad": 0, "wrong_src": 0}, (
                    host, r, log.read_text()[-3000:])
            text = log.read_text()
            assert f"created: stack=tcp target={link.server4}:9100" in text
            assert f"created: stack=tcp target=[{link.server6}]:9100" in text
        finally:
            d.send_signal(signal.SIGTERM)
            rc = d.wait(15)
        assert rc == 0, log.read_text()[-3000:]


MPTCP_CLIENT = textwrap.dedent("""
    import asyncio, json, sys
    from vstack.execution.stacks.base import StackContext
    from vstack.execution.stacks.mptcp import MptcpStack

    async def main():
        host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        got, errs = [], []
        ctx = StackContext(loop=asyncio.get_running_loop(), family=4, target=(host, port),
                           deliver=got.append, on_error=errs.append,
                           options={"rtt_interval": 0.05})
        st = MptcpStack(ctx)
        st.open()
        sent = [i.to_bytes(4, "big") * (1 + i % 300) for i in range(n)]
        for i, p in enumerate(sent):
            st.send(p)
            if i % 100 == 99:
                await asyncio.sleep(0)
        for _ in range(2000):
            if len(got) >= n and st.subflows >= 1:
                break
            await asyncio.sleep(0.01)
        print(json.dumps({"in_order": got == sent, "got": len(got), "subflows": st.subflows,
                          "negotiated": st.negotiated, "errors": [e.reason for e in errs]}))
        st.close()

    asyncio.run(main())
""")


@pytest.mark.root
@pytest.mark.timeout(120)
def test_mptcp_opens_a_second_subflow_over_the_second_link() -> None:
    """The server netns announces its second address (10.201.2.2, on the second veth
    pair); the edge's path manager adds a subflow to it; the datagrams still arrive
    exactly once and in order."""
    if why := mptcp_available():
        pytest.skip(why)
    from vstack.testbed import Testbed

    with Testbed(prefix="vm") as tb:
        l1, l2 = tb.links
        for ns in (tb.edge, tb.server):
            tb.run(ns, ["ip", "mptcp", "limits", "set", "subflows", "2",
                        "add_addr_accepted", "2"])
        tb.run(tb.server, ["ip", "mptcp", "endpoint", "add", l2.server4, "dev",
                           l2.server_if, "signal"])
        echo = tb.popen(tb.server, [sys.executable, "-c",
                                    FRAMED_ECHO.replace("echo=True", "echo=True, mptcp=True")],
                        stdout=subprocess.PIPE, text=True)
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        p = tb.run(tb.edge, [sys.executable, "-c", MPTCP_CLIENT, l1.server4, "9100", str(N)],
                   timeout=60)
        r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["in_order"] and r["got"] == N, r
    assert r["negotiated"] is True and r["errors"] == [], r
    assert r["subflows"] >= 1, r

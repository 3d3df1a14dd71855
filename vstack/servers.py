"""Test servers for the stream and UDP-Lite stacks (asyncio, one loop).

* **Framed TCP / MPTCP** (``start_framed_server``): accepts connections; each carries
  length-prefixed datagrams (``vstack.execution.stacks.framing``, the TCP and MPTCP stacks'
  wire format). As a *sink* it counts them; as an *echo* it sends each datagram back as a
  frame on the same connection, in order. A connection that sends a bad frame is counted
  in ``errors`` and closed. ``mptcp=True`` listens on an IPPROTO_MPTCP socket (plain TCP
  clients are still accepted: the kernel falls back).
* **UDP-Lite** (``start_udplite_server``): a UDP-Lite socket (RFC 3828) that counts the
  datagrams it receives, and as an echo sends each back to its sender.

Both count packets and bytes in ``ServerStats`` and call ``on_datagram(nbytes)`` per
datagram when given (for per-10 ms bins). ``serve_framed`` / ``serve_udplite`` run one
until cancelled or for ``seconds`` and return the totals: the shape a ``vstack serve``
command wants. ``bind`` defaults to ``"::"`` (IPv4 and IPv6); ``port=0`` picks a free port
(``server.port``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from vstack.execution.stacks.framing import (
    DEFAULT_MAX_LEN,
    Decoder,
    FrameDecodeError,
    check_params,
    encode_into,
)
from vstack.execution.stacks.mptcp import IPPROTO_MPTCP, mptcp_unavailable_reason
from vstack.execution.stacks.udplite import IPPROTO_UDPLITE, set_cscov

BUF_SIZE = 4 << 20  # socket buffers of the UDP-Lite server (capped by net.core.rmem_max)


_MPTCP_REFUSED = (errno.ENOPROTOOPT, errno.EPROTONOSUPPORT, errno.EINVAL, errno.EAFNOSUPPORT)


@dataclass(slots=True)
class ServerStats:
    packets: int = 0
    bytes: int = 0
    echoed: int = 0
    connections: int = 0  # accepted (framed servers)
    errors: int = 0  # bad frames, socket errors


class ServerError(OSError):
    """A server that cannot start (port taken, no MPTCP, bad parameter)."""


def _listen_socket(bind: str, port: int, kind: int, proto: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
    s = socket.socket(fam, kind, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6 and bind == "::":
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((bind, port))
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


class Server:
    """A running server: ``port``, ``stats``, ``close()``, ``await wait_closed()``."""

    def __init__(self, sock: socket.socket, stats: ServerStats) -> None:
        self.sock = sock
        self.stats = stats
        self.port: int = sock.getsockname()[1]
        self.address: str = sock.getsockname()[0]

    def close(self) -> None:
        raise NotImplementedError

    async def wait_closed(self) -> None:
        return None

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


# ------------------------------------------------------------------ framed TCP / MPTCP
class _FramedConnection(asyncio.Protocol):
    def __init__(self, server: FramedServer) -> None:
        self.server = server
        self.decoder = Decoder(server.prefix, server.max_len)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.stats.connections += 1
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        srv = self.server
        st = srv.stats
        count = srv.on_datagram
        out = bytearray() if srv.echo else None
        try:
            for d in self.decoder.feed(data):
                n = len(d)
                st.packets += 1
                st.bytes += n
                if count is not None:
                    count(n)
                if out is not None:
                    encode_into(out, d, srv.prefix, srv.max_len)
                    st.echoed += 1
        except FrameDecodeError:
            st.errors += 1
            if out and self.transport is not None:
                self.transport.write(out)
            self._close()
            return
        if out and self.transport is not None:
            self.transport.write(out)

    def eof_received(self) -> bool:
        try:
            self.decoder.eof()
        except FrameDecodeError:
            self.server.stats.errors += 1
        return False  # close our side too

    # an echo to a client that does not read: stop reading from it (backpressure)
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class FramedServer(Server):
    def __init__(self, sock: socket.socket, stats: ServerStats, *, echo: bool, prefix: int,
                 max_len: int, on_datagram: Callable[[int], None] | None) -> None:
        super().__init__(sock, stats)
        self.echo = echo
        self.prefix = prefix
        self.max_len = max_len
        self.on_datagram = on_datagram
        self.connections: set[_FramedConnection] = set()
        self.server: asyncio.Server | None = None

    def close(self) -> None:
        """Stop listening and drop every connection at once (clients see a reset)."""
        if self.server is not None:
            self.server.close()
        for c in list(self.connections):
            c.abort()

    async def wait_closed(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)


async def start_framed_server(port: int = 0, *, echo: bool = False, bind: str = "::",
                              mptcp: bool = False, prefix: int = 2,
                              max_len: int = DEFAULT_MAX_LEN,
                              on_datagram: Callable[[int], None] | None = None,
                              backlog: int = 128) -> FramedServer:
    """Listen for framed TCP (or MPTCP) connections on ``bind``:``port``."""
    try:
        check_params(prefix, max_len)
    except ValueError as e:
        raise ServerError(f"framed server: {e}") from None
    proto = IPPROTO_MPTCP if mptcp else 0
    try:
        sock = _listen_socket(bind, port, socket.SOCK_STREAM, proto)
    except OSError as e:
        if mptcp and e.errno is not None and e.errno in _MPTCP_REFUSED:
            raise ServerError(e.errno, mptcp_unavailable_reason(e)) from e
        raise ServerError(e.errno, f"cannot listen on {bind} port {port}: {e.strerror}") \
            from e
    sock.listen(backlog)
    srv = FramedServer(sock, ServerStats(), echo=echo, prefix=prefix, max_len=max_len,
                       on_datagram=on_datagram)
    loop = asyncio.get_running_loop()
    srv.server = await loop.create_server(lambda: _FramedConnection(srv), sock=sock)
    return srv


# ------------------------------------------------------------------ UDP-Lite
RECV_BATCH = 256


class UdpLiteServer(Server):
    """Reads with ``add_reader``, draining up to ``RECV_BATCH`` datagrams per wakeup (the
    asyncio datagram transport reads one per loop turn, too slow for a sink)."""

    def __init__(self, sock: socket.socket, stats: ServerStats, *, echo: bool,
                 on_datagram: Callable[[int], None] | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(sock, stats)
        self.echo = echo
        self.on_datagram = on_datagram
        self.loop = loop
        self._closed = False
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        sock = self.sock
        recvfrom = sock.recvfrom
        sendto = sock.sendto
        st = self.stats
        count = self.on_datagram
        echo = self.echo
        for _ in range(RECV_BATCH):
            try:
                data, addr = recvfrom(65535)
            except BlockingIOError:
                return
            except OSError:
                st.errors += 1
                return
            n = len(data)
            st.packets += 1
            st.bytes += n
            if count is not None:
                count(n)
            if echo:
                try:
                    sendto(data, addr)
                    st.echoed += 1
                except OSError:  # EAGAIN (buffer full) or the sender is gone: drop it
                    st.errors += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError, RuntimeError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def start_udplite_server(port: int = 0, *, echo: bool = False, bind: str = "::",
                               send_cscov: int = 0, recv_cscov: int = 0,
                               on_datagram: Callable[[int], None] | None = None
                               ) -> UdpLiteServer:
    """A UDP-Lite sink/echo on ``bind``:``port``; ``send_cscov``/``recv_cscov`` as for the
    UDP-Lite stack (0 = full coverage / accept any)."""
    for name, v in (("send_cscov", send_cscov), ("recv_cscov", recv_cscov)):
        if not (v == 0 or 8 <= v <= 0xFFFF):
            raise ServerError(f"udplite server: {name} must be 0 or 8..65535, got {v!r}")
    try:
        sock = _listen_socket(bind, port, socket.SOCK_DGRAM, IPPROTO_UDPLITE)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, BUF_SIZE)
        set_cscov(sock, send_cscov, recv_cscov)
    except OSError as e:
        raise ServerError(e.errno, f"cannot bind UDP-Lite on {bind} port {port}: "
                          f"{e.strerror}") from e
    return UdpLiteServer(sock, ServerStats(), echo=echo, on_datagram=on_datagram,
                         loop=asyncio.get_running_loop())


# ------------------------------------------------------------------ run until done
async def _run(srv: Server, seconds: float | None,
               ready: Callable[[Server], None] | None) -> ServerStats:
    if ready is not None:
        ready(srv)
    try:
        if seconds is None:
            await asyncio.Event().wait()  # until cancelled
        else:
            await asyncio.sleep(seconds)
    finally:
        srv.close()
        await srv.wait_closed()
    return srv.stats


async def serve_framed(port: int, *, echo: bool = False, bind: str = "::",
                       mptcp: bool = False, prefix: int = 2, seconds: float | None = None,
                       on_datagram: Callable[[int], None] | None = None,
                       ready: Callable[[Server], None] | None = None) -> ServerStats:
    """Run a framed TCP/MPTCP sink (or echo) until cancelled or ``seconds`` pass."""
    srv = await start_framed_server(port, echo=echo, bind=bind, mptcp=mptcp, prefix=prefix,
                                    on_datagram=on_datagram)
    return await _run(srv, seconds, ready)


async def serve_udplite(port: int, *, echo: bool = False, bind: str = "::",
                        send_cscov: int = 0, recv_cscov: int = 0,
                        seconds: float | None = None,
                        on_datagram: Callable[[int], None] | None = None,
                        ready: Callable[[Server], None] | None = None) -> ServerStats:
    """Run a UDP-Lite sink (or echo) until cancelled or ``seconds`` pass."""
    srv = await start_udplite_server(port, echo=echo, bind=bind, send_cscov=send_cscov,
                                     recv_cscov=recv_cscov, on_datagram=on_datagram)
    return await _run(srv, seconds, ready)

"""asyncio adapter for the sans-IO DCCP connection (:mod:`vstack.dccp.connection`).

The connection takes decoded packets, datagrams and ``now`` and hands back packets, timers
and events; this module does the I/O around it, on the one event loop:

* packets out: ``conn.packets_to_send(now)`` -> :func:`~vstack.dccp.packet.encode` with the
  pseudo-header addresses -> a :class:`~vstack.dccp.transport.DccpSocket`;
* packets in: the socket's reader callback -> demultiplex by (remote address, remote port,
  local port) -> :func:`~vstack.dccp.packet.decode` (checksum verified) -> ``conn.receive``;
  malformed packets are counted and dropped. Over DCCP-UDP (RFC 6773) the DCCP checksum is
  sent as zero and ignored on receipt (§3.3; the UDP checksum, which the kernel checks,
  covers the packet instead);
* timers: ``conn.next_timer()`` -> one ``loop.call_at`` per endpoint, re-armed after every
  input (the loop's clock is the connection's ``now``);
* events: ``conn.next_event()`` -> the owner's callback.

:class:`DccpClient` is one connection (the DCCP stack's, or a test's); :class:`DccpServer`
is a listener that accepts many connections on one port, each demultiplexed by its
(address, port), as a sink (counting) or an echo.

DCCP-UDP (RFC 6773 §3.8): the UDP ports are not the DCCP ports. A client opens its own UDP
socket per connection (a distinct UDP source port for each DCCP connection) and sends to
the server's UDP port (``udp_port``, by default the same number as its DCCP port). A server
listens on one UDP port, takes datagrams from any UDP source port, and demultiplexes by the
UDP 4-tuple first, then by the DCCP ports inside: of the two methods of §3.8 it implements
the first, one active DCCP connection per UDP 4-tuple; a packet on that 4-tuple with other
DCCP ports (or another local address) never reaches the DCCP module and gets a Reset with
code 12, Encapsulated Port Reuse (§7.2: Data 1 the packet's type, Data 2-3 its UDP source
port).

Sequence Window: the endpoints here announce a local Sequence Window of
:data:`ENDPOINT_SEQUENCE_WINDOW` (1000) unless ``conn_options`` says otherwise; the sans-IO
connection's own default stays RFC 4340's 100. The feature is non-negotiated (§6.4, §7.5.2):
each endpoint announces its own with Change L and the peer takes it. CCID2's cwnd is capped
at Sequence Window / 5 (as Linux), so with 100 the window stops at 20 packets and the DCCP
stack and ``vstack serve dccp`` ran at half their rate (docs/speed.md). Likewise CCID2's Ack
Ratio may grow to :data:`ENDPOINT_MAX_ACK_RATIO` (100) here, not 2, so in practice to
cwnd/2 (RFC 4341 §6.1.2; Linux's CCID2 also goes to cwnd/2): each ack a receiver does not
send saves a syscall and a wake-up of the sender, and an ack to process at the sender.
With CCID2's window at its cap of 200 that is an ack per 100 packets; the endpoint sends
it the moment it is due, in the middle of a read batch (``DccpConnection.ack_due``).
Through vstack (``bench throughput --stack dccp``, one run each, alternately, loaded
host): Ack Ratio 10 -> 6.4-8.0 kpps, 40 -> 10.7-17.8, 100 -> 19.3 (docs/dccp-transport.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vstack.dccp import connection as dc
from vstack.dccp.ccid2 import Ccid2Config
from vstack.dccp.checksum import check as checksum_ok
from vstack.dccp.connection import reset_reply
from vstack.dccp.packet import (
    DataEncoder,
    DccpPacket,
    DccpParseError,
    PacketType,
    ResetCode,
    decode,
    encode,
    plain_data,
)
from vstack.dccp.transport import (
    DccpSocket,
    RawDccpSocket,
    RxDatagram,
    TransportError,
    UdpDccpSocket,
    open_socket,
)

log = logging.getLogger("vstack.dccp")

if TYPE_CHECKING:
    from vstack.cli.serve import BinCounter

DEFAULT_SERVICE = 0x44434350  # "DCCP"
ENDPOINT_SEQUENCE_WINDOW = 1000  # the endpoints' default local Sequence Window (see above)
ENDPOINT_MAX_ACK_RATIO = 100  # CCID2's Ack Ratio bound; the rule is <= cwnd/2 (RFC 4341 §6.1.2)


def _conn_config(service_code: int, conn_options: dict[str, Any] | None) -> dc.DccpConfig:
    opts: dict[str, Any] = {"sequence_window": ENDPOINT_SEQUENCE_WINDOW,
                            "ccid2": Ccid2Config(max_ack_ratio=ENDPOINT_MAX_ACK_RATIO)}
    opts.update(conn_options or {})
    return dc.DccpConfig(service_code=service_code, **opts)

EventCallback = Callable[[Any], None]


@dataclass(slots=True)
class EndpointStats:
    rx_packets: int = 0
    rx_malformed: int = 0  # failed to decode (bad checksum included): counted and dropped
    rx_checksum: int = 0
    tx_packets: int = 0
    tx_dropped: int = 0  # the kernel refused (socket buffer full)


class DccpEndpoint:
    """Drives one :class:`~vstack.dccp.connection.DccpConnection` on the event loop."""

    def __init__(self, conn: Any, sock: DccpSocket, local_ip: str, remote_ip: str,
                 loop: asyncio.AbstractEventLoop, on_event: EventCallback | None = None,
                 udp_port: int = 0) -> None:
        self.conn = conn
        self.sock = sock
        self.local_ip = local_ip
        self.remote_ip = remote_ip
        self.udp_port = udp_port
        self._verify = sock.dccp_checksum  # False for DCCP-UDP (RFC 6773 §3.3)
        self.loop = loop
        self.on_event = on_event
        self.stats = EndpointStats()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._pump_scheduled = False
        self.closed = False
        # the send hot path: this connection's Data headers, one preallocated buffer
        self._enc = DataEncoder(conn.sport, conn.dport)
        self._txbuf = bytearray(_GSO_BYTES + 2048)

    # ------------------------------------------------------------------ inputs
    def now(self) -> float:
        return self.loop.time()

    def feed(self, data: bytes | memoryview, src: str, dst: str) -> None:
        """One received DCCP packet (bytes) for this connection."""
        self.stats.rx_packets += 1
        fast = plain_data(data)  # a plain DCCP-Data: no DccpPacket, no option parsing
        if fast is not None and (not self._verify or checksum_ok(data, src, dst)):
            conn = self.conn
            if fast[0] == conn.dport and fast[1] == conn.sport:
                if self.closed:
                    return
                conn.receive_data(fast[2], fast[3], self.now())
                self._received()
                return
        try:
            pkt = decode(data, src, dst, verify=self._verify)
        except DccpParseError as e:
            self.stats.rx_malformed += 1
            if type(e).__name__ == "DccpChecksumError":
                self.stats.rx_checksum += 1
            return
        self.feed_packet(pkt)

    def feed_packet(self, pkt: DccpPacket) -> None:
        if self.closed:
            return
        self.conn.receive(pkt, self.now())
        self._received()

    def _received(self) -> None:
        if self.conn.ack_due:
            # the Ack Ratio is reached in the middle of a read batch: ack now. One ack per
            # batch (up to 256 packets) left a CCID2 sender with a window of 200 waiting a
            # whole batch for each ack, both ends taking turns (issue 6, docs/speed.md)
            self.pump()
        else:
            self.schedule()

    def send(self, data: bytes) -> bool:
        """Queue one datagram; False when the connection refused it (queue full / closed).
        What the connection sends goes out once the current callback (a TUN or socket
        batch) is done: one pump per batch, not per datagram."""
        if self.closed:
            return False
        ok = bool(self.conn.send(data, self.now()))
        self.schedule()
        return ok

    def send_many(self, datas: list[Any]) -> int:
        """Queue datagrams in order until the connection refuses one; returns how many it
        took (a batch from the fast path: one clock read and one pump for all)."""
        if self.closed:
            return 0
        send = self.conn.send
        now = self.now()
        n = 0
        for d in datas:
            if not send(d, now):
                break
            n += 1
        self.schedule()
        return n

    def close(self) -> None:
        """Graceful close (Close -> Reset(Closed)); the owner sees ConnectionClosed."""
        if self.closed:
            return
        self.conn.close(self.now())
        self.pump()

    def schedule(self) -> None:
        """Pump soon (after the batch being processed), once."""
        if not self._pump_scheduled and not self.closed:
            self._pump_scheduled = True
            self.loop.call_soon(self._scheduled_pump)

    def _scheduled_pump(self) -> None:
        self._pump_scheduled = False
        if not self.closed:
            self.pump()

    def abort(self) -> None:
        """Stop driving the connection at once (no packets), cancel the timer."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.closed:
            return
        self.conn.handle_timer(self.now())
        self.pump()

    # ----------------------------------------------------------------- outputs
    def pump(self) -> None:
        """Send what the connection has, hand out its events, re-arm its timer."""
        now = self.now()
        pkts = self.conn.packets_to_send_plain(now)  # plain Data as (seq, payload)
        if pkts:
            st = self.stats
            before = st.tx_packets + st.tx_dropped
            try:
                self._send_packets(pkts)
            except (TransportError, ValueError, struct.error, BufferError) as e:
                # a local failure: the packets not yet accounted are dropped (CCID2 sees
                # them lost), and the events and the timer below still run, so the
                # connection is never wedged
                st.tx_dropped += len(pkts) - (st.tx_packets + st.tx_dropped - before)
                if not isinstance(e, TransportError):
                    log.warning("DCCP send failed (%s: %s); %d packets dropped",
                                type(e).__name__, e, len(pkts))
        while True:
            ev = self.conn.next_event()
            if ev is None:
                break
            if self.on_event is not None:
                self.on_event(ev)
        if self.closed:
            return
        # A timer that fires early is harmless (handle_timer checks its deadlines and we
        # re-arm), so only an *earlier* deadline replaces the armed one: no heap churn
        # when CCID2 pushes its RTO forward on every packet.
        t = self.conn.next_timer()
        if t is not None and (self._timer_at is None or t < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = t
            self._timer = self.loop.call_at(max(t, now), self._on_timer)


    def _send_packets(self, pkts: list[DccpPacket | tuple[int, bytes]]) -> None:
        """Put ``pkts`` on the wire in order. Plain Data/DataAck (no options: nearly all of
        a bulk transfer) are packed by the connection's :class:`DataEncoder` into one
        preallocated buffer, no per-packet objects (issue 6): DCCP-UDP sends each run of
        equal-size packets from it with one ``UDP_SEGMENT`` sendmsg; raw DCCP packs each
        with its checksum and sends it from the buffer. Others go through ``encode``."""
        sock, enc, buf = self.sock, self._enc, self._txbuf
        st = self.stats
        remote, uport = self.remote_ip, self.udp_port
        plain = DataEncoder.plain
        if isinstance(sock, UdpDccpSocket):
            mv = memoryview(buf)
            off = seg = count = 0
            for pkt in pkts:
                if isinstance(pkt, tuple):  # a plain Data: (seq, payload)
                    seq, payload = pkt
                    ack = None
                elif plain(pkt) and pkt.sport == enc.sport and pkt.dport == enc.dport:
                    seq, payload, ack = pkt.seq, pkt.payload, pkt.ack
                else:
                    seq = -1
                if seq >= 0:
                    ln = (16 if ack is None else 24) + len(payload)
                    if count and (ln > seg or off + ln > _GSO_BYTES or count >= _GSO_SEGS):
                        ok = sock.send_packed(mv[:off], seg, remote, uport)
                        st.tx_packets += ok
                        st.tx_dropped += count - ok
                        off = count = 0
                    if not count:
                        seg = ln
                    off += enc.pack_into(buf, off, seq, payload, ack)
                    count += 1
                    if ln == seg:
                        continue  # a shorter one ends the run: it is flushed below
                if count:
                    ok = sock.send_packed(mv[:off], seg, remote, uport)
                    st.tx_packets += ok
                    st.tx_dropped += count - ok
                    off = count = 0
                    if seq >= 0:
                        continue  # it was the short end of that run
                self._send_one(pkt)  # type: ignore[arg-type]
            if count:
                ok = sock.send_packed(mv[:off], seg, remote, uport)
                st.tx_packets += ok
                st.tx_dropped += count - ok
            return
        local = self.local_ip
        for pkt in pkts:  # raw DCCP: no GSO; pack with the checksum, send from the buffer
            if isinstance(pkt, tuple):
                n = enc.pack_into(buf, 0, pkt[0], pkt[1], None, local, remote)
                if sock.sendto(memoryview(buf)[:n], remote, uport):
                    st.tx_packets += 1
                else:
                    st.tx_dropped += 1
            elif plain(pkt) and pkt.sport == enc.sport and pkt.dport == enc.dport:
                n = enc.pack_into(buf, 0, pkt.seq, pkt.payload, pkt.ack, local, remote)
                if sock.sendto(memoryview(buf)[:n], remote, uport):
                    st.tx_packets += 1
                else:
                    st.tx_dropped += 1
            else:
                self._send_one(pkt)

    def _send_one(self, pkt: DccpPacket) -> None:
        try:
            data = _encode(self.sock, pkt, self.local_ip, self.remote_ip)
            ok = self.sock.sendto(data, self.remote_ip, self.udp_port)
        except (TransportError, ValueError):
            ok = False
        if ok:
            self.stats.tx_packets += 1
        else:
            self.stats.tx_dropped += 1


_GSO_SEGS = 64  # UDP GSO: at most 64 segments and 64 KB per sendmsg
_GSO_BYTES = 65000


def _encode(sock: DccpSocket, pkt: DccpPacket, local_ip: str, remote_ip: str) -> bytes:
    """``pkt``'s bytes for ``sock``: with the DCCP checksum (raw), or with the field left zero
    for DCCP-UDP (RFC 6773 §3.3: the kernel's UDP checksum covers it)."""
    if sock.dccp_checksum:
        return encode(pkt, local_ip, remote_ip)
    return encode(pkt, None, None)


# --------------------------------------------------------------------------- client
def _ports(data: bytes | memoryview) -> tuple[int, int] | None:
    if len(data) < 12:
        return None
    sp, dp = struct.unpack_from("!HH", data, 0)
    return sp, dp


# Raw DCCP has no kernel port reservation (the host has no DCCP): this process's clients
# must not pick the same local port towards the same peer, or their packets would mix.
# Forked workers (``vstack run --workers N``) share the host's raw DCCP ports too, so each
# process draws from its own slice of the range (:func:`set_port_slice`).
PORT_LO, PORT_HI = 20000, 60999  # the client port range (both ends included)
_ports_in_use: set[tuple[tuple[str, int], int]] = set()
_port_range: tuple[int, int] = (PORT_LO, PORT_HI)


def set_port_slice(index: int, count: int) -> tuple[int, int]:
    """Draw this process's client ports from slice ``index`` of ``count`` equal, disjoint
    slices of the range (worker ``index`` of ``count``); returns the slice (lo, hi).
    ``count`` 1 restores the whole range."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"port slice {index} of {count}: need 0 <= index < count")
    size = (PORT_HI - PORT_LO + 1) // count
    if size < 1:
        raise ValueError(f"port slice: {count} slices of {PORT_HI - PORT_LO + 1} ports")
    global _port_range
    lo = PORT_LO + index * size
    _port_range = (lo, lo + size - 1)
    return _port_range


def port_slice() -> tuple[int, int]:
    """The (lo, hi) range this process draws client ports from."""
    return _port_range


def _allocate_port(remote: tuple[str, int]) -> int:
    lo, hi = _port_range
    for _ in range(1000):
        port = random.randint(lo, hi)
        if (remote, port) not in _ports_in_use:
            _ports_in_use.add((remote, port))
            return port
    for port in range(lo, hi + 1):  # a nearly full slice: look at every port once
        if (remote, port) not in _ports_in_use:
            _ports_in_use.add((remote, port))
            return port
    raise TransportError(errno.EADDRINUSE, f"no free local DCCP port towards {remote}")


def _is_failure(ev: Any) -> bool:
    """An event that ends a connection that is not ours to end (ConnectionClosed follows)."""
    return isinstance(ev, dc.ResetReceived | dc.PeerTimeout | dc.ProtocolError)


class DccpClient:
    """One client connection: its own socket (raw or DCCP-UDP), its own DCCP port.

    ``remote`` is the server's (address, DCCP port). DCCP-UDP: ``udp_port`` is the server's
    UDP port (0: the same number as its DCCP port); the client's own UDP socket, bound to an
    ephemeral port, is this connection's alone (RFC 6773 §3.8).

    ``on_event`` gets every connection event; ``on_datagram`` the payloads. ``wait_open``
    resolves at HandshakeComplete and raises :class:`DccpConnectError` when the peer resets
    or the handshake times out.
    """

    def __init__(self, remote: tuple[str, int], *, transport: str = "raw",
                 service_code: int = DEFAULT_SERVICE, fwmark: int = 0,
                 device: str | None = None, bind: str | None = None,
                 on_datagram: Callable[[bytes], None] | None = None,
                 on_event: EventCallback | None = None,
                 loop: asyncio.AbstractEventLoop | None = None,
                 conn_options: dict[str, Any] | None = None,
                 sock: DccpSocket | None = None, udp_port: int = 0) -> None:
        from vstack.dccp.transport import family_of

        self.loop = loop or asyncio.get_running_loop()
        self.remote = remote
        self.family = family_of(remote[0])
        self.on_datagram = on_datagram
        self.user_event = on_event
        self._opened: asyncio.Future[None] = self.loop.create_future()
        self._closed: asyncio.Future[Any] = self.loop.create_future()
        self.events: list[Any] = []
        self.sock = sock or open_socket(transport, self.family, bind=bind, fwmark=fwmark,
                                        device=device)
        self.local_port = 0
        self._port_held = False
        # DCCP-UDP: where the server receives (RFC 6773 §3.1); raw: unused
        self.udp_port = (udp_port or remote[1]) if self.sock.kind == "udp" else 0
        try:
            local_ip = self.sock.source_for(remote[0])
            self.local_port = _allocate_port(remote)
            self._port_held = True
            if isinstance(self.sock, RawDccpSocket):
                self.sock.filter_port(self.local_port)  # only our packets wake us
            cfg = _conn_config(service_code, conn_options)
            self.conn = dc.DccpConnection.client(sport=self.local_port, dport=remote[1],
                                                 config=cfg)
            self.ep = DccpEndpoint(self.conn, self.sock, local_ip, remote[0], self.loop,
                                   self._event, udp_port=self.udp_port)
            self.sock.attach(self.loop, self._rx)
        except BaseException:  # nothing half-built stays open: the socket, the port
            self._free()
            raise

    # -- lifecycle
    def connect(self) -> None:
        self.conn.connect(self.ep.now())
        self.ep.pump()

    async def wait_open(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(asyncio.shield(self._opened), timeout)

    async def open(self, timeout: float = 10.0) -> DccpClient:
        self.connect()
        await self.wait_open(timeout)
        return self

    async def wait_closed(self, timeout: float = 10.0) -> Any:
        return await asyncio.wait_for(asyncio.shield(self._closed), timeout)

    def send(self, data: bytes) -> bool:
        return self.ep.send(data)

    def send_many(self, datas: list[Any]) -> int:
        """Queue ``datas`` in order until one is refused; returns how many were taken."""
        return self.ep.send_many(datas)

    def close(self) -> None:
        self.ep.close()

    def release(self) -> None:
        """Abort without packets and free the socket; idempotent."""
        self.ep.abort()
        self._free()

    def _free(self) -> None:
        self.sock.close()
        if self._port_held:
            self._port_held = False
            _ports_in_use.discard((self.remote, self.local_port))

    @property
    def is_open(self) -> bool:
        return bool(self.conn.is_open) and not self.ep.closed

    # -- plumbing
    def _rx(self, dg: RxDatagram) -> None:
        ports = _ports(dg.data)
        if ports is None:
            self.ep.stats.rx_malformed += 1
            return
        if ports != (self.remote[1], self.local_port) or dg.src != self.remote[0]:
            return  # someone else's (raw sockets see every DCCP packet)
        if dg.udp_port != self.udp_port:
            return  # DCCP-UDP: not from the server's UDP port
        self.ep.feed(dg.data, dg.src, dg.dst)

    def _event(self, ev: Any) -> None:
        self.events.append(ev)
        if isinstance(ev, dc.HandshakeComplete) and not self._opened.done():
            self._opened.set_result(None)
        elif isinstance(ev, dc.DatagramReceived) and self.on_datagram is not None:
            self.on_datagram(ev.data)
        if (_is_failure(ev) or isinstance(ev, dc.ConnectionClosed)) and not self._opened.done():
            self._opened.set_exception(DccpConnectError(ev))
            self._opened.exception()  # mark retrieved
        if isinstance(ev, dc.ConnectionClosed) and not self._closed.done():
            self._closed.set_result(ev)
        if self.user_event is not None:
            self.user_event(ev)


class DccpConnectError(ConnectionError):
    """The handshake failed: the peer reset (``event.code``) or timed out."""

    def __init__(self, event: Any) -> None:
        super().__init__(f"DCCP connection failed: {event}")
        self.event = event


# --------------------------------------------------------------------------- server
class DccpServer:
    """Listener on one DCCP port: many connections, demultiplexed by (address, port).

    Raw: the key is the peer's (address, DCCP port). DCCP-UDP: the peer's (address, UDP
    port), the UDP 4-tuple of RFC 6773 §3.8 (our address and UDP port are the socket's),
    which holds one active DCCP connection at a time (``udp_active``: its local address and
    DCCP port pair); ``port_reuse`` counts the packets refused with Reset 12.
    """

    def __init__(self, sock: DccpSocket, port: int, service_code: int, echo: bool,
                 counter: BinCounter | None, loop: asyncio.AbstractEventLoop,
                 on_datagram: Callable[[tuple[str, int], bytes], None] | None = None,
                 conn_options: dict[str, Any] | None = None) -> None:
        self.sock = sock
        self.port = port
        self.service_code = service_code
        self.echo = echo
        self.counter = counter
        self.loop = loop
        self.on_datagram = on_datagram
        self.conn_options = conn_options or {}
        self.listener = dc.DccpListener(port, _conn_config(service_code, self.conn_options))
        self.connections: dict[tuple[str, int], DccpEndpoint] = {}
        # DCCP-UDP: key -> (local address, peer's DCCP port, our DCCP port), the rest of
        # the active 6-tuple (RFC 6773 §3.8)
        self.udp_active: dict[tuple[str, int], tuple[str, int, int]] = {}
        self.port_reuse = 0
        self.rx_wrong_port = 0  # DCCP-UDP: well-formed, to another DCCP port (Reset 3)
        self.accepted = 0
        self.closed_conns = 0
        self.rx_malformed = 0
        self.echo_fail = 0
        self._closing = False

    @classmethod
    async def start(cls, port: int, family: int = socket.AF_INET, bind: str | None = None,
                    transport: str = "raw", service_code: int = DEFAULT_SERVICE,
                    echo: bool = False, counter: BinCounter | None = None,
                    fwmark: int = 0, device: str | None = None,
                    on_datagram: Callable[[tuple[str, int], bytes], None] | None = None,
                    conn_options: dict[str, Any] | None = None,
                    udp_port: int | None = None) -> DccpServer:
        """Listen on DCCP ``port``; DCCP-UDP: on UDP ``udp_port`` (None: the same number as
        ``port``; 0: an ephemeral one, see ``sock.port``). RFC 6773 §3.8 asks an
        application to use its own configured port rather than 6511
        (:data:`~vstack.dccp.packet.DCCP_UDP_PORT`, meant for a system-wide daemon)."""
        loop = asyncio.get_running_loop()
        sock = open_socket(transport, family, bind=bind,
                           port=port if udp_port is None else udp_port,
                           fwmark=fwmark, device=device)
        if isinstance(sock, RawDccpSocket):
            sock.filter_port(port)
        srv = cls(sock, port, service_code, echo, counter, loop, on_datagram, conn_options)
        sock.attach(loop, srv._rx)
        return srv

    def _rx(self, dg: RxDatagram) -> None:
        ports = _ports(dg.data)
        if ports is None:
            self.rx_malformed += 1
            return
        sport, dport = ports
        udp = not self.sock.dccp_checksum  # DCCP-UDP: checksum ignored (RFC 6773 §3.3)
        if dport != self.port:
            if udp:  # sent to our UDP port, so ours to answer: Reset(No Connection)
                self._wrong_port(dg)
            return  # raw: another listener's (raw sockets see every DCCP packet)
        # RFC 6773 §3.8 stage 1: the UDP 4-tuple; raw DCCP: the DCCP 4-tuple
        key = (dg.src, dg.udp_port if udp else sport)
        ep = self.connections.get(key)
        if ep is not None and udp and self.udp_active.get(key) != (dg.dst, sport, dport):
            self._port_reuse(dg)  # stage 2: not the active 6-tuple of this 4-tuple
            return
        if ep is None:
            if self._closing:
                return
            try:
                pkt = decode(dg.data, dg.src, dg.dst, verify=not udp)
            except DccpParseError:
                self.rx_malformed += 1
                return
            conn = self.listener.receive(pkt, self.loop.time())
            for reply in self.listener.packets_to_send():  # stateless Resets
                self._send_stateless(reply, dg)
            if conn is None:
                return
            ep = DccpEndpoint(conn, self.sock, dg.dst, dg.src, self.loop,
                              self._callback(key), udp_port=dg.udp_port)
            self.connections[key] = ep
            if udp:
                self.udp_active[key] = (dg.dst, sport, dport)
            ep.pump()  # the Response (or a Reset 8) accept() queued
            return
        ep.feed(dg.data, dg.src, dg.dst)

    def _send_stateless(self, reply: DccpPacket, dg: RxDatagram) -> None:
        with contextlib.suppress(TransportError, ValueError):
            self.sock.sendto(_encode(self.sock, reply, dg.dst, dg.src), dg.src, dg.udp_port)

    def _wrong_port(self, dg: RxDatagram) -> None:
        """A DCCP-UDP packet for a DCCP port nobody listens on here (RFC 4340 §8.5 step 2)."""
        try:
            pkt = decode(dg.data, verify=False)
        except DccpParseError:
            self.rx_malformed += 1
            return
        self.rx_wrong_port += 1
        if pkt.type != PacketType.RESET:
            self._send_stateless(reset_reply(pkt, ResetCode.NO_CONNECTION), dg)

    def _port_reuse(self, dg: RxDatagram) -> None:
        """RFC 6773 §3.8, first method: a DCCP-UDP packet on a busy UDP 4-tuple that is not
        its active 6-tuple is kept from the DCCP module and answered with Reset code 12
        (§7.2: Data 1 = its type, Data 2-3 = its UDP source port), never a Reset for a
        Reset."""
        self.port_reuse += 1
        try:
            pkt = decode(dg.data, verify=False)
        except DccpParseError:
            self.rx_malformed += 1
            return
        if pkt.type == PacketType.RESET:
            return
        data = bytes((int(pkt.type),)) + dg.udp_port.to_bytes(2, "big")
        self._send_stateless(reset_reply(pkt, ResetCode.ENCAPSULATED_PORT_REUSE, data), dg)

    def _callback(self, key: tuple[str, int]) -> EventCallback:
        return lambda ev: self._event(key, ev)

    def _event(self, key: tuple[str, int], ev: Any) -> None:
        if isinstance(ev, dc.HandshakeComplete):
            self.accepted += 1
        elif isinstance(ev, dc.DatagramReceived):
            data = ev.data
            if self.counter is not None:
                self.counter.add(len(data))
            if self.on_datagram is not None:
                self.on_datagram(key, data)
            if self.echo:
                ep = self.connections.get(key)
                if ep is None or not ep.send(data):
                    self.echo_fail += 1
        elif isinstance(ev, dc.ConnectionClosed):
            self.udp_active.pop(key, None)
            ep = self.connections.pop(key, None)
            if ep is not None:
                ep.abort()
                self.closed_conns += 1

    def close(self) -> None:
        """Close every connection (Close packets go out) and the socket."""
        self._closing = True
        for ep in list(self.connections.values()):
            with contextlib.suppress(Exception):
                ep.close()
            ep.abort()
        self.connections.clear()
        self.udp_active.clear()
        self.sock.close()

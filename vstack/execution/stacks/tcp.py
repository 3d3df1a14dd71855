"""The TCP-framed stack (``"tcp"``) and the MPTCP stack (``"mptcp"``, in ``mptcp.py``).

A flow's UDP payloads travel over one kernel TCP connection to the flow's NAT-mapped
target, each as one length-prefixed frame (``framing.py``: a 2- or 4-byte big-endian length
and the datagram). Frames that come back are decoded and handed to the application as UDP
datagrams (``ctx.deliver``).

Socket: non-blocking, ``SO_MARK`` = ``ctx.fwmark`` (vstack's egress bypasses the VNIC),
``SO_BINDTODEVICE`` when the flow is pinned to an interface, ``TCP_NODELAY`` (a datagram
should not wait for Nagle), IP_TOS/IPV6_TCLASS from the ``dscp`` option. ``open`` starts
the connect and returns at once; completion is seen by ``loop.add_writer``.

Sending never blocks. ``send`` frames the datagram into one bounded write buffer
(``buffer`` bytes, default 1 MiB; a datagram that does not fit is dropped and counted in
``metrics.drops``) and schedules one flush per event-loop turn (``call_soon``): a burst of
datagrams read from the TUN in one wakeup leaves in one ``send`` system call. When the
kernel's send buffer is full, the rest waits for ``loop.add_writer``. While the connection
is being set up, or re-established, datagrams wait in the same buffer.

Failures: a refused, reset, timed-out or closed connection, and a peer that sends a bad
frame, reach the engine as ``ctx.on_error(StackError(name, reason, remote=True))``; a local
socket failure (cannot create, ``EPERM``, no such device) as ``remote=False``. One failure
is reported per outage (not every failed retry). With ``reconnect`` > 0 (seconds, the
first retry's delay, doubling up to 30 s) the stack reconnects; complete frames still in
its buffer are sent on the new connection, the frame that was half-written on the old one
is dropped (``metrics.lost``). ``reconnect = 0`` makes a failure final: later datagrams
are dropped and counted.

RTT: ``metrics.rtt_ms`` is the kernel's smoothed RTT, read with ``getsockopt(TCP_INFO)``
when the connection comes up and every ``rtt_interval`` seconds (``parse_tcp_info``).

Options (``ctx.options``, from config ``[stacks.tcp]`` / ``[stacks.mptcp]`` or a decision;
an unknown key or a bad value is an error naming it): ``prefix`` (2 or 4), ``max_datagram``
(default 65527), ``buffer`` (bytes, default 1048576), ``nodelay`` (default true),
``connect_timeout`` (s, default 5), ``reconnect`` (s, default 1; 0 = never),
``rtt_interval`` (s, default 1), ``dscp``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from vstack.execution.stacks.base import Stack, StackContext, StackError, register_stack
from vstack.execution.stacks.framing import (
    DEFAULT_MAX_LEN,
    Decoder,
    FrameDecodeError,
    check_params,
)

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
TCP_INFO = getattr(socket, "TCP_INFO", 11)
RECV_SIZE = 256 * 1024
RECV_BATCH = 16
MAX_BACKOFF_S = 30.0

# ------------------------------------------------------------------ TCP_INFO
# ``struct tcp_info`` (include/uapi/linux/tcp.h), host byte order. Its first 104 bytes
# have been stable since Linux 2.6 (later kernels only append):
#   0 u8 tcpi_state, 1 u8 ca_state, 2 u8 retransmits, 3 u8 probes, 4 u8 backoff,
#   5 u8 options, 6 u8 snd_wscale:4|rcv_wscale:4, 7 u8 delivery_rate_app_limited etc.,
#   8 u32 rto (us), 12 ato (us), 16 snd_mss, 20 rcv_mss,
#  24 unacked, 28 sacked, 32 lost, 36 retrans, 40 fackets,
#  44 last_data_sent (ms), 48 last_ack_sent, 52 last_data_recv, 56 last_ack_recv,
#  60 pmtu, 64 rcv_ssthresh, 68 rtt (us), 72 rttvar (us), 76 snd_ssthresh, 80 snd_cwnd,
#  84 advmss, 88 reordering, 92 rcv_rtt (us), 96 rcv_space, 100 total_retrans.
TCP_INFO_LEN = 104
TCP_ESTABLISHED = 1


@dataclass(frozen=True, slots=True)
class TcpInfo:
    state: int
    ca_state: int
    retransmits: int
    rto_us: int
    snd_mss: int
    rcv_mss: int
    lost: int
    retrans: int
    pmtu: int
    rtt_us: int
    rttvar_us: int
    snd_cwnd: int
    total_retrans: int


def parse_tcp_info(buf: bytes) -> TcpInfo:
    """The fields vstack uses, at the offsets listed above. ``ValueError`` if short."""
    if len(buf) < TCP_INFO_LEN:
        raise ValueError(f"tcp_info: {len(buf)} bytes, need {TCP_INFO_LEN}")
    u8 = buf[0], buf[1], buf[2]
    u32 = struct.unpack_from("=26I", buf, 0)  # whole words; word i is at offset 4*i
    return TcpInfo(state=u8[0], ca_state=u8[1], retransmits=u8[2], rto_us=u32[2],
                   snd_mss=u32[4], rcv_mss=u32[5], lost=u32[8], retrans=u32[9],
                   pmtu=u32[15], rtt_us=u32[17], rttvar_us=u32[18], snd_cwnd=u32[20],
                   total_retrans=u32[25])


# ------------------------------------------------------------------ shared socket setup
def configure_egress(s: socket.socket, ctx: StackContext, dscp: int | None = None) -> None:
    """Non-blocking, SO_MARK, SO_BINDTODEVICE and DSCP, as every kernel-socket stack sets
    them (``OSError`` on failure: the caller closes the socket)."""
    s.setblocking(False)
    if ctx.fwmark:
        s.setsockopt(socket.SOL_SOCKET, SO_MARK, ctx.fwmark)
    if ctx.interface:
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ctx.interface.encode())
    if dscp is not None:
        set_dscp(s, ctx.family, dscp)


def set_dscp(s: socket.socket, family: int, dscp: int) -> None:
    tos = (dscp & 0x3F) << 2
    if family == 4:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
    else:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)


def option_error(stack: str, key: str, value: Any, want: str) -> ValueError:
    return ValueError(f"stacks.{stack}.{key}: expected {want}, got {value!r}")


def _num(stack: str, opts: dict[str, Any], key: str, default: float, lo: float,
         integer: bool = False) -> Any:
    v = opts.get(key, default)
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if isinstance(v, bool) or not ok or v < lo:
        raise option_error(stack, key, v, f"{'an integer' if integer else 'a number'} >= {lo}")
    return v


def check_dscp(stack: str, dscp: Any) -> int | None:
    if dscp is not None and (isinstance(dscp, bool) or not isinstance(dscp, int)
                             or not 0 <= dscp <= 63):
        raise option_error(stack, "dscp", dscp, "an integer 0..63")
    return dscp


_REMOTE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED,
                            errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT,
                            errno.EPIPE, errno.EHOSTDOWN, errno.ENETDOWN})

# connection states
CONNECTING, CONNECTED, DOWN, FAILED, CLOSED = "connecting", "connected", "down", "failed", \
    "closed"


@register_stack
class TcpStack(Stack):
    """Datagrams as length-prefixed frames on a kernel TCP connection."""

    name = "tcp"
    ip_proto: ClassVar[int] = 0  # socket(..., SOCK_STREAM, ip_proto): 0 = TCP
    OPTIONS: ClassVar[frozenset[str]] = frozenset({
        "prefix", "max_datagram", "buffer", "nodelay", "connect_timeout", "reconnect",
        "rtt_interval", "dscp"})

    @classmethod
    def check_options(cls, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Validate options (config ``[stacks.<name>]``, a decision's) without building a
        stack: ``ValueError`` naming the first bad key. Returns them, defaults filled in."""
        opts = dict(options or {})
        n = cls.name
        unknown = sorted(set(opts) - cls.OPTIONS)
        if unknown:
            raise ValueError(f"stacks.{n}: unknown option(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(cls.OPTIONS))})")
        out: dict[str, Any] = {
            "prefix": _num(n, opts, "prefix", 2, 2, integer=True),
            "max_datagram": _num(n, opts, "max_datagram", DEFAULT_MAX_LEN, 0, integer=True),
            "buffer": _num(n, opts, "buffer", 1 << 20, 0, integer=True),
            "connect_timeout": _num(n, opts, "connect_timeout", 5.0, 0.001),
            "reconnect": _num(n, opts, "reconnect", 1.0, 0),
            "rtt_interval": _num(n, opts, "rtt_interval", 1.0, 0),
        }
        try:
            check_params(out["prefix"], out["max_datagram"])
        except ValueError as e:
            raise ValueError(f"stacks.{n}.{e}") from None
        out["nodelay"] = opts.get("nodelay", True)
        if not isinstance(out["nodelay"], bool):
            raise option_error(n, "nodelay", out["nodelay"], "true or false")
        out["dscp"] = check_dscp(n, opts.get("dscp"))
        return out

    def __init__(self, ctx: StackContext) -> None:
        super().__init__(ctx)
        o = self.check_options(ctx.options)
        self.prefix: int = o["prefix"]
        self.max_datagram: int = o["max_datagram"]
        self.buffer_max: int = o["buffer"]
        self.nodelay: bool = o["nodelay"]
        self.connect_timeout: float = o["connect_timeout"]
        self.reconnect: float = o["reconnect"]
        self.rtt_interval: float = o["rtt_interval"]
        self.dscp: int | None = o["dscp"]
        self._hdr = struct.Struct(">H" if self.prefix == 2 else ">I").pack

        self.state = CLOSED
        self._sock: socket.socket | None = None
        self._fd = -1
        self._wbuf = bytearray()
        self._rview = memoryview(bytearray(RECV_SIZE))  # recv_into target, reused
        self._head = 0  # bytes at the start of _wbuf that finish a frame already begun
        self._writing = False  # add_writer installed for flushing
        self._flush_pending = False
        self._decoder = Decoder(self.prefix, self.max_datagram)
        self._timer: Any = None  # connect timeout / reconnect / RTT poll (one at a time)
        self._backoff = self.reconnect
        self._reported = False  # the current outage has been reported
        self.connects = 0  # connections established
        self.failures = 0  # connection failures (reported or not)
        self.framing_errors = 0
        self.oversize = 0  # datagrams larger than max_datagram (also in drops)
        self.tcp_info: TcpInfo | None = None

    # ------------------------------------------------------------------ Stack API
    def open(self) -> None:
        if self.state != CLOSED or self._sock is not None:
            return
        self._connect(first=True)

    @property
    def ready(self) -> bool:
        return self.state == CONNECTED

    def send(self, payload: bytes | memoryview) -> None:
        n = len(payload)
        m = self.metrics
        buf = self._wbuf
        if n > self.max_datagram:
            self.oversize += 1
            m.drops += 1
            return
        if len(buf) + self.prefix + n > self.buffer_max or self.state in (FAILED, CLOSED):
            m.drops += 1
            return
        buf += self._hdr(n)
        buf += payload
        m.packets_out += 1
        m.bytes_out += n
        if not self._flush_pending and not self._writing and self.state == CONNECTED:
            self._flush_pending = True
            self.ctx.loop.call_soon(self._flush)

    def retarget(self, target: tuple[str, int]) -> None:
        """Reconnect to ``target``; complete frames still buffered go to the new target."""
        self.ctx.target = target
        if self.state in (FAILED, CLOSED):
            return
        self._drop_connection()
        self._reported = False
        self._connect(first=False)

    def set_dscp(self, dscp: int) -> None:
        self.dscp = dscp
        if self._sock is not None:
            set_dscp(self._sock, self.ctx.family, dscp)

    def close(self) -> None:
        if self.state == CLOSED and self._sock is None:
            return
        self._drop_connection()
        self.state = CLOSED
        self._wbuf.clear()
        self._head = 0

    # ------------------------------------------------------------------ connection
    def _new_socket(self) -> socket.socket:
        fam = socket.AF_INET if self.ctx.family == 4 else socket.AF_INET6
        return socket.socket(fam, socket.SOCK_STREAM, self.ip_proto)

    def _connect(self, first: bool) -> None:
        """Start a non-blocking connect. On the first ``open`` a local setup failure raises
        (the engine reports the stack could not open); on a reconnect it is reported."""
        self._timer = None
        ctx = self.ctx
        try:
            s = self._new_socket()
        except OSError as e:
            if first:
                raise
            self._failed(f"cannot create socket: {e}", remote=False)
            return
        try:
            configure_egress(s, ctx, self.dscp)
            if self.nodelay:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            s.close()
            if first:
                raise
            self._failed(f"cannot set up socket: {e}", remote=False)
            return
        self._sock = s
        self._fd = s.fileno()
        self._decoder = Decoder(self.prefix, self.max_datagram)
        self.state = CONNECTING
        err = s.connect_ex(ctx.target)
        if err not in (0, errno.EINPROGRESS):
            self._failed(f"connect to {_fmt(ctx.target)}: {errno.errorcode.get(err, err)} "
                         f"({_strerror(err)})", remote=err in _REMOTE_ERRNOS)
            return
        ctx.loop.add_writer(self._fd, self._connect_done)
        self._timer = ctx.loop.call_later(self.connect_timeout, self._connect_timeout)

    def _connect_done(self) -> None:
        s = self._sock
        if s is None or self.state != CONNECTING:
            return
        loop = self.ctx.loop
        loop.remove_writer(self._fd)
        self._cancel_timer()
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._failed(f"connect to {_fmt(self.ctx.target)}: {_strerror(err)}",
                         remote=err in _REMOTE_ERRNOS)
            return
        self.state = CONNECTED
        self.connects += 1
        self._reported = False
        self._backoff = self.reconnect
        loop.add_reader(self._fd, self._readable)
        self._poll_rtt()
        if self._wbuf:
            self._flush()

    def _refresh_info(self) -> None:
        """Hook, at connect and every ``rtt_interval`` (MPTCP reads what the kernel
        negotiated and how many subflows there are)."""

    def _connect_timeout(self) -> None:
        self._timer = None
        if self.state == CONNECTING:
            self._failed(f"connect to {_fmt(self.ctx.target)} timed out after "
                         f"{self.connect_timeout:g} s", remote=True)

    def _failed(self, reason: str, remote: bool) -> None:
        """The connection is gone (or never came): report once per outage, then retry."""
        self.failures += 1
        self._drop_connection()
        if not self._reported:
            self._reported = True
            self.ctx.on_error(StackError(self.name, reason, remote))
        if self.state != DOWN:  # on_error closed or retargeted us
            return
        if self.reconnect > 0:
            self.state = DOWN
            self._timer = self.ctx.loop.call_later(self._backoff, self._connect, False)
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
        else:
            self.state = FAILED
            self.metrics.drops += _count_frames(self._wbuf, self.prefix)
            self._wbuf.clear()

    def _drop_connection(self) -> None:
        """Close the socket; keep only complete frames in the buffer."""
        self._cancel_timer()
        s = self._sock
        if s is not None:
            self._sock = None
            loop = self.ctx.loop
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                loop.remove_reader(self._fd)
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                loop.remove_writer(self._fd)
            s.close()
            self._fd = -1
        self._writing = False
        self._flush_pending = False
        if self._head:  # the peer got part of this frame: it is lost
            del self._wbuf[:self._head]
            self._head = 0
            self.metrics.lost += 1
        if self.state in (CONNECTING, CONNECTED):
            self.state = DOWN

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------------ I/O
    def _flush(self) -> None:
        self._flush_pending = False
        s = self._sock
        buf = self._wbuf
        if s is None or self.state != CONNECTED:
            return
        if buf:
            try:
                w = s.send(buf)
            except BlockingIOError:
                w = 0
            except OSError as e:
                self._failed(f"send: {e.strerror}", remote=e.errno in _REMOTE_ERRNOS)
                return
            if w:
                if w < len(buf):
                    self._head = _frame_rest(buf, self._head, w, self.prefix)
                else:
                    self._head = 0
                del buf[:w]
        if buf and not self._writing:
            self._writing = True
            self.ctx.loop.add_writer(self._fd, self._flush)
        elif not buf and self._writing:
            self._writing = False
            self.ctx.loop.remove_writer(self._fd)

    def _readable(self) -> None:
        s = self._sock
        if s is None:
            return
        recv_into = s.recv_into
        view = self._rview
        deliver = self.ctx.deliver
        m = self.metrics
        feed = self._decoder.feed
        for _ in range(RECV_BATCH):
            try:
                n = recv_into(view)
            except BlockingIOError:
                return
            except OSError as e:
                self._failed(f"recv: {e.strerror}", remote=e.errno in _REMOTE_ERRNOS)
                return
            if not n:
                try:
                    self._decoder.eof()
                    reason = "connection closed by the peer"
                except FrameDecodeError as e:
                    reason = f"connection closed by the peer: {e}"
                self._failed(reason, remote=True)
                return
            try:
                for d in feed(view[:n]):
                    m.packets_in += 1
                    m.bytes_in += len(d)
                    deliver(d)
            except FrameDecodeError as e:
                self.framing_errors += 1
                self._failed(f"bad frame from the peer: {e}", remote=True)
                return
            if self._sock is not s:  # deliver() closed or retargeted us
                return
            if n < RECV_SIZE:
                return

    # ------------------------------------------------------------------ RTT
    def _poll_rtt(self) -> None:
        self._timer = None
        s = self._sock
        if s is None or self.state != CONNECTED:
            return
        try:
            info = parse_tcp_info(s.getsockopt(socket.IPPROTO_TCP, TCP_INFO, TCP_INFO_LEN))
        except (OSError, ValueError):
            info = None
        if info is not None:
            self.tcp_info = info
            self.metrics.rtt_ms = info.rtt_us / 1000.0
        self._refresh_info()
        if self.rtt_interval > 0:
            self._timer = self.ctx.loop.call_later(self.rtt_interval, self._poll_rtt)


def _frame_rest(buf: bytearray, head: int, written: int, prefix: int) -> int:
    """After ``written`` bytes of ``buf`` went out, how many bytes of the frame then in
    progress remain (0: the write ended on a frame boundary). ``head``: bytes at the start
    of ``buf`` that finish an earlier frame."""
    pos = head
    unpack = struct.Struct(">H" if prefix == 2 else ">I").unpack_from
    while pos < written:
        pos += prefix + unpack(buf, pos)[0]
    return pos - written


def _count_frames(buf: bytearray, prefix: int) -> int:
    """Frames in ``buf``, which starts on a frame boundary."""
    unpack = struct.Struct(">H" if prefix == 2 else ">I").unpack_from
    pos = count = 0
    while pos + prefix <= len(buf):
        pos += prefix + unpack(buf, pos)[0]
        count += 1
    return count


def _strerror(err: int) -> str:
    return os.strerror(err)


def _fmt(t: tuple[str, int]) -> str:
    return f"[{t[0]}]:{t[1]}" if ":" in t[0] else f"{t[0]}:{t[1]}"

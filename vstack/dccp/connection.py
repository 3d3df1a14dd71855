"""DCCP connection state machine (RFC 4340 §8), sans-IO, aioquic style.

The connection never touches sockets or clocks.  The caller passes time in
(``now``, seconds as a float from any monotonic clock), hands received packets
in as :class:`~vstack.dccp.packet.DccpPacket` objects (decode bytes with
:func:`vstack.dccp.packet.decode` first; addresses and checksums are the
transport's business), and after every call collects:

* ``packets_to_send(now) -> list[DccpPacket]`` - encode each with
  :func:`vstack.dccp.packet.encode` and put it on the wire;
* ``next_event() -> Event | None`` until it returns None;
* ``next_timer() -> float | None`` - call ``handle_timer(now)`` at that time.

Client::

    cfg = DccpConfig(service_code=0x44434350)
    conn = DccpConnection.client(sport=40000, dport=5001, config=cfg)
    conn.connect(now)
    # loop: send packets_to_send(), feed receive(pkt, now), handle_timer(now), drain next_event()
    conn.send(b"payload", now)       # False: dropped (queue full / too big); counted in stats
    conn.close(now)                  # graceful: Close -> Reset(Closed) -> TIMEWAIT

Server::

    listener = DccpListener(port=5001, config=DccpConfig(service_code=0x44434350))
    result = listener.receive(pkt, now)   # a new DccpConnection for a Request, or None
    replies = listener.packets_to_send()  # stateless Resets (No Connection, Bad Service Code)

    # or directly: conn = DccpConnection.accept(request_pkt, now, config)

Events (frozen, slotted dataclasses): :class:`HandshakeComplete`,
:class:`DatagramReceived`, :class:`ResetReceived` (the *peer* reset us),
:class:`ProtocolError` (*we* detected a problem and reset), :class:`PeerTimeout`
(a retransmission limit was hit: the peer vanished), and finally
:class:`ConnectionClosed`, always the last event of a connection.

State transitions are data: :data:`TRANSITIONS` maps ``(State, PacketType)``
to a handler and the next state, each row citing the RFC.  Generic receive
processing follows the pseudocode of §8.5 (steps cited inline): sequence
validity windows (§7.5, :mod:`vstack.dccp.seq`) with rate-limited Sync on
out-of-window packets (an out-of-window packet never changes state), Resets
accepted only inside the window, feature negotiation (§6,
:mod:`vstack.dccp.features`), CCID2 (RFC 4341, :mod:`vstack.dccp.ccid2`) with
Ack Vectors (§11.4, :mod:`vstack.dccp.ackvector`), Timestamps for RTT (§13).

DCCP is unreliable: data is never retransmitted.  ``send`` queues a datagram;
it leaves when CCID2's window allows; a full queue drops (``stats.send_dropped``).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import IntEnum

from vstack.dccp import features as ft
from vstack.dccp import seq as sq
from vstack.dccp.ackvector import AckVectorReceiver, decode_cells
from vstack.dccp.ccid2 import Ccid2Config, Ccid2Sender
from vstack.dccp.options import (
    AckVector,
    NdpCount,
    Option,
    Timestamp,
    TimestampEcho,
)
from vstack.dccp.packet import DccpPacket, PacketType, ResetCode

__all__ = [
    "TRANSITIONS",
    "ConnectionClosed",
    "DatagramReceived",
    "DccpConfig",
    "DccpConnection",
    "DccpListener",
    "DccpStats",
    "Event",
    "HandshakeComplete",
    "PeerTimeout",
    "ProtocolError",
    "ResetReceived",
    "State",
]

PT = PacketType


class State(IntEnum):
    """§8: connection states, ordered as the RFC's pseudocode compares them."""

    CLOSED = 0
    LISTEN = 1
    REQUEST = 2
    RESPOND = 3
    PARTOPEN = 4
    OPEN = 5
    CLOSEREQ = 6
    CLOSING = 7
    TIMEWAIT = 8


# ---- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """Data may flow (client: entered PARTOPEN, §8.1.5; server: entered OPEN)."""

    ccid: int = 2


@dataclass(frozen=True, slots=True)
class DatagramReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class ResetReceived:
    """The peer sent an in-window Reset (a remote error unless code 1 ends our Close)."""

    code: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """We detected a protocol problem and reset the connection (a local decision)."""

    reason: str
    reset_code: int | None = None


@dataclass(frozen=True, slots=True)
class PeerTimeout:
    """A retransmission limit was reached: the peer vanished (no hang)."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is over; always the last event. ``graceful``: Close/Reset(Closed)."""

    graceful: bool = False


Event = (
    HandshakeComplete
    | DatagramReceived
    | ResetReceived
    | ProtocolError
    | PeerTimeout
    | ConnectionClosed
)


# ---- configuration and statistics ---------------------------------------------------------


@dataclass(slots=True)
class DccpConfig:
    service_code: int = 0
    # extra service codes a server accepts (service_code is always accepted)
    accept_service_codes: tuple[int, ...] = ()
    queue_limit: int = 256  # datagrams waiting for the CCID2 window; beyond: drop and count
    mps: int = 1400  # maximum payload per packet (no fragmentation in DCCP)
    # §8.1.1: first Request retransmission after about 1 s, backing off, give up eventually
    request_timeout: float = 1.0
    max_backoff: float = 64.0
    max_retransmits: int = 6  # Request, Close, CloseReq and PARTOPEN Ack retransmissions
    partopen_timeout: float = 0.2  # §8.1.5
    handshake_timeout: float = 30.0  # server RESPOND without the client's Ack
    timewait: float = 2 * 120.0  # §8.3: 2 MSL
    ack_delay: float = 0.01  # delayed ack when fewer than Ack Ratio data packets arrived
    sync_rate: int = 8  # §7.5.4: at most this many Syncs per second
    max_rto_timeouts: int = 6  # consecutive CCID2 RTOs with no sign of the peer -> PeerTimeout
    sequence_window: int = 100  # §7.5.2; Change L(Sequence Window) sent if not 100
    ack_ratio_adaptive: bool = True  # RFC 4341 §6.1.2: keep Ack Ratio <= cwnd/2
    iss: int | None = None  # initial sequence number (None: random)
    seed: int | None = None  # RNG seed for the ISS (deterministic tests)
    local_prefs: dict[int, tuple[int, ...]] | None = None
    remote_prefs: dict[int, tuple[int, ...]] | None = None
    ccid2: Ccid2Config = field(default_factory=Ccid2Config)


@dataclass(slots=True)
class DccpStats:
    packets_sent: int = 0
    packets_received: int = 0
    data_sent: int = 0
    data_delivered: int = 0
    bytes_sent: int = 0
    bytes_delivered: int = 0
    send_dropped: int = 0  # queue full
    send_oversize: int = 0  # larger than mps
    send_refused: int = 0  # connection not open / closing
    duplicates: int = 0
    out_of_window: int = 0
    invalid: int = 0  # wrong ports, unexpected type, short seqnos not allowed, ...
    syncs_sent: int = 0
    syncs_suppressed: int = 0
    syncs_received: int = 0  # the peer found our packets out of its window
    resets_sent: int = 0
    retransmits: int = 0  # Request/Close/CloseReq/PARTOPEN Ack
    queued: int = 0


_TS_UNITS = 100_000  # Timestamp option unit: 10 microseconds (§13.1)


def _ts(now: float) -> int:
    return int(now * _TS_UNITS) & 0xFFFFFFFF


def reset_reply(pkt: DccpPacket, code: int, data: bytes = b"\0\0\0") -> DccpPacket:
    """A Reset answering ``pkt`` with no connection state (§8.5 step 2, §8.3.1).

    Its seqno is P.ackno + 1 (0 if P has none) and its ackno P.seqno, so it
    passes the peer's validity checks.
    """
    seqno = sq.add(pkt.ack, 1) if pkt.ack is not None else 0
    return DccpPacket(
        type=PT.RESET,
        sport=pkt.dport,
        dport=pkt.sport,
        seq=seqno,
        ack=pkt.seq,
        reset_code=code,
        reset_data=data[:3].ljust(3, b"\0"),
    )


# ---- the transition table --------------------------------------------------------------

Handler = Callable[["DccpConnection", DccpPacket, float], None]


@dataclass(frozen=True, slots=True)
class Transition:
    handler: str  # method name on DccpConnection
    next_state: State | None  # None: unchanged (or decided by the handler, see its doc)
    rfc: str


_OPENISH = (State.OPEN, State.CLOSEREQ, State.CLOSING)
_STEP7_TYPES = frozenset({PT.REQUEST, PT.RESPONSE, PT.CLOSEREQ, PT.DATA})


def _build_table() -> dict[tuple[State, PacketType], Transition]:
    t: dict[tuple[State, PacketType], Transition] = {
        # client handshake
        (State.REQUEST, PT.RESPONSE): Transition(
            "_on_response", State.PARTOPEN, "§8.1.2, §8.5 steps 4 and 10"
        ),
        (State.REQUEST, PT.RESET): Transition("_on_reset", State.TIMEWAIT, "§8.5 steps 4, 9"),
        (State.PARTOPEN, PT.RESPONSE): Transition("_on_dup_response", None, "§8.5 step 12"),
        # server handshake
        (State.RESPOND, PT.REQUEST): Transition("_on_dup_request", None, "§8.5 step 11"),
        (State.RESPOND, PT.ACK): Transition("_on_handshake_ack", State.OPEN, "§8.1.5, step 11"),
        (State.RESPOND, PT.DATAACK): Transition("_on_handshake_ack", State.OPEN, "§8.1.5, step 11"),
        (State.RESPOND, PT.RESET): Transition("_on_reset", State.TIMEWAIT, "§8.5 step 9"),
        (State.RESPOND, PT.CLOSE): Transition("_on_close", State.CLOSED, "§8.5 step 14"),
        (State.RESPOND, PT.SYNC): Transition("_on_sync", None, "§8.5 step 15"),
        (State.RESPOND, PT.SYNCACK): Transition("_on_nothing", None, "§7.5.4"),
    }
    # PARTOPEN: any packet but Response opens the connection, then is processed (§8.5 step 12)
    for p in (PT.DATA, PT.ACK, PT.DATAACK, PT.SYNC, PT.SYNCACK, PT.CLOSEREQ, PT.CLOSE):
        t[(State.PARTOPEN, p)] = Transition("_on_partopen_packet", State.OPEN, "§8.5 step 12")
    t[(State.PARTOPEN, PT.RESET)] = Transition("_on_reset", State.TIMEWAIT, "§8.5 step 9")
    for s in _OPENISH:
        t[(s, PT.DATA)] = Transition("_on_data", None, "§8.5 step 16")
        t[(s, PT.DATAACK)] = Transition("_on_data", None, "§8.5 step 16")
        t[(s, PT.ACK)] = Transition("_on_nothing", None, "§8.5 step 8 (acks processed)")
        t[(s, PT.SYNC)] = Transition("_on_sync", None, "§8.5 step 15, §7.5.4")
        t[(s, PT.SYNCACK)] = Transition("_on_nothing", None, "§7.5.4")
        t[(s, PT.RESET)] = Transition("_on_reset", State.TIMEWAIT, "§8.5 step 9, §8.3")
        t[(s, PT.CLOSE)] = Transition("_on_close", State.CLOSED, "§8.5 step 14, §8.3")
    # client only (step 7 rejects CloseReq at a server)
    t[(State.OPEN, PT.CLOSEREQ)] = Transition("_on_closereq", State.CLOSING, "§8.5 step 13")
    t[(State.CLOSEREQ, PT.CLOSEREQ)] = Transition("_on_nothing", None, "§8.5 step 13")
    t[(State.CLOSING, PT.CLOSEREQ)] = Transition("_on_nothing", None, "§8.5 step 13")
    return t


TRANSITIONS: dict[tuple[State, PacketType], Transition] = _build_table()

# Timer/user-event transitions, for the record (handled by methods of the same name):
#   CLOSED  --connect()-->        REQUEST   §8.1.1 (send Request)
#   LISTEN  --Request-->          RESPOND   §8.1.2 (DccpConnection.accept / DccpListener)
#   REQUEST --timer-->            REQUEST   §8.1.1 (retransmit Request, backoff; limit -> CLOSED)
#   PARTOPEN --timer-->           PARTOPEN  §8.1.5 (retransmit Ack; limit -> CLOSED)
#   OPEN    --close() client-->   CLOSING   §8.3 (send Close)
#   OPEN    --close() server-->   CLOSEREQ  §8.3 (send CloseReq)
#   CLOSING/CLOSEREQ --timer-->   same      §8.3 (retransmit; limit -> CLOSED)
#   TIMEWAIT --timer (2 MSL)-->   CLOSED    §8.3
#   any     --abort()-->          CLOSED    §8.3 (Reset(Aborted))


class DccpConnection:
    """One DCCP endpoint of one connection.  See the module docstring for the API."""

    def __init__(
        self, *, is_server: bool, sport: int, dport: int, config: DccpConfig | None = None
    ) -> None:
        self.config = config or DccpConfig()
        c = self.config
        self.is_server = is_server
        self.sport = sport
        self.dport = dport
        self.state = State.CLOSED
        self.service_code = c.service_code
        self._rng = random.Random(c.seed)
        self.seq = sq.SeqState(local_window=c.sequence_window)
        self.features = ft.FeatureNegotiator(is_server, c.local_prefs, c.remote_prefs)
        self.ccid = Ccid2Sender(replace(c.ccid2, mss=c.mps))
        self.ccid.set_max_cwnd(max(2, c.sequence_window // 5))
        self.ackvec = AckVectorReceiver()
        self.stats = DccpStats()
        self._events: deque[Event] = deque()
        self._out: list[DccpPacket] = []  # control packets built, not yet collected
        self._queue: deque[bytes] = deque()
        self._seen: set[int] = set()  # data seqnos delivered (duplicate suppression)
        self._osr: int | None = None  # first seqno received in OPEN (§8.5 step 7)
        # timers (absolute times, None = off)
        self._rtx_at: float | None = None
        self._rtx_interval = c.request_timeout
        self._rtx_count = 0
        self._ack_at: float | None = None
        self._feat_at: float | None = None
        self._close_at: float | None = None  # TIMEWAIT / RESPOND deadline
        # ack state
        self._ack_now = False
        self._data_since_ack = 0
        self._rx_since_ack = 0  # packets received since we last sent an ack
        self._ndp = 0  # consecutive non-data packets sent (§7.7)
        self._ts_echo: tuple[int, float] | None = None  # peer Timestamp value, when received
        self._ts_sent: dict[int, float] = {}
        self._sync_times: deque[float] = deque()
        self._partopen_opts: list[Option] = []
        self._close_pending = False
        self._rto_strikes = 0
        self._request_payload = b""
        self._closed_emitted = False
        self._ts_rtt: float | None = None

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def client(cls, *, sport: int, dport: int, config: DccpConfig | None = None) -> DccpConnection:
        return cls(is_server=False, sport=sport, dport=dport, config=config)

    def _choose_iss(self) -> int:
        c = self.config
        return (c.iss if c.iss is not None else self._rng.getrandbits(48)) & sq.SEQ_MASK

    def _initial_changes(self) -> None:
        """Changes we start (§6): CCID 2 both ways, Ack Vectors from the peer for our CCID2."""
        f = self.features
        if not self.is_server:
            f.change_local(ft.CCID, (2,))
            f.change_remote(ft.CCID, (2,))
        # RFC 4341 §3: the CCID2 HC-sender requires the HC-receiver to send Ack Vectors
        f.change_remote(ft.SEND_ACK_VECTOR, (1,))
        # §12.1: we cannot read ECN codepoints (sans-IO, raw sockets), so say so
        f.change_local(ft.ECN_INCAPABLE, (1,))
        if self.config.sequence_window != 100:
            f.change_local(ft.SEQUENCE_WINDOW, (self.config.sequence_window,))

    def connect(self, now: float, payload: bytes = b"") -> None:
        """CLOSED -> REQUEST (§8.1.1): send a Request; retransmitted with backoff."""
        if self.is_server or self.state != State.CLOSED:
            raise RuntimeError(f"connect() in state {self.state.name}")
        self.seq.start(self._choose_iss())
        self._initial_changes()
        self._request_payload = payload
        self.state = State.REQUEST
        self._emit_request(now, first=True)
        self._rtx_interval = self.config.request_timeout
        self._rtx_count = 0
        self._rtx_at = now + self._rtx_interval

    @classmethod
    def accept(
        cls, request: DccpPacket, now: float, config: DccpConfig | None = None
    ) -> DccpConnection:
        """LISTEN -> RESPOND (§8.1.2, §8.5 step 3) for a Request; the Response is queued.

        A service code the server does not accept gets Reset code 8, Bad Service
        Code (§8.1.2); the returned connection is then CLOSED.
        """
        if request.type != PT.REQUEST:
            raise ValueError("accept() needs a Request")
        conn = cls(is_server=True, sport=request.dport, dport=request.sport, config=config)
        conn.state = State.LISTEN
        conn._accept(request, now)
        return conn

    def _accept(self, req: DccpPacket, now: float) -> None:
        c = self.config
        ok_codes = {c.service_code, *c.accept_service_codes}
        if req.service_code not in ok_codes:
            self._out.append(reset_reply(req, ResetCode.BAD_SERVICE_CODE))
            self.stats.resets_sent += 1
            self._local_error(f"bad service code {req.service_code!r}", ResetCode.BAD_SERVICE_CODE)
            return
        self.service_code = req.service_code or 0
        self.seq.start(self._choose_iss())
        self.seq.set_isr(req.seq)
        self.state = State.RESPOND
        self._close_at = now + c.handshake_timeout
        self.stats.packets_received += 1
        self.ackvec.add(req.seq)
        self._initial_changes()
        if not self._process_options(req, now):
            return
        self._emit_response(now, first=True)
        if req.payload:  # §8.5 step 16: data from (only) the first Request
            self._deliver(req)

    # ---- public API -----------------------------------------------------------------
    def send(self, data: bytes, now: float) -> bool:
        """Queue one datagram; False if it was dropped (counted in ``stats``)."""
        usable = (State.PARTOPEN, State.OPEN, State.REQUEST, State.RESPOND)
        fresh = self.state == State.CLOSED and not self._closed_emitted  # before connect()
        if (self.state not in usable and not fresh) or self._close_pending:
            self.stats.send_refused += 1
            return False
        if len(data) > self.config.mps:
            self.stats.send_oversize += 1
            return False
        if len(self._queue) >= self.config.queue_limit:
            self.stats.send_dropped += 1
            return False
        self._queue.append(bytes(data))
        self.stats.queued += 1
        return True

    def close(self, now: float) -> None:
        """Graceful close (§8.3): queued data goes first, then Close (client) or CloseReq."""
        if self.state in (State.REQUEST, State.RESPOND):
            self.abort(now)
            return
        if self.state in (State.PARTOPEN, State.OPEN):
            self._close_pending = True
            self._maybe_start_close(now)

    def abort(self, now: float, code: int = ResetCode.ABORTED) -> None:
        """Reset(Aborted) and CLOSED at once (§8.3)."""
        if self.state in (State.CLOSED, State.TIMEWAIT, State.LISTEN):
            return
        if self.seq.gsr is not None:
            self._emit(PT.RESET, reset_code=code)
        self._enter_closed(graceful=False)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def is_open(self) -> bool:
        return self.state in (State.PARTOPEN, State.OPEN)

    @property
    def ack_due(self) -> bool:
        """An ack should leave now (Ack Ratio data packets arrived, a Confirm is owed...):
        an endpoint reading a long batch sends it at once instead of after the batch, so
        the peer's window keeps moving (RFC 4341 §6.1: an ack per Ack Ratio packets)."""
        return self._ack_now

    @property
    def is_closed(self) -> bool:
        return self.state in (State.CLOSED, State.TIMEWAIT)

    @property
    def rtt_ms(self) -> float | None:
        """Smoothed RTT (CCID2's estimate, else from Timestamps), milliseconds."""
        r = self.ccid.srtt if self.ccid.srtt is not None else self._ts_rtt
        return None if r is None else r * 1000.0

    @property
    def loss(self) -> int:
        """Data packets CCID2 declared lost."""
        return self.ccid.stats.lost

    @property
    def loss_rate(self) -> float:
        s = self.ccid.stats
        return s.lost / s.sent if s.sent else 0.0

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def metrics(self) -> dict[str, float | int | None]:
        """A flat snapshot for the rule engine."""
        s = self.stats
        return {
            "state": int(self.state),
            "rtt_ms": self.rtt_ms,
            "lost": self.loss,
            "loss_rate": self.loss_rate,
            "cwnd": self.ccid.cwnd,
            "pipe": self.ccid.pipe,
            "queue": len(self._queue),
            "send_dropped": s.send_dropped,
            "data_sent": s.data_sent,
            "data_delivered": s.data_delivered,
            "out_of_window": s.out_of_window,
        }

    # ---- timers -----------------------------------------------------------------------
    def next_timer(self) -> float | None:
        ts = [self._rtx_at, self._ack_at, self._feat_at, self._close_at]
        if self.state in (State.PARTOPEN, *_OPENISH):
            ts.append(self.ccid.next_timer())
        vals = [t for t in ts if t is not None]
        return min(vals) if vals else None

    def handle_timer(self, now: float) -> None:
        if self._close_at is not None and now >= self._close_at:
            self._close_at = None
            if self.state == State.TIMEWAIT:
                self.state = State.CLOSED  # §8.3: 2 MSL over
            elif self.state == State.RESPOND:
                self._peer_timeout("no Ack for our Response (RESPOND timed out)", now)
                return
        if self._rtx_at is not None and now >= self._rtx_at:
            self._retransmit(now)
        if self.is_closed:
            return
        if self._ack_at is not None and now >= self._ack_at:
            self._ack_at = None
            self._ack_now = True
        if self._feat_at is not None and now >= self._feat_at:
            self._feat_at = None
            if self.features.pending and self.state in (State.OPEN, State.PARTOPEN):
                self._ack_now = True
        if self.state in (State.PARTOPEN, *_OPENISH):
            t = self.ccid.next_timer()
            if t is not None and now >= t:
                self.ccid.on_timeout(now)
                self._rto_strikes += 1
                if self._rto_strikes >= self.config.max_rto_timeouts:
                    self._peer_timeout(f"{self._rto_strikes} CCID2 RTOs without an ack", now)

    def _retransmit(self, now: float) -> None:
        c = self.config
        if self._rtx_count >= c.max_retransmits and self.state == State.PARTOPEN:
            # A server that sends nothing (Linux does not answer a bare Ack) leaves us
            # in PARTOPEN; that is no sign of a dead peer, so stop retransmitting.
            self._rtx_at = None
            return
        if self._rtx_count >= c.max_retransmits:
            why = f"no answer in {self.state.name} after {self._rtx_count} retries"
            self._peer_timeout(why, now)
            return
        self._rtx_count += 1
        self.stats.retransmits += 1
        self._rtx_interval = min(self._rtx_interval * 2, c.max_backoff)
        self._rtx_at = now + self._rtx_interval
        if self.state == State.REQUEST:
            self._emit_request(now, first=False)  # §8.1.1: new seqno, same service code/data
        elif self.state == State.PARTOPEN:
            self._ack_now = True  # §8.1.5: the Ack (with our Confirms) is sent again
        elif self.state == State.CLOSING:
            self._emit(PT.CLOSE)
        elif self.state == State.CLOSEREQ:
            self._emit(PT.CLOSEREQ)
        else:
            self._rtx_at = None

    def _peer_timeout(self, reason: str, now: float) -> None:
        self._events.append(PeerTimeout(reason))
        self._enter_closed(graceful=False)

    # ---- receiving ----------------------------------------------------------------------
    def receive(self, pkt: DccpPacket, now: float) -> None:
        """Process one received packet (§8.5)."""
        if pkt.sport != self.dport or pkt.dport != self.sport:
            self.stats.invalid += 1
            return
        self.stats.packets_received += 1
        st = self.state
        # §8.5 step 2: no connection, or TIMEWAIT
        if st in (State.CLOSED, State.TIMEWAIT, State.LISTEN):
            if pkt.type != PT.RESET:
                self._out.append(reset_reply(pkt, ResetCode.NO_CONNECTION))
                self.stats.resets_sent += 1
            return
        # §8.5 step 1 / §7.6: short sequence numbers
        if not pkt.x:
            if self.features.local[ft.ALLOW_SHORT_SEQNOS] == 0 or self.seq.gsr is None:
                self.stats.invalid += 1
                return
            pkt = replace(
                pkt,
                x=True,
                seq=sq.extend(pkt.seq, self.seq.gsr),
                ack=None if pkt.ack is None else sq.extend(pkt.ack, self.seq.gss),
            )
        # §8.5 step 4: REQUEST accepts only Response/Reset acking our Request
        if st == State.REQUEST:
            if pkt.type in (PT.SYNC, PT.SYNCACK):
                # The server Syncs an overtaken, older Request of ours; answering with
                # Reset(Packet Error) as step 4 says would kill a good handshake.
                self.stats.out_of_window += 1
                return
            if pkt.type not in (PT.RESPONSE, PT.RESET) or pkt.ack is None:
                if pkt.type != PT.RESET:
                    self._out.append(reset_reply(pkt, ResetCode.PACKET_ERROR))
                    self.stats.resets_sent += 1
                self.stats.invalid += 1
                return
            if not sq.between(pkt.ack, self.seq.awl, self.seq.awh):
                self.stats.out_of_window += 1  # off-path or stale: ignored, no state change
                return
            self.seq.set_isr(pkt.seq)
        # A Request no newer than the one we answered was overtaken by a retransmission:
        # drop it silently, as Linux does (dccp_check_req), rather than Sync (step 6).
        if (
            st == State.RESPOND
            and pkt.type == PT.REQUEST
            and self.seq.gsr is not None
            and sq.le(pkt.seq, self.seq.gsr)
        ):
            self.stats.duplicates += 1
            return
        # §8.5 step 5: Sync/SyncAck may move the window forward
        if pkt.type in (PT.SYNC, PT.SYNCACK):
            if not (
                pkt.ack is not None
                and sq.between(pkt.ack, self.seq.awl, self.seq.awh)
                and self.seq.seq_valid(pkt.type, pkt.seq)
            ):
                self.stats.out_of_window += 1
                return
        # §8.5 step 6 / §7.5.3: sequence validity; never a state change otherwise.
        # (In REQUEST, step 4 already validated the ackno and set GSR = P.seqno, which
        # the strict Reset rule GSR < seqno would otherwise reject.)
        elif st != State.REQUEST and not self.seq.check(pkt.type, pkt.seq, pkt.ack):
            self.stats.out_of_window += 1
            gsr = self.seq.gsr
            self._send_sync(now, gsr if pkt.type == PT.RESET and gsr is not None else pkt.seq)
            return
        self.seq.update_received(pkt.type, pkt.seq, pkt.ack)
        # §8.5 step 8 "mark acknowledgeable", done here so the Ack Vector's head is
        # always GSR (our Acknowledgement Number), even for packets step 7 rejects
        self.ackvec.add(pkt.seq)
        self._rx_since_ack += 1
        # §8.5 step 7: unexpected packet types
        if pkt.type in _STEP7_TYPES and (
            (self.is_server and pkt.type in (PT.CLOSEREQ, PT.RESPONSE))
            or (not self.is_server and pkt.type == PT.REQUEST)
            or (
                st >= State.OPEN
                and pkt.type in (PT.REQUEST, PT.RESPONSE)
                and self._osr is not None
                and sq.ge(pkt.seq, self._osr)
            )
            or (st == State.RESPOND and pkt.type == PT.DATA)
        ):
            self.stats.invalid += 1
            self._send_sync(now, pkt.seq)
            return
        if st == State.OPEN and self._osr is None:
            self._osr = pkt.seq
        self._rto_strikes = 0  # the peer is alive
        # §8.5 step 8: options
        if not self._process_options(pkt, now):
            return
        if pkt.ack is not None and st != State.REQUEST:
            self._process_ack(pkt, now)
        tr = TRANSITIONS.get((self.state, pkt.type))
        if tr is None:
            self.stats.invalid += 1  # e.g. a retransmitted Request in OPEN with old seqno
            return
        handler: Handler = getattr(DccpConnection, tr.handler)
        handler(self, pkt, now)

    def receive_data(self, seq: int, payload: bytes, now: float) -> None:
        """:meth:`receive` for the commonest packet: a DCCP-Data with X=1 and no options
        (``packet.plain_data`` finds one), whose ports the caller has matched to this
        connection. In OPEN it runs the same §8.5 steps as ``receive`` for such a packet
        (6: sequence validity, GSR; 8: ack vector; 16: deliver, Ack Ratio) without
        building a DccpPacket (issue 6: the receive hot path); in any other state it
        builds one and calls ``receive``."""
        if self.state != State.OPEN:
            self.receive(DccpPacket(type=PT.DATA, sport=self.dport, dport=self.sport,
                                    seq=seq, payload=payload), now)
            return
        self.stats.packets_received += 1
        sqs = self.seq
        if not sqs.seq_valid(PT.DATA, seq):  # §8.5 step 6 (Data has no ack number)
            self.stats.out_of_window += 1
            self._send_sync(now, seq)
            return
        sqs.update_received(PT.DATA, seq, None)
        self.ackvec.add(seq)  # step 8, as in receive()
        self._rx_since_ack += 1
        if self._osr is None:
            self._osr = seq
        self._rto_strikes = 0
        self._on_data_payload(seq, payload, now)  # step 16: TRANSITIONS[OPEN, DATA]

    def _process_options(self, pkt: DccpPacket, now: float) -> bool:
        """§8.5 step 8: feature negotiation, Timestamps.  False if we reset."""
        if not pkt.options:
            return True
        res = self.features.process(pkt.options)
        if res.failure is not None:
            f = res.failure
            self._emit(PT.RESET, reset_code=f.code, reset_data=f.data)
            self._local_error(f.reason, f.code)
            return False
        for where, feat, value in res.changed:
            self._apply_feature(where, feat, value)
        if res.confirms_owed and self.state not in (State.REQUEST, State.LISTEN, State.RESPOND):
            self._ack_now = True  # §6.6.1: the Confirm goes out on our next packet, now
        for o in pkt.options:
            if isinstance(o, Timestamp):
                self._ts_echo = (o.value, now)
            elif isinstance(o, TimestampEcho):
                sent = self._ts_sent.pop(o.echo, None)
                if sent is not None:
                    elapsed = (o.elapsed or 0) / _TS_UNITS
                    r = max(0.0, now - sent - elapsed)
                    self._ts_rtt = r if self._ts_rtt is None else 0.875 * self._ts_rtt + 0.125 * r
                    if self.ccid.srtt is None:
                        self.ccid.seed_rtt(r)  # handshake RTT: a first RTO before any data
        return True

    def _apply_feature(self, where: str, feat: int, value: int) -> None:
        if feat == ft.SEQUENCE_WINDOW:
            if where == "L":
                self.seq.local_window = value
                self.ccid.set_max_cwnd(max(2, value // 5))
            else:
                self.seq.remote_window = value

    def _process_ack(self, pkt: DccpPacket, now: float) -> None:
        assert pkt.ack is not None
        ranges = None
        for o in pkt.options:
            if isinstance(o, AckVector):  # options 38 and 39 alike (no ECN in use)
                ranges = (ranges or []) + decode_cells(pkt.ack, o.runs())
        cumulative = ranges is None and self.features.remote[ft.SEND_ACK_VECTOR] == 0
        if ranges is None and cumulative:
            self.ccid.on_ack_cumulative(pkt.ack, now)
        else:
            self.ccid.on_ack(pkt.ack, ranges, now)
        # acks of acks (§11.4.2): the peer got our packet pkt.ack
        self.ackvec.on_acked(pkt.ack)
        self._update_ack_ratio()

    def _update_ack_ratio(self) -> None:
        if not self.config.ack_ratio_adaptive or self.state not in (State.OPEN, State.PARTOPEN):
            return
        want = self.ccid.desired_ack_ratio()
        pending = ("L", ft.ACK_RATIO) in self.features.pending_features()
        have = self.features.local[ft.ACK_RATIO]
        # RFC 4341 §6.1.2 keeps Ack Ratio <= cwnd/2: a lower value replaces an unconfirmed
        # Change at once (as Linux's ccid2_change_l_ack_ratio does); a higher one waits
        if want != have and (not pending or want < have):
            self.features.change_local(ft.ACK_RATIO, (want,))
            self.features.local[ft.ACK_RATIO] = want  # NN: takes effect when sent (§6.3.2)
            self._ack_now = True

    # ---- per-state handlers (named in TRANSITIONS) --------------------------------------
    def _on_nothing(self, pkt: DccpPacket, now: float) -> None:
        return

    def _on_response(self, pkt: DccpPacket, now: float) -> None:
        """REQUEST -> PARTOPEN (§8.1.2, §8.1.5): check the service code, ack at once."""
        if pkt.service_code != self.service_code:
            self._emit(PT.RESET, reset_code=ResetCode.BAD_SERVICE_CODE)
            self._local_error(
                f"Response service code {pkt.service_code} != {self.service_code}",
                ResetCode.BAD_SERVICE_CODE,
            )
            return
        self.state = State.PARTOPEN
        # the Confirms for the Response's Changes go on every PARTOPEN packet (§8.1.5:
        # the Ack may be lost and the server does not resend its Response)
        self._partopen_opts = self.features.take_confirms()
        self._rtx_count = 0
        self._rtx_interval = self.config.partopen_timeout
        self._rtx_at = now + self._rtx_interval
        self._ack_now = True
        if pkt.payload:
            self._deliver(pkt)
        self._events.append(HandshakeComplete(self.features.local[ft.CCID]))

    def _on_dup_response(self, pkt: DccpPacket, now: float) -> None:
        self._ack_now = True  # §8.5 step 12: our Ack was lost; send it again

    def _on_partopen_packet(self, pkt: DccpPacket, now: float) -> None:
        """§8.5 step 12: the server got our Ack; PARTOPEN -> OPEN, then process P."""
        self.state = State.OPEN
        self._partopen_opts = []
        self._rtx_at = None
        self._osr = pkt.seq
        tr = TRANSITIONS.get((State.OPEN, pkt.type))
        if tr is not None:
            handler: Handler = getattr(DccpConnection, tr.handler)
            handler(self, pkt, now)

    def _on_dup_request(self, pkt: DccpPacket, now: float) -> None:
        """§8.5 step 11: the client did not get our Response; send a new one."""
        if pkt.service_code != self.service_code:
            self.stats.invalid += 1
            return
        self._emit_response(now, first=False)

    def _on_handshake_ack(self, pkt: DccpPacket, now: float) -> None:
        """RESPOND -> OPEN (§8.1.5)."""
        self.state = State.OPEN
        self._close_at = None
        self._osr = pkt.seq
        self._events.append(HandshakeComplete(self.features.local[ft.CCID]))
        if pkt.type == PT.DATAACK:
            self._on_data(pkt, now)
        else:
            # not required by §8.1.5, but any packet from us ends the client's PARTOPEN
            # (and its Ack retransmissions) at once, instead of with our first data
            self._ack_now = True

    def _on_data(self, pkt: DccpPacket, now: float) -> None:
        self._on_data_payload(pkt.seq, pkt.payload, now)

    def _on_data_payload(self, seq: int, payload: bytes, now: float) -> None:
        self._deliver_payload(seq, payload)
        # ack policy (RFC 4341 §6.1): one ack per Ack Ratio data packets, else delayed
        self._data_since_ack += 1
        if self._data_since_ack >= max(1, self.features.remote[ft.ACK_RATIO]):
            self._ack_now = True
        elif self._ack_at is None:
            self._ack_at = now + self.config.ack_delay

    def _deliver(self, pkt: DccpPacket) -> None:
        self._deliver_payload(pkt.seq, pkt.payload)

    def _deliver_payload(self, seq: int, payload: bytes) -> None:
        if seq in self._seen:
            self.stats.duplicates += 1
            return
        self._seen.add(seq)
        if len(self._seen) > 8 * max(self.seq.remote_window, 100):
            swl = self.seq.swl
            self._seen = {s for s in self._seen if sq.ge(s, swl)}
        self.stats.data_delivered += 1
        self.stats.bytes_delivered += len(payload)
        self._events.append(DatagramReceived(payload))

    def _on_sync(self, pkt: DccpPacket, now: float) -> None:
        """§8.5 step 15 / §7.5.4: answer a Sync with a SyncAck acknowledging it."""
        self.stats.syncs_received += 1
        self._emit(PT.SYNCACK, ack=pkt.seq)

    def _on_closereq(self, pkt: DccpPacket, now: float) -> None:
        """§8.5 step 13: the server asks us to close: send Close, CLOSING."""
        self._start_closing(now)

    def _on_close(self, pkt: DccpPacket, now: float) -> None:
        """§8.5 step 14: answer Close with Reset(Closed) and tear down."""
        self._emit(PT.RESET, reset_code=ResetCode.CLOSED)
        self._enter_closed(graceful=True)

    def _on_reset(self, pkt: DccpPacket, now: float) -> None:
        """§8.5 step 9: an in-window Reset: TIMEWAIT."""
        code = pkt.reset_code if pkt.reset_code is not None else 0
        # Closed ends our Close/CloseReq; so does No Connection in CLOSING (the peer
        # tore down already and its Reset(Closed) was lost)
        graceful = (code == ResetCode.CLOSED and self.state in (State.CLOSING, State.CLOSEREQ)) or (
            code == ResetCode.NO_CONNECTION and self.state == State.CLOSING
        )
        if not graceful:
            self._events.append(ResetReceived(code, bytes(pkt.reset_data)))
        self.state = State.TIMEWAIT
        self._clear_timers()
        self._close_at = now + self.config.timewait
        self._queue.clear()
        self._emit_closed(graceful)

    # ---- closing ---------------------------------------------------------------------
    def _maybe_start_close(self, now: float) -> None:
        open_ = self.state in (State.OPEN, State.PARTOPEN)
        if not self._close_pending or self._queue or not open_:
            return  # the Close waits until every queued datagram has been sent
        self._close_pending = False
        if self.is_server:
            self.state = State.CLOSEREQ  # §8.3: the server asks the client to close
            self._emit(PT.CLOSEREQ)
        else:
            self._start_closing(now)
            return
        self._rtx_count = 0
        self._rtx_interval = self.config.request_timeout
        self._rtx_at = now + self._rtx_interval

    def _start_closing(self, now: float) -> None:
        self.state = State.CLOSING
        self._queue.clear()
        self._emit(PT.CLOSE)
        self._rtx_count = 0
        self._rtx_interval = self.config.request_timeout
        self._rtx_at = now + self._rtx_interval

    def _clear_timers(self) -> None:
        self._rtx_at = self._ack_at = self._feat_at = self._close_at = None

    def _enter_closed(self, graceful: bool) -> None:
        self.state = State.CLOSED
        self._clear_timers()
        self._queue.clear()
        self._emit_closed(graceful)

    def _emit_closed(self, graceful: bool) -> None:
        if not self._closed_emitted:
            self._closed_emitted = True
            self._events.append(ConnectionClosed(graceful))

    def _local_error(self, reason: str, code: int | None) -> None:
        self._events.append(ProtocolError(reason, code))
        self._enter_closed(graceful=False)

    # ---- building packets -------------------------------------------------------------
    def _send_sync(self, now: float, ackno: int) -> None:
        """Rate-limited Sync (§7.5.4)."""
        while self._sync_times and now - self._sync_times[0] >= 1.0:
            self._sync_times.popleft()
        if len(self._sync_times) >= self.config.sync_rate:
            self.stats.syncs_suppressed += 1
            return
        self._sync_times.append(now)
        self.stats.syncs_sent += 1
        self._emit(PT.SYNC, ack=ackno)

    def _emit(
        self,
        ptype: PacketType,
        *,
        ack: int | None = None,
        reset_code: int | None = None,
        reset_data: bytes = b"\0\0\0",
        options: Iterable[Option] = (),
    ) -> None:
        """Queue a control packet with a fresh seqno (§7.3: every packet takes one)."""
        if ack is None:
            ack = self.seq.gsr if self.seq.gsr is not None else 0
        pkt = DccpPacket(
            type=ptype,
            sport=self.sport,
            dport=self.dport,
            seq=self.seq.next_seq(),
            ack=ack,
            options=tuple(options),
            reset_code=reset_code,
            reset_data=reset_data if reset_code is not None else b"\0\0\0",
        )
        if ptype == PT.RESET:
            self.stats.resets_sent += 1
        self._out.append(pkt)

    def _emit_request(self, now: float, first: bool) -> None:
        seqno = self.seq.gss if first else self.seq.next_seq()
        opts: list[Option] = [*self.features.options(), self._timestamp(now)]
        self._out.append(
            DccpPacket(
                type=PT.REQUEST,
                sport=self.sport,
                dport=self.dport,
                seq=seqno,
                service_code=self.service_code,
                options=tuple(opts),
                payload=self._request_payload,
            )
        )

    def _emit_response(self, now: float, first: bool) -> None:
        seqno = self.seq.gss if first else self.seq.next_seq()
        assert self.seq.gsr is not None
        opts: list[Option] = [*self.features.options(), self._timestamp(now)]
        echo = self._timestamp_echo(now)
        if echo is not None:
            opts.append(echo)
        self._out.append(
            DccpPacket(
                type=PT.RESPONSE,
                sport=self.sport,
                dport=self.dport,
                seq=seqno,
                ack=self.seq.gsr,
                service_code=self.service_code,
                options=tuple(opts),
            )
        )

    def _timestamp(self, now: float) -> Timestamp:
        v = _ts(now)
        self._ts_sent[v] = now
        if len(self._ts_sent) > 64:
            self._ts_sent.pop(next(iter(self._ts_sent)))
        return Timestamp(v)

    def _timestamp_echo(self, now: float) -> TimestampEcho | None:
        if self._ts_echo is None:
            return None
        value, at = self._ts_echo
        self._ts_echo = None
        return TimestampEcho(value, int((now - at) * _TS_UNITS))

    def _ack_options(self, now: float, seqno: int, ackno: int) -> list[Option]:
        """Options of an Ack/DataAck: Confirms/Changes, Ack Vector, Timestamp Echo, NDP."""
        opts: list[Option] = []
        self._rx_since_ack = 0
        if self.state == State.PARTOPEN:
            opts.extend(self._partopen_opts)
        # (a repeated Response makes fresh Confirms equal to the PARTOPEN ones: send once)
        opts.extend(o for o in self.features.options() if o not in self._partopen_opts)
        if self.features.pending:
            self._feat_at = now + max(self.ccid.rto, 0.2)
        if self.features.local[ft.SEND_ACK_VECTOR]:
            head = self.ackvec.head
            # covering a few peer windows is enough: older state only reports late arrivals
            cover = max(256, 4 * self.seq.remote_window)
            runs = self.ackvec.cells(max_cover=cover) if head == ackno else [(0, 0)]
            opts.append(AckVector.from_runs(runs, self.ackvec.nonce()))
            self.ackvec.record_sent(seqno, ackno)
        echo = self._timestamp_echo(now)
        if echo is not None:
            opts.append(echo)
        return opts

    def packets_to_send(self, now: float) -> list[DccpPacket]:
        """Everything that should leave now, in order."""
        return self._to_send(now, False)  # type: ignore[return-value]

    def packets_to_send_plain(self, now: float) -> list[DccpPacket | tuple[int, bytes]]:
        """:meth:`packets_to_send` for an I/O layer with a fast Data encoder (issue 6):
        the same packets in the same order, except that a DCCP-Data with X=1 and no
        options, from this connection's ports, comes as the tuple ``(seq, payload)``
        instead of a ``DccpPacket`` (whose frozen constructor cost ~4 us per packet)."""
        return self._to_send(now, True)

    def _to_send(self, now: float, plain: bool) -> list[DccpPacket | tuple[int, bytes]]:
        out: list[DccpPacket | tuple[int, bytes]] = list(self._out)
        self._out = []
        if self.state in (State.PARTOPEN, State.OPEN, State.CLOSEREQ):
            out.extend(self._data_packets(now, plain))
            if self._ack_now:
                out.append(self._ack_packet(now))
            self._maybe_start_close(now)
            out.extend(self._out)
            self._out = []
        self.stats.packets_sent += len(out)
        for p in out:
            if type(p) is not tuple and p.type not in (PT.DATA, PT.DATAACK):  # type: ignore[union-attr]
                self._ndp += 1
        return out

    def _ack_packet(self, now: float) -> DccpPacket:
        seqno = self.seq.next_seq()
        ackno = self.seq.gsr if self.seq.gsr is not None else 0
        opts = self._ack_options(now, seqno, ackno)
        if self._ndp and self.features.local[ft.SEND_NDP_COUNT]:
            opts.append(NdpCount(self._ndp))
        self._ack_now = False
        self._ack_at = None
        self._data_since_ack = 0
        return DccpPacket(
            type=PT.ACK,
            sport=self.sport,
            dport=self.dport,
            seq=seqno,
            ack=ackno,
            options=tuple(opts),
        )

    def _data_packets(self, now: float,
                      plain: bool = False) -> list[DccpPacket | tuple[int, bytes]]:
        # the send hot path (issue 6): loop invariants hoisted; cwnd does not change
        # while sending (only acks and timeouts change it); ``plain``: see
        # packets_to_send_plain
        out: list[DccpPacket | tuple[int, bytes]] = []
        queue, ccid, sqs, stats = self._queue, self.ccid, self.seq, self.stats
        sport, dport = self.sport, self.dport
        ack_every = max(2, ccid.cwnd // 2)
        ndp_on = self.features.local[ft.SEND_NDP_COUNT]
        confirms = self.features.confirms_owed
        partopen = self.state == State.PARTOPEN
        while queue and ccid.can_send():
            data = queue.popleft()
            seqno = sqs.next_seq()
            opts: list[Option] = []
            if self._ndp and ndp_on:
                opts.append(NdpCount(self._ndp))
            self._ndp = 0
            # §8.1.5: in PARTOPEN every packet carries an ack; piggyback a due ack; and
            # ack the peer's acks about once per window, so it can trim its Ack Vector
            # state (RFC 4341 §6.1.4, acks of acks)
            if partopen or self._ack_now or confirms or self._rx_since_ack >= ack_every:
                ackno = sqs.gsr if sqs.gsr is not None else 0
                opts = self._ack_options(now, seqno, ackno) + opts
                self._ack_now = False
                self._ack_at = None
                self._data_since_ack = 0
                confirms = self.features.confirms_owed
                pkt: DccpPacket | tuple[int, bytes] = DccpPacket(
                    type=PT.DATAACK,
                    sport=sport,
                    dport=dport,
                    seq=seqno,
                    ack=ackno,
                    options=tuple(opts),
                    payload=data,
                )
            elif plain and not opts:
                pkt = (seqno, data)
            else:
                # positional: the frozen dataclass's __init__ is per packet here
                pkt = DccpPacket(PT.DATA, sport, dport, seqno, None, True, 0, 0,
                                 tuple(opts) if opts else (), data)
            ccid.on_sent(seqno, now)
            stats.data_sent += 1
            stats.bytes_sent += len(data)
            out.append(pkt)
        return out


class DccpListener:
    """LISTEN state (§8.1.2, §8.5 steps 2-3) for one local port, stateless.

    ``receive`` returns a new :class:`DccpConnection` (RESPOND, Response queued;
    or CLOSED with Reset 8 queued for a bad service code) for a Request, and None
    otherwise; non-Requests get Reset(No Connection) via :meth:`packets_to_send`
    (the caller demultiplexes existing connections by port pair before this).
    """

    def __init__(self, port: int, config: DccpConfig | None = None) -> None:
        self.port = port
        self.config = config or DccpConfig()
        self._out: list[DccpPacket] = []
        self.resets_sent = 0
        self.requests = 0

    def receive(self, pkt: DccpPacket, now: float) -> DccpConnection | None:
        if pkt.dport != self.port:
            return None
        if pkt.type == PT.REQUEST:
            self.requests += 1
            seed = self.config.seed
            cfg = replace(self.config, seed=None if seed is None else seed + self.requests)
            return DccpConnection.accept(pkt, now, cfg)
        if pkt.type != PT.RESET:
            self._out.append(reset_reply(pkt, ResetCode.NO_CONNECTION))
            self.resets_sent += 1
        return None

    def packets_to_send(self) -> list[DccpPacket]:
        out, self._out = self._out, []
        return out

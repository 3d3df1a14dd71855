"""In-memory DCCP client/server pair with a deterministic clock (harness, no tests here).

Packets travel as objects, optionally through the real codec (encode -> bytes ->
decode with checksums), through a "network" list the test controls: deliver any
in-flight packet (reordering), drop it, or duplicate it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from vstack.dccp.connection import (
    DatagramReceived,
    DccpConfig,
    DccpConnection,
    DccpListener,
    Event,
)
from vstack.dccp.packet import DccpPacket, PacketType, decode, encode

CLIENT_IP = "10.9.0.1"
SERVER_IP = "10.9.0.2"
CPORT, SPORT = 40000, 5001
SERVICE = 0x44434350


def make_config(**kw: object) -> DccpConfig:
    base: dict[str, object] = {
        "service_code": SERVICE,
        "seed": 7,
        "max_retransmits": 30,
        "max_rto_timeouts": 1000,
        "handshake_timeout": 1e6,
    }
    base.update(kw)
    return DccpConfig(**base)  # type: ignore[arg-type]


@dataclass
class Flight:
    to: str  # "c" or "s"
    pkt: DccpPacket


@dataclass
class Pair:
    client_cfg: DccpConfig = field(default_factory=make_config)
    server_cfg: DccpConfig = field(default_factory=make_config)
    wire: bool = True
    now: float = 0.0
    # payload -> copies delivered to the receiver that it did not reject as out of window
    arrived: dict[str, set[bytes]] = field(default_factory=lambda: {"c": set(), "s": set()})
    events: dict[str, list[Event]] = field(default_factory=lambda: {"c": [], "s": []})
    flights: list[Flight] = field(default_factory=list)
    log: list[tuple[str, DccpPacket]] = field(default_factory=list)
    tap: Callable[[str, DccpPacket], DccpPacket | None] | None = None  # may rewrite/drop
    # data payload -> copies put on the network / dropped by it; rejected by a receiver
    wire_copies: Counter[bytes] = field(default_factory=Counter)
    dropped_copies: Counter[bytes] = field(default_factory=Counter)
    rejected: dict[str, set[bytes]] = field(default_factory=lambda: {"c": set(), "s": set()})

    def __post_init__(self) -> None:
        self.c = DccpConnection.client(sport=CPORT, dport=SPORT, config=self.client_cfg)
        self.listener = DccpListener(SPORT, self.server_cfg)
        self.s: DccpConnection | None = None

    # ---- plumbing -------------------------------------------------------------------
    def _through_wire(self, to: str, p: DccpPacket) -> DccpPacket:
        if not self.wire:
            return p
        src, dst = (SERVER_IP, CLIENT_IP) if to == "c" else (CLIENT_IP, SERVER_IP)
        return decode(encode(p, src, dst), src, dst)

    def _put(self, to: str, p: DccpPacket) -> None:
        self.log.append((to, p))
        self.flights.append(Flight(to, p))
        if p.payload:
            self.wire_copies[p.payload] += 1

    def collect(self) -> int:
        n = 0
        for p in self.c.packets_to_send(self.now):
            self._put("s", p)
            n += 1
        if self.s is not None:
            for p in self.s.packets_to_send(self.now):
                self._put("c", p)
                n += 1
        for p in self.listener.packets_to_send():
            self.flights.append(Flight("c", p))
            n += 1
        self.drain_events()
        return n

    def drain_events(self) -> None:
        for name, conn in (("c", self.c), ("s", self.s)):
            if conn is None:
                continue
            while (e := conn.next_event()) is not None:
                self.events[name].append(e)

    def deliver(self, i: int = 0) -> None:
        f = self.flights.pop(i)
        pkt = self._through_wire(f.to, f.pkt)
        if self.tap is not None:
            tapped = self.tap(f.to, pkt)
            if tapped is None:
                return
            pkt = tapped
        if f.to == "c":
            self._rx(self.c, "c", pkt)
        elif self.s is None:
            self.s = self.listener.receive(pkt, self.now)
            if self.s is not None and pkt.payload and pkt.type == PacketType.REQUEST:
                self.arrived["s"].add(pkt.payload)
        else:
            self._rx(self.s, "s", pkt)
        self.collect()

    def _rx(self, conn: DccpConnection, name: str, pkt: DccpPacket) -> None:
        before = conn.stats.out_of_window + conn.stats.invalid
        conn.receive(pkt, self.now)
        rejected = conn.stats.out_of_window + conn.stats.invalid > before
        if pkt.payload and pkt.type in (PacketType.DATA, PacketType.DATAACK):
            (self.rejected if rejected else self.arrived)[name].add(pkt.payload)

    def drop(self, i: int = 0) -> Flight:
        f = self.flights.pop(i)
        if f.pkt.payload:
            self.dropped_copies[f.pkt.payload] += 1
        return f

    def duplicate(self, i: int = 0) -> None:
        f = self.flights[i]
        self.flights.append(f)
        if f.pkt.payload:
            self.wire_copies[f.pkt.payload] += 1

    def deliver_all(self, limit: int = 10_000) -> None:
        self.collect()
        n = 0
        while self.flights and n < limit:
            self.deliver(0)
            n += 1

    def advance(self, dt: float) -> None:
        self.now += dt
        self.fire_timers()

    def fire_timers(self) -> None:
        for conn in (self.c, self.s):
            if conn is None:
                continue
            t = conn.next_timer()
            if t is not None and t <= self.now:
                conn.handle_timer(self.now)
        self.collect()

    def next_deadline(self) -> float | None:
        ts = [conn.next_timer() for conn in (self.c, self.s) if conn is not None]
        vals = [t for t in ts if t is not None]
        return min(vals) if vals else None

    def settle(self, max_time: float = 600.0, max_iter: int = 20_000) -> None:
        """Deliver everything, jumping the clock to the next timer when idle."""
        end = self.now + max_time
        for _ in range(max_iter):
            self.deliver_all()
            if self.flights:
                continue
            t = self.next_deadline()
            if t is None or t > end:
                return
            self.now = max(self.now, t)
            self.fire_timers()

    def handshake(self) -> None:
        self.c.connect(self.now)
        self.collect()
        self.deliver_all()

    def delivered(self, name: str) -> list[bytes]:
        return [e.data for e in self.events[name] if isinstance(e, DatagramReceived)]

    def types(self, to: str) -> list[PacketType]:
        return [p.type for d, p in self.log if d == to]

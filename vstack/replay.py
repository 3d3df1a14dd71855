"""Replay a trace through the classifier and the decision engine (``vstack replay``).

A trace is a pcap, a pcapng, or a vstack JSONL trace (``vstack run --record``; format in
``docs/log.md``). Replay is deterministic: the trace's timestamps are the only clock, the
engine's timers fire at trace times, and the engine is built with a fixed seed, so the same
trace and the same rules give the same decisions.

What happens, item by item (``now`` is the item's timestamp, never going backwards):

* timers due at or before ``now`` fire first (``engine.handle_timer(t)`` at their time);
* a packet is classified (``vstack.analysis.classifier``). A pcap has no direction, so a
  packet whose reversed 5-tuple is a known flow is a reply (``net->app``); any other packet
  of an unknown 5-tuple opens a flow: ``flow.new`` -> ``engine.decide`` -> a decision. A
  JSONL packet carries its direction; a ``net->app`` packet of an unknown flow is an orphan;
* a JSONL event is submitted (``engine.submit``), except ``flow.new`` and ``timer.*``
  events, which the replay regenerates itself; ``flow.metrics`` events are also logged as
  outcomes (measured on the stack the live run used).

Trace readers never give up on bad input: a corrupt or truncated pcap record, pcapng block
or JSONL line is reported with its position (``TraceProblem``), skipped and counted, and
the reader resynchronises and goes on. A packet that is not valid IP is counted as
malformed, as the datapath does.

The pcap/pcapng container is parsed here rather than with ``dpkt.pcap.Reader``, because
dpkt's readers cannot resynchronise after a corrupt record; link types and their header
layouts are dpkt's constants (raw IP, Ethernet with VLAN tags, Linux cooked SLL and SLL2,
BSD loopback).
"""

from __future__ import annotations

import base64
import binascii
import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from vstack.analysis.classifier import (
    Direction,
    ParseError,
    classify,
    flow_new_event,
)
from vstack.analysis.flowkey import FlowKey
from vstack.decision.events import Event
from vstack.execution.selector import Actuator, Decision, FlowInfo
from vstack.log import DecisionSink, NullSink

# ---------------------------------------------------------------------------------------
# Trace items and problems


@dataclass(frozen=True, slots=True)
class TraceProblem:
    """Something in the trace that could not be read. ``position`` names where
    (``line 12``, ``packet 7 at byte 1180``)."""

    position: str
    message: str

    def __str__(self) -> str:
        return f"{self.position}: {self.message}"


@dataclass(frozen=True, slots=True)
class TracePacket:
    time: float
    data: bytes  # raw IP packet, padded with zeros to its original length
    direction: str | None  # "app->net", "net->app", or None (pcap: infer)
    position: str


@dataclass(frozen=True, slots=True)
class TraceEvent:
    event: Event
    position: str


TraceItem = TracePacket | TraceEvent
ProblemHandler = Callable[[TraceProblem], None]

# Link types (dpkt.pcap.DLT_* values as written in pcap files, LINKTYPE_*).
LINK_NULL, LINK_ETHERNET, LINK_RAW_BSD, LINK_RAW_OPENBSD = 0, 1, 12, 14
LINK_RAW, LINK_LOOP, LINK_SLL, LINK_IPV4, LINK_IPV6, LINK_SLL2 = 101, 108, 113, 228, 229, 276
_ETH_IP4, _ETH_IP6 = 0x0800, 0x86DD
_ETH_VLAN = frozenset({0x8100, 0x88A8, 0x9100})
_MAX_RECORD = 262_144  # largest plausible captured packet (bytes)
_MAX_ORIG = 1 << 20


def link_payload(link: int, frame: bytes) -> bytes | None:
    """The IP packet inside a captured frame of link type ``link``, or None (not IP)."""
    if link in (LINK_RAW, LINK_RAW_BSD, LINK_RAW_OPENBSD, LINK_IPV4, LINK_IPV6):
        return frame
    if link == LINK_ETHERNET:
        off = 12
        while len(frame) >= off + 2:
            etype = int.from_bytes(frame[off:off + 2], "big")
            if etype in _ETH_VLAN:
                off += 4
                continue
            return frame[off + 2:] if etype in (_ETH_IP4, _ETH_IP6) else None
        return None
    if link == LINK_SLL:  # Linux cooked v1: 16-byte header, protocol in the last 2 bytes
        if len(frame) < 16:
            return None
        etype = int.from_bytes(frame[14:16], "big")
        return frame[16:] if etype in (_ETH_IP4, _ETH_IP6) else None
    if link == LINK_SLL2:  # Linux cooked v2: 20-byte header, protocol first
        if len(frame) < 20:
            return None
        etype = int.from_bytes(frame[0:2], "big")
        return frame[20:] if etype in (_ETH_IP4, _ETH_IP6) else None
    if link in (LINK_NULL, LINK_LOOP):  # 4-byte address family (host / network order)
        if len(frame) < 4:
            return None
        fam_le = int.from_bytes(frame[:4], "little")
        fam_be = int.from_bytes(frame[:4], "big")
        fams = {2, 24, 28, 30}
        return frame[4:] if (fam_le in fams or fam_be in fams) else None
    return None


def _pad(ip: bytes, orig_extra: int) -> bytes:
    """Pad a snapped packet back to its IP total length (so headers parse; payload = 0s)."""
    if len(ip) < 1:
        return ip
    want = len(ip) + max(orig_extra, 0)
    v = ip[0] >> 4
    if v == 4 and len(ip) >= 4:
        want = max(min(want, int.from_bytes(ip[2:4], "big")), len(ip))
    elif v == 6 and len(ip) >= 6:
        want = max(min(want, 40 + int.from_bytes(ip[4:6], "big")), len(ip))
    return ip + bytes(want - len(ip))


class _Source:
    """A byte source over a file (mmap when possible) with a read position for progress."""

    def __init__(self, f: BinaryIO) -> None:
        self.size = os.fstat(f.fileno()).st_size
        self.buf: bytes | mmap.mmap = (
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b"")
        self.pos = 0

    def close(self) -> None:
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()


# ---------------------------------------------------------------------------------------
# pcap


_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000), b"\xa1\xb2\xc3\xd4": (">", 1_000_000),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000), b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000),
}
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"


def _read_pcap(src: _Source, on_problem: ProblemHandler) -> Iterator[TracePacket]:
    buf, size = src.buf, src.size
    endian, ticks = _PCAP_MAGICS[bytes(buf[:4])]
    if size < 24:
        on_problem(TraceProblem("byte 0", "pcap file header truncated"))
        return
    snaplen, network = struct.unpack_from(endian + "II", buf, 16)
    link = network & 0xFFFF
    rec = struct.Struct(endian + "IIII")
    limit = max(snaplen, _MAX_RECORD) if snaplen else _MAX_RECORD

    def plausible(at: int, last_ts: float | None) -> bool:
        if at + 16 > size:
            return False
        sec, frac, incl, orig = rec.unpack_from(buf, at)
        if incl > limit or orig > _MAX_ORIG or orig < incl or frac >= ticks:
            return False
        if last_ts is not None and abs(sec - last_ts) > 86_400:
            return False
        end = at + 16 + incl
        if end > size:
            return False
        if end == size:
            return True
        if end + 16 > size:
            return True  # next record truncated: reported when we get there
        nsec, _nfrac, nincl, norig = rec.unpack_from(buf, end)
        return nincl <= limit and norig >= nincl and abs(nsec - sec) <= 86_400

    pos, n, last_ts = 24, 0, None
    while pos < size:
        src.pos = pos
        n += 1
        if pos + 16 > size:
            on_problem(TraceProblem(f"packet {n} at byte {pos}",
                                    f"truncated record header ({size - pos} of 16 bytes)"))
            return
        sec, frac, incl, orig = rec.unpack_from(buf, pos)
        bad = incl > limit or orig > _MAX_ORIG or frac >= ticks
        if not bad and pos + 16 + incl > size:
            on_problem(TraceProblem(f"packet {n} at byte {pos}",
                                    f"truncated record: {incl} bytes captured, "
                                    f"{size - pos - 16} left in the file"))
            return
        if bad or (last_ts is not None and abs(sec - last_ts) > 86_400):
            nxt = pos + 1
            while nxt < size and not plausible(nxt, last_ts):
                nxt += 1
            on_problem(TraceProblem(
                f"packet {n} at byte {pos}",
                f"corrupt record header (captured length {incl}, original {orig}); "
                f"skipped {nxt - pos} bytes" + ("" if nxt < size else " to the end")))
            pos = nxt
            continue
        frame = bytes(buf[pos + 16:pos + 16 + incl])
        pos += 16 + incl
        last_ts = sec
        ip = link_payload(link, frame)
        t = sec + frac / ticks
        if ip is None:
            yield TracePacket(t, b"", None, f"packet {n} at byte {pos - 16 - incl}")
            continue
        yield TracePacket(t, _pad(ip, orig - incl), None, f"packet {n} at byte {pos - 16 - incl}")
    src.pos = size


# ---------------------------------------------------------------------------------------
# pcapng (https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng-02.html)

_NG_SHB, _NG_IDB, _NG_PB, _NG_SPB, _NG_EPB = 0x0A0D0D0A, 1, 2, 3, 6
_NG_KNOWN = frozenset({_NG_SHB, _NG_IDB, _NG_PB, _NG_SPB, _NG_EPB, 4, 5, 7, 9, 10,
                       0x80000001})


def _ng_tsresol(opts: bytes, endian: str) -> float:
    """Ticks per second of an interface (option if_tsresol; default microseconds)."""
    off = 0
    while off + 4 <= len(opts):
        code, length = struct.unpack_from(endian + "HH", opts, off)
        if code == 0:
            break
        if code == 9 and length >= 1:
            v = opts[off + 4]
            return 2.0 ** (v & 0x7F) if v & 0x80 else float(10 ** v)
        off += 4 + ((length + 3) & ~3)
    return 1e6


def _read_pcapng(src: _Source, on_problem: ProblemHandler) -> Iterator[TracePacket]:
    buf, size = src.buf, src.size
    endian = "<"
    ifaces: list[tuple[int, int, float]] = []  # (link, snaplen, ticks per second)
    pos, n, blockno, last_t = 0, 0, 0, 0.0

    def block_ok(at: int) -> bool:
        if at + 12 > size:
            return False
        btype = int.from_bytes(buf[at:at + 4], "little" if endian == "<" else "big")
        if bytes(buf[at:at + 4]) == _PCAPNG_SHB:
            return True
        if btype not in _NG_KNOWN:
            return False
        (blen,) = struct.unpack_from(endian + "I", buf, at + 4)
        if blen < 12 or blen % 4 or at + blen > size:
            return False
        (trail,) = struct.unpack_from(endian + "I", buf, at + blen - 4)
        return bool(trail == blen)

    while pos < size:
        src.pos = pos
        blockno += 1
        where = f"block {blockno} at byte {pos}"
        if pos + 12 > size:
            on_problem(TraceProblem(where, f"truncated block ({size - pos} bytes left)"))
            return
        if bytes(buf[pos:pos + 4]) == _PCAPNG_SHB and pos + 12 <= size:
            bom = bytes(buf[pos + 8:pos + 12])
            if bom == b"\x4d\x3c\x2b\x1a":
                endian = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                endian = ">"
            ifaces = []
        btype, blen = struct.unpack_from(endian + "II", buf, pos)
        if blen < 12 or blen % 4 or (btype == _NG_SHB and blen < 28):
            ok_len = False
        elif pos + blen > size:
            on_problem(TraceProblem(where, f"truncated block: {blen} bytes, "
                                           f"{size - pos} left in the file"))
            return
        else:
            (trail,) = struct.unpack_from(endian + "I", buf, pos + blen - 4)
            ok_len = trail == blen
        if not ok_len:
            nxt = pos + 4
            while nxt < size and not block_ok(nxt):
                nxt += 4
            on_problem(TraceProblem(where, f"corrupt block (type {btype:#x}, length {blen}); "
                                           f"skipped {nxt - pos} bytes"
                                           + ("" if nxt < size else " to the end")))
            pos = nxt
            continue
        body = bytes(buf[pos + 8:pos + blen - 4])
        pos += blen
        if btype == _NG_IDB:
            if len(body) < 8:
                on_problem(TraceProblem(where, "interface block too short"))
                ifaces.append((-1, 0, 1e6))
                continue
            link, _res, snap = struct.unpack_from(endian + "HHI", body, 0)
            ifaces.append((link, snap, _ng_tsresol(body[8:], endian)))
            continue
        if btype not in (_NG_EPB, _NG_SPB, _NG_PB):
            continue
        n += 1
        pwhere = f"packet {n} ({where})"
        if btype in (_NG_EPB, _NG_PB):
            if len(body) < 20:
                on_problem(TraceProblem(pwhere, "packet block too short"))
                continue
            if btype == _NG_EPB:
                iface, hi, lo, cap, orig = struct.unpack_from(endian + "IIIII", body, 0)
            else:
                iface, _drops, hi, lo, cap, orig = struct.unpack_from(endian + "HHIIII", body, 0)
            if iface >= len(ifaces):
                on_problem(TraceProblem(pwhere, f"unknown interface {iface}"))
                continue
            link, _snap, ticks = ifaces[iface]
            if cap > len(body) - 20:
                on_problem(TraceProblem(pwhere, f"captured length {cap} exceeds the block"))
                continue
            frame = body[20:20 + cap]
            t = ((hi << 32) | lo) / ticks
        else:  # simple packet block: no timestamp, interface 0
            if not ifaces or len(body) < 4:
                on_problem(TraceProblem(pwhere, "simple packet block without an interface"))
                continue
            (orig,) = struct.unpack_from(endian + "I", body, 0)
            link, snap, _ticks = ifaces[0]
            cap = min(orig, len(body) - 4, snap or orig)
            frame = body[4:4 + cap]
            t = last_t
        last_t = t
        ip = link_payload(link, frame)
        if ip is None:
            yield TracePacket(t, b"", None, pwhere)
            continue
        yield TracePacket(t, _pad(ip, orig - cap), None, pwhere)
    src.pos = size


# ---------------------------------------------------------------------------------------
# JSONL


def _read_jsonl(src: _Source, on_problem: ProblemHandler) -> Iterator[TraceItem]:
    buf, size = src.buf, src.size
    pos, lineno = 0, 0
    while pos < size:
        end = buf.find(b"\n", pos)
        if end < 0:
            end = size
        raw = bytes(buf[pos:end])
        src.pos = pos
        pos = end + 1
        lineno += 1
        where = f"line {lineno}"
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            if end == size and not raw.endswith(b"}"):
                msg = f"truncated line ({msg})"
            on_problem(TraceProblem(where, f"not JSON: {msg}"))
            continue
        try:
            item = _jsonl_item(obj, where)
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            text = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            on_problem(TraceProblem(where, f"bad record: {text}"))
            continue
        if item is not None:
            yield item
    src.pos = size


def _num(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{name} must be a number, not {v!r}")
    return float(v)


def _jsonl_item(obj: Any, where: str) -> TraceItem | None:
    if not isinstance(obj, dict):
        raise ValueError("a record must be a JSON object")
    kind = obj.get("kind")
    if kind == "header":
        if obj.get("format", "vstack-trace") != "vstack-trace":
            raise ValueError(f"unknown trace format {obj.get('format')!r}")
        return None
    if kind == "packet":
        t = _num(obj["t"], "t")
        data = base64.b64decode(str(obj["data"]), validate=True)
        length = int(obj.get("len", len(data)))
        direction = obj.get("dir", "app->net")
        if direction not in ("app->net", "net->app"):
            raise ValueError(f"dir must be app->net or net->app, not {direction!r}")
        if length < len(data):
            raise ValueError(f"len {length} is less than the {len(data)} bytes recorded")
        return TracePacket(t, _pad(data, length - len(data)), direction, where)
    if kind == "event":
        t = _num(obj["t"], "t")
        etype = obj["type"]
        if not isinstance(etype, str) or not etype:
            raise ValueError(f"type must be a non-empty string, not {etype!r}")
        fields = obj.get("fields") or {}
        if not isinstance(fields, dict):
            raise ValueError("fields must be an object")
        flow_text = obj.get("flow")
        flow = FlowKey.parse(flow_text) if flow_text else None
        return TraceEvent(Event(etype, t, fields, flow), where)
    raise ValueError(f"unknown record kind {kind!r}")


# ---------------------------------------------------------------------------------------
# Opening a trace


class TraceReader:
    """Iterates the items of a trace file, reporting problems to ``on_problem``.

    ``format`` is detected from the first bytes: pcap, pcapng or JSONL. ``position`` and
    ``size`` (bytes) are for progress bars."""

    def __init__(self, path: str | os.PathLike[str],
                 on_problem: ProblemHandler | None = None) -> None:
        self.path = os.fspath(path)
        self.problems: list[TraceProblem] = []
        self.problem_count = 0
        self._user = on_problem
        with open(self.path, "rb") as f:
            head = f.read(4)
        if head in _PCAP_MAGICS:
            self.format = "pcap"
        elif head == _PCAPNG_SHB:
            self.format = "pcapng"
        else:
            self.format = "jsonl"
        self.size = os.path.getsize(self.path)
        self._src: _Source | None = None

    def _problem(self, p: TraceProblem) -> None:
        self.problem_count += 1
        if len(self.problems) < 1000:
            self.problems.append(p)
        if self._user is not None:
            self._user(p)

    @property
    def position(self) -> int:
        return self._src.pos if self._src is not None else 0

    def __iter__(self) -> Iterator[TraceItem]:
        with open(self.path, "rb") as f:
            src = _Source(f)
            self._src = src
            try:
                if self.format == "pcap":
                    yield from _read_pcap(src, self._problem)
                elif self.format == "pcapng":
                    yield from _read_pcapng(src, self._problem)
                else:
                    yield from _read_jsonl(src, self._problem)
            finally:
                src.pos = src.size
                src.close()


# ---------------------------------------------------------------------------------------
# Replaying


class ReplayEngine(Protocol):
    """What replay needs of the decision engine (``vstack.decision.engine.DecisionEngine``)."""

    def decide(self, event: Event, now: float) -> Decision: ...

    def submit(self, event: Event, now: float) -> Any: ...

    def next_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> Any: ...


# Called once with the replay's actuator and sink; the engine logs its events and decisions
# to that sink (as ``DecisionEngine`` does), which is how replay sees them.
EngineFactory = Callable[[Actuator, DecisionSink], ReplayEngine]


@dataclass(frozen=True, slots=True)
class ReplayedDecision:
    """One decision made during replay. ``cause``: ``flow.new``, the submitted event's type,
    or ``timer``."""

    time: float
    flow: str | None
    cause: str
    decision: Decision

    def summary(self) -> tuple[Any, ...]:
        d = self.decision
        return (self.time, self.flow, self.cause, d.stack, d.rule, d.interface, d.target,
                d.dscp, d.drop, d.explored, round(d.propensity, 9))


@dataclass(slots=True)
class _FlowState:
    key: FlowKey
    created: float
    last_seen: float
    stack: str = ""
    interface: str = ""
    target: str = ""
    rule: str = ""
    packets_out: int = 0
    packets_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0


@dataclass(slots=True)
class ReplayStats:
    packets: int = 0
    packets_in: int = 0
    non_ip: int = 0
    malformed: int = 0
    orphans: int = 0
    flows: int = 0
    events: int = 0
    events_regenerated: int = 0  # recorded flow.new / timer.* events, skipped
    timers: int = 0
    decisions: int = 0
    problems: int = 0
    expired: int = 0  # flows idle past --idle-timeout (the next packet opens a new flow)
    stacks: dict[str, int] = field(default_factory=dict)  # flow.new decisions per stack

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class ReplayResult:
    decisions: list[ReplayedDecision]
    stats: ReplayStats
    problems: list[TraceProblem]
    flow_facts: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_id: int | None = None

    def first_decisions(self) -> dict[str, ReplayedDecision]:
        """The flow.new decision of every flow."""
        return {d.flow: d for d in self.decisions if d.cause == "flow.new" and d.flow}


class _ReplayActuator:
    """The execution side as replay sees it: keeps each flow's stack, interface and target
    (the engine logs the decisions themselves to its sink)."""

    def __init__(self, replayer: Replayer) -> None:
        self._r = replayer

    def switch(self, flow: FlowKey, stack: str, options: Mapping[str, Any] | None = None,
               *, rule: str | None = None) -> None:
        st = self._r.flows.get(flow)
        if st is not None:
            st.stack = stack
            st.rule = rule or st.rule

    def use_interface(self, flow: FlowKey, ifname: str, *, rule: str | None = None) -> None:
        st = self._r.flows.get(flow)
        if st is not None:
            st.interface = ifname

    def retarget(self, flow: FlowKey, address: str, port: int | None,
                 *, rule: str | None = None) -> None:
        st = self._r.flows.get(flow)
        if st is not None:
            st.target = address if port is None else f"{address}:{port}"

    def set_dscp(self, flow: FlowKey, dscp: int) -> None:
        pass

    def drop(self, flow: FlowKey) -> None:
        pass

    def flows(self) -> Iterable[FlowInfo]:
        return [FlowInfo(s.key, s.stack, s.interface, s.target, s.packets_out, s.packets_in,
                         s.bytes_out, s.bytes_in, s.rule, s.created, s.last_seen)
                for s in self._r.flows.values()]


class _Tap:
    """The sink the engine writes to: records decisions for the result, forwards all."""

    def __init__(self, replayer: Replayer, sink: DecisionSink) -> None:
        self._r = replayer
        self._sink = sink

    def event(self, event: Event) -> None:
        self._sink.event(event)

    def decision(self, flow: FlowKey | None, decision: Decision, now: float) -> None:
        self._r._record(flow, decision, now)
        self._sink.decision(flow, decision, now)

    def outcome(self, flow: FlowKey, stack: str, now: float, metrics: Mapping[str, Any]) -> None:
        self._sink.outcome(flow, stack, now, metrics)

    def flow_seen(self, flow: FlowKey, features: Mapping[str, Any], now: float) -> None:
        self._sink.flow_seen(flow, features, now)

    def close(self) -> None:
        pass


class Replayer:
    """Feeds trace items through the classifier and an engine built by ``engine_factory``
    (called once with the replay's actuator). ``sink`` receives flows, events, decisions
    and outcomes (a ``LogWriter`` for ``--db``)."""

    MAX_TIMERS_PER_STEP = 100_000

    def __init__(self, engine_factory: EngineFactory, sink: DecisionSink | None = None, *,
                 idle_timeout: float | None = None) -> None:
        self.sink: DecisionSink = sink if sink is not None else NullSink()
        self.idle_timeout = idle_timeout
        self.flows: dict[FlowKey, _FlowState] = {}
        self.decisions: list[ReplayedDecision] = []
        self.stats = ReplayStats()
        self.now = float("-inf")
        self.cause = ""
        self.flow_facts: dict[str, dict[str, Any]] = {}  # flow -> its flow.new fields
        self.actuator = _ReplayActuator(self)
        self.engine = engine_factory(self.actuator, _Tap(self, self.sink))

    def _record(self, flow: FlowKey | None, d: Decision, now: float) -> None:
        self.decisions.append(ReplayedDecision(now, None if flow is None else str(flow),
                                               self.cause, d))
        self.stats.decisions += 1

    def _advance(self, t: float) -> None:
        if t > self.now:
            self.now = t
        self.run_timers(self.now)

    def run_timers(self, until: float) -> None:
        """Fire every timer due at or before ``until``, each at its own time."""
        fired = 0
        while fired < self.MAX_TIMERS_PER_STEP:
            nt = self.engine.next_timer()
            if nt is None or nt > until:
                return
            saved, self.now, self.cause = self.now, max(nt, float("-inf")), "timer"
            self.engine.handle_timer(nt)
            self.now = max(saved, nt)
            self.stats.timers += 1
            fired += 1

    def packet(self, item: TracePacket) -> None:
        self._advance(item.time)
        now = self.now
        st = self.stats
        if not item.data:
            st.non_ip += 1
            return
        try:
            if item.direction == "net->app":
                cls = classify(item.data, Direction.NET_TO_APP)
                flow = self.flows.get(cls.key)
                if flow is None:
                    st.orphans += 1
                    return
                st.packets_in += 1
                flow.packets_in += 1
                flow.bytes_in += len(item.data)
                flow.last_seen = now
                return
            cls = classify(item.data, Direction.APP_TO_NET)
        except ParseError:
            st.malformed += 1
            return
        key = cls.key
        flow = self.flows.get(key)
        if flow is not None and self.idle_timeout is not None \
                and now - flow.last_seen > self.idle_timeout:
            self._expire(flow)
            flow = None
        if flow is None and item.direction is None:
            # a pcap has no direction: a packet of a known flow seen from the network side
            # (reversed 5-tuple; for ICMP echo, the same identifier) is a reply
            try:
                back = self.flows.get(classify(item.data, Direction.NET_TO_APP).key)
            except ParseError:  # pragma: no cover - parsed fine just above
                back = None
            if back is not None:
                st.packets_in += 1
                back.packets_in += 1
                back.bytes_in += len(item.data)
                back.last_seen = now
                return
        if flow is not None:
            st.packets += 1
            flow.packets_out += 1
            flow.bytes_out += len(item.data)
            flow.last_seen = now
            return
        st.packets += 1
        st.flows += 1
        flow = _FlowState(key, now, now, packets_out=1, bytes_out=len(item.data))
        self.flows[key] = flow
        ev = flow_new_event(cls, now)
        self.flow_facts[str(key)] = dict(ev.fields)
        self.sink.flow_seen(key, ev.fields, now)
        self.cause = "flow.new"
        d = self.engine.decide(ev, now)
        flow.stack = d.stack or flow.stack
        flow.interface = d.interface or flow.interface
        flow.rule = d.rule or ""
        st.stacks[d.stack or ""] = st.stacks.get(d.stack or "", 0) + 1

    def _expire(self, flow: _FlowState) -> None:
        """The flow was idle past the timeout: forget it, as the datapath would have."""
        del self.flows[flow.key]
        self.stats.expired += 1
        forget = getattr(self.engine, "forget", None)
        if callable(forget):
            forget(flow.key)

    def event(self, item: TraceEvent) -> None:
        ev = item.event
        self._advance(ev.time)
        if ev.type == "flow.new" or ev.type.startswith("timer."):
            self.stats.events_regenerated += 1
            return
        now = self.now
        if ev.time != now:
            ev = Event(ev.type, now, ev.fields, ev.flow)
        self.stats.events += 1
        if ev.type == "flow.metrics" and ev.flow is not None:
            stack = str(ev.fields.get("stack") or "")
            if stack:
                self.sink.outcome(ev.flow, stack, now, ev.fields)
        self.cause = ev.type
        self.engine.submit(ev, now)

    def feed(self, item: TraceItem) -> None:
        if isinstance(item, TracePacket):
            self.packet(item)
        else:
            self.event(item)

    def finish(self) -> None:
        """Fire the timers due up to the last trace time and report the flows' last_seen."""
        if self.now != float("-inf"):
            self.run_timers(self.now)
        for st in self.flows.values():
            self.sink.flow_seen(st.key, {}, st.last_seen)


def engine_factory(ruleset: Any, *, backend: str = "durable", exploration: float = 0.0,
                   seed: int = 0, params: Mapping[str, Any] | None = None) -> EngineFactory:
    """An ``EngineFactory`` building the live ``DecisionEngine`` on ``ruleset`` (a parsed
    ``RuleSet``) with a fixed seed, so replays are deterministic."""
    from vstack.decision.engine import DecisionEngine

    def make(actuator: Actuator, sink: DecisionSink) -> ReplayEngine:
        return DecisionEngine(ruleset, actuator, sink, backend=backend,
                              exploration=exploration, seed=seed, params=params)

    return make


def replay(trace: str | os.PathLike[str] | Iterable[TraceItem], engine_factory: EngineFactory,
           *, sink: DecisionSink | None = None, on_problem: ProblemHandler | None = None,
           progress: Callable[[int, int], None] | None = None,
           idle_timeout: float | None = None) -> ReplayResult:
    """Replay ``trace`` (a path, or items already read) and return its decisions.

    ``progress(position, size)`` is called every few hundred items when reading a file.
    ``idle_timeout``: a flow idle longer than this is forgotten, and its next packet opens
    a new flow (a new decision), as the datapath's idle expiry does; None: flows never
    expire."""
    replayer = Replayer(engine_factory, sink, idle_timeout=idle_timeout)
    problems: list[TraceProblem] = []
    if isinstance(trace, str | os.PathLike):
        reader = TraceReader(trace, on_problem)
        for i, item in enumerate(reader):
            replayer.feed(item)
            if progress is not None and i % 256 == 0:
                progress(reader.position, reader.size)
        if progress is not None:
            progress(reader.size, reader.size)
        problems = reader.problems
        replayer.stats.problems = reader.problem_count
    else:
        for item in trace:
            replayer.feed(item)
    replayer.finish()
    close = getattr(replayer.engine, "close", None)
    if callable(close):
        close()
    return ReplayResult(replayer.decisions, replayer.stats, problems, replayer.flow_facts)


# ---------------------------------------------------------------------------------------
# Comparing runs (shadow evaluation of candidate rules)


@dataclass(frozen=True, slots=True)
class FlowChoice:
    """What a run decided for one flow: the flow.new decision and the stack it ended on."""

    stack: str | None
    rule: str | None
    final: str | None


@dataclass(frozen=True, slots=True)
class FlowDiff:
    flow: str
    old: FlowChoice
    new: FlowChoice

    @property
    def changed(self) -> bool:
        return self.old.stack != self.new.stack

    @property
    def final_changed(self) -> bool:
        return self.old.final != self.new.final


@dataclass(slots=True)
class Comparison:
    old_run: int
    new_run: int | None
    diffs: list[FlowDiff]
    only_old: list[str]
    only_new: list[str]

    @property
    def changed(self) -> list[FlowDiff]:
        return [d for d in self.diffs if d.changed]

    def transitions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.changed:
            k = f"{d.old.stack or '-'} -> {d.new.stack or '-'}"
            out[k] = out.get(k, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    def as_dict(self) -> dict[str, Any]:
        return {
            "old_run": self.old_run, "new_run": self.new_run, "flows": len(self.diffs),
            "same": len(self.diffs) - len(self.changed), "changed": len(self.changed),
            "final_changed": sum(1 for d in self.diffs if d.final_changed),
            "only_old": len(self.only_old), "only_new": len(self.only_new),
            "transitions": self.transitions(),
            "diffs": [{"flow": d.flow, "old_stack": d.old.stack, "old_rule": d.old.rule,
                       "new_stack": d.new.stack, "new_rule": d.new.rule,
                       "old_final": d.old.final, "new_final": d.new.final}
                      for d in self.changed],
        }


def choices_from_result(result: ReplayResult) -> dict[str, FlowChoice]:
    first: dict[str, ReplayedDecision] = {}
    final: dict[str, str | None] = {}
    for d in result.decisions:
        if d.flow is None:
            continue
        if d.cause == "flow.new" and d.flow not in first:
            first[d.flow] = d
        if d.decision.stack is not None:
            final[d.flow] = d.decision.stack
    return {f: FlowChoice(d.decision.stack, d.decision.rule, final.get(f, d.decision.stack))
            for f, d in first.items()}


def choices_from_db(engine: Any, run_id: int) -> dict[str, FlowChoice]:
    """Per flow of a logged run: its first decision with a stack and its last stack.
    Raises ``LookupError`` if the run does not exist."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from db.models import DecisionRow, Run

    with Session(engine) as s:
        if s.get(Run, run_id) is None:
            raise LookupError(f"run {run_id} is not in the database")
        first: dict[str, tuple[str | None, str | None]] = {}
        final: dict[str, str | None] = {}
        for d in s.scalars(select(DecisionRow).where(DecisionRow.run_id == run_id)
                           .where(DecisionRow.flow.is_not(None))
                           .order_by(DecisionRow.time, DecisionRow.id)):
            f = str(d.flow)
            if f not in first:
                first[f] = (d.stack, d.rule)
            if d.stack is not None:
                final[f] = d.stack
    return {f: FlowChoice(st, rule, final.get(f, st)) for f, (st, rule) in first.items()}


def compare(old: Mapping[str, FlowChoice], new: Mapping[str, FlowChoice], old_run: int,
            new_run: int | None = None) -> Comparison:
    both = sorted(set(old) & set(new))
    return Comparison(old_run, new_run, [FlowDiff(f, old[f], new[f]) for f in both],
                      sorted(set(old) - set(new)), sorted(set(new) - set(old)))


__all__ = [
    "Comparison",
    "EngineFactory",
    "FlowChoice",
    "FlowDiff",
    "ReplayEngine",
    "ReplayResult",
    "ReplayStats",
    "ReplayedDecision",
    "Replayer",
    "TraceEvent",
    "TraceItem",
    "TracePacket",
    "TraceProblem",
    "TraceReader",
    "choices_from_db",
    "choices_from_result",
    "compare",
    "engine_factory",
    "link_payload",
    "replay",
]

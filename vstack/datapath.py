"""The packet path, top to bottom (the paper's Figure 2, left side).

application -> TUN (VNIC) -> ``Datapath._on_tun_readable``:

1. **read** up to ``[execution] batch`` packets per wakeup of the asyncio loop (one
   ``os.read`` each, until EAGAIN);
2. **fast path** (known UDP flow, IPv4 without options and not a fragment, or IPv6 without
   extension headers): slice the 5-tuple bytes straight out of the packet, one dict
   lookup gives the flow's pre-resolved send function (the active stack's ``send``), call
   it with a memoryview of the payload. No parsing, no allocation beyond the read itself,
   no logging;
3. **slow path** (everything else): a known flow by its wire key (TCP, UDP on the raw
   stack, dropped flows) -> ``StackEngine.handle``; otherwise ``classify`` (malformed ->
   counted and dropped), a ``flow.new`` event, ``selector.decide`` *before the packet
   leaves*, a new ``StackEngine`` (endpoint, NAT, stack manager), and the packet is sent;
4. **stacks** carry the payload (UDP socket) or the whole packet (raw socket) out; replies
   come back through the stack's reader -> ``Endpoint.deliver`` -> ``os.write`` into the
   TUN -> the application.

A timer every ``metrics_interval_s`` turns per-flow counters into ``flow.metrics`` events
(``metrics_listeners``), notices idle flows and expires them (``flow.idle``), and logs the
datapath counters. Everything runs on one asyncio loop; nothing read from the TUN can raise
out of the reader (every packet's handling is guarded and errors are counted).

``Datapath`` also implements ``Actuator`` (switch, use_interface, retarget, set_dscp, drop,
flows) for the decision engine, management and the control socket.

With TUN offloads, ``vstack.fastpath.OffloadDatapath`` overrides only step 1-2 (the
reader: virtio_net_hdr, USO super-packets sent with one GSO ``sendmsg``); with
``--workers N`` each worker process runs one datapath on its own TUN queue
(``vstack.workers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import math
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

from vstack.analysis.classifier import ParseError, classify, flow_new_event, note_fields
from vstack.analysis.flowkey import FlowKey
from vstack.analysis.reassembly import FragmentError, Reassembler
from vstack.config import Config
from vstack.decision.events import Event
from vstack.execution.endpoint import Endpoint
from vstack.execution.engine import EngineError, FlowEnv, StackEngine
from vstack.execution.flows import FlowTable
from vstack.execution.nat import NatTable
from vstack.execution.selector import Decision, FlowInfo, StackSelector
from vstack.execution.stacks import load_builtin as load_builtin_stacks
from vstack.execution.stacks.base import StackError
from vstack.execution.stacks.raw import RawSockets
from vstack.execution.stacks.udp import UdpStack  # noqa: F401  (registers "udp")
from vstack.execution.static import StaticSelector
from vstack.log import DecisionSink, NullSink

log = logging.getLogger("vstack.datapath")
flowlog = logging.getLogger("vstack.flow")

UDP = 17
SMALL_WAKEUP = 2  # packets per wakeup at or below which a quick wakeup pauses reading
QUICK_WAKEUP_S = 200e-6
PAUSE_S = 0.0005  # asyncio rounds this up to the selector's 1 ms
COLD_PER_TICK = 10_000  # flows idle at the previous tick checked per tick, at least (tick)
MAX_SEGMENTS = 64  # datagrams per UDP GSO send (the kernel allows 64 or more)
GSO_BYTES = 65000  # payload bytes per UDP GSO send (one IP packet: < 64 KiB)
_PORTED = (6, 17, 136)  # protocols whose wire key (classifier.wire_key) carries ports
MetricsListener = Callable[[Event], None]


class FlowNotFound(LookupError):
    """An Actuator call named a flow the datapath does not have."""


def _fast_key(key: FlowKey) -> bytes:
    """The bytes the fast path slices out of a packet: addresses + ports (IPv4: packet
    bytes 12..24, IPv6: 8..44)."""
    fam = socket.AF_INET6 if key.family == 6 else socket.AF_INET
    return (socket.inet_pton(fam, key.src) + socket.inet_pton(fam, key.dst)
            + struct.pack("!HH", key.sport, key.dport))


def _fmt_target(t: tuple[str, int]) -> str:
    return f"[{t[0]}]:{t[1]}" if ":" in t[0] else f"{t[0]}:{t[1]}"


class Datapath:
    """``Datapath(config, selector, sink)``; ``attach(fd)`` starts reading a TUN fd on the
    running loop; ``close()`` stops and releases every flow."""

    def __init__(self, config: Config, selector: StackSelector | None = None,
                 sink: DecisionSink | None = None) -> None:
        self.config = config
        load_builtin_stacks()  # every stack the config or a rule may name
        ex = config.execution
        self.selector: StackSelector = selector or StaticSelector(ex.default_stack)
        self.sink: DecisionSink = sink or NullSink()
        self.nat = NatTable(config.nat)
        self.table: FlowTable[FlowKey, StackEngine] = FlowTable(
            idle_timeout=ex.idle_timeout_s, max_flows=ex.max_flows)
        self.metrics_listeners: list[MetricsListener] = []
        # called once if the TUN fails (the device was deleted): the daemon exits
        self.on_failure: Callable[[str], None] | None = None
        # packet tap (the trace recorder): tap(packet, now, "app->net" | "net->app") for
        # every packet read from / written to the TUN; None (the default) costs one test
        self.tap: Callable[[bytes, float, str], None] | None = None
        self._fast4: dict[bytes, Callable[[list[memoryview]], None]] = {}
        self._fast6: dict[bytes, Callable[[list[memoryview]], None]] = {}
        self._wire: dict[bytes, StackEngine] = {}
        self._env: FlowEnv | None = None  # what all flows share (built on the first flow)
        self._cold: list[FlowKey] = []  # the sweep's round over flows idle at the last tick
        self._cold_i = 0
        self._batch = ex.batch
        self._read_size = max(config.vnic.mtu, 1500) + 256
        self._fd = -1
        self._write: Callable[[bytes], int] = _no_write
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._raw: RawSockets | None = None
        self._last_tick = 0.0
        self._last_wakeup = 0.0
        self._paused = False
        self._failed = False
        self.pauses = 0  # reading paused for a tick (see _on_tun_readable)
        self._closed = False
        # datapath counters (see stats())
        self.rx_packets = 0
        self.fast_packets = 0
        self.batched = 0  # batches of more than one datagram handed to a stack at once
        self.slow_packets = 0
        self.malformed = 0
        self.fragments = 0
        # IP fragments are reassembled (bounded; see vstack.analysis.reassembly)
        self.reassembler = Reassembler()
        self.dropped = 0
        self.errors = 0
        self.decide_errors = 0
        self.last_error = ""

    # ------------------------------------------------------------------ lifecycle
    def attach(self, fd: int, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start reading packets from the TUN file descriptor ``fd`` (non-blocking)."""
        self._loop = loop or asyncio.get_running_loop()
        self._fd = fd
        os.set_blocking(fd, False)
        self._write = functools.partial(os.write, fd)
        self._raw = RawSockets(self.config.vnic.fwmark)
        self._loop.add_reader(fd, self._on_tun_readable)
        self._last_tick = time.monotonic()
        self._timer = self._loop.call_later(self.config.execution.metrics_interval_s, self._tick)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._loop is not None and self._fd >= 0:
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                self._loop.remove_reader(self._fd)
        self._cold = []
        for key, e in self.table.clear():
            e.close()
            self._unregister(key)
        if self._raw is not None:
            self._raw.close()

    # ------------------------------------------------------------------ 1+2: read, fast path
    def _on_tun_readable(self) -> None:
        read = os.read
        fd = self._fd
        size = self._read_size
        fast4 = self._fast4
        fast6 = self._fast6
        batch = self._batch
        tap = self.tap
        n = fast = batched = 0
        # consecutive fast-path datagrams of one flow and one size are handed to the stack
        # together (UDP: one sendmsg with UDP_SEGMENT); anything else flushes them first,
        # so the order within a flow is kept
        pend: list[memoryview] = []
        pend_f: Callable[[list[memoryview]], None] | None = None
        pend_len = pend_max = 0
        while n < batch:
            try:
                pkt = read(fd, size)
            except BlockingIOError:
                break
            except OSError as e:  # the device went away
                self._tun_failed(e)
                break
            n += 1
            try:
                if tap is not None:
                    tap(pkt, time.time(), "app->net")
                b0 = pkt[0]
                f = None
                if b0 == 0x45:
                    # UDP, not a fragment, UDP length = packet length - 20 (>= 8)
                    if (pkt[9] == UDP and not (pkt[6] & 0x3F or pkt[7])
                            and (pkt[24] << 8 | pkt[25]) == len(pkt) - 20 >= 8):
                        f = fast4.get(pkt[12:24])
                        off = 28
                elif (b0 >> 4 == 6 and pkt[6] == UDP
                      and (pkt[44] << 8 | pkt[45]) == len(pkt) - 40 >= 8):
                    f = fast6.get(pkt[8:44])
                    off = 48
                if f is not None:
                    fast += 1
                    plen = len(pkt) - off
                    if f is pend_f and plen == pend_len and len(pend) < pend_max:
                        pend.append(memoryview(pkt)[off:])
                        continue
                    if pend_f is not None:
                        flush, pend_f = pend_f, None
                        if len(pend) > 1:
                            batched += 1
                        flush(pend)
                    pend = [memoryview(pkt)[off:]]
                    pend_f = f
                    pend_len = plen
                    pend_max = min(MAX_SEGMENTS, GSO_BYTES // plen) if plen else 1
                    continue
                if pend_f is not None:
                    flush, pend_f = pend_f, None
                    if len(pend) > 1:
                        batched += 1
                    flush(pend)
                self._slow(pkt)
            except IndexError:  # shorter than the header the fast path looked at
                self.malformed += 1
            except Exception as e:  # nothing from the TUN may crash the datapath
                self._count_error(e)
        self._end_wakeup(n, fast, batched, pend_f, pend)

    def _end_wakeup(self, n: int, fast: int, batched: int,
                    pend_f: Callable[[list[memoryview]], None] | None,
                    pend: list[memoryview]) -> None:
        """The end of a wakeup of either TUN reader (this one and ``OffloadDatapath``'s),
        once per wakeup: send the last pending run, add the counters, maybe pause reading.
        (The flush inside the readers' loops stays inline: with interleaved flows it runs
        for every packet.)"""
        if pend_f is not None:
            if len(pend) > 1:
                batched += 1
            try:
                pend_f(pend)
            except Exception as e:
                self._count_error(e)
        self.rx_packets += n
        self.fast_packets += fast
        self.batched += batched
        # NAPI-like mitigation: wakeups that find only a packet or two, coming in quick
        # succession, cost more in epoll + loop dispatch than in packet work. Then pause
        # reading for one loop tick (~1 ms; the TUN queue holds 4096 packets) so the next
        # wakeup finds a batch. At low packet rates (wakeups > 200 us apart) nothing waits.
        if n <= SMALL_WAKEUP and self._loop is not None:
            now = time.monotonic()
            quick = now - self._last_wakeup < QUICK_WAKEUP_S
            self._last_wakeup = now
            if quick and not self._paused:
                self._paused = True
                self._loop.remove_reader(self._fd)
                self._loop.call_later(PAUSE_S, self._resume)
                self.pauses += 1

    def _resume(self) -> None:
        self._paused = False
        if not self._closed and not self._failed and self._loop is not None:
            self._loop.add_reader(self._fd, self._on_tun_readable)
            self._on_tun_readable()

    # ------------------------------------------------------------------ 3: slow path
    def _slow(self, pkt: bytes) -> None:
        self.slow_packets += 1
        n = len(pkt)
        # known flows whose packets leave whole (raw stack, dropped): no parsing needed.
        # (A UDP flow on a payload stack gets here only with a packet the fast path did
        # not trust, e.g. IPv4 options or a bad UDP length: that one is classified.)
        if n >= 24 and (pkt[0] == 0x45 and not (pkt[6] & 0x3F or pkt[7])
                        and pkt[9] in _PORTED):
            e = self._wire.get(pkt[9:10] + pkt[12:24])
            if e is not None and e.packet_mode:
                e.handle(pkt, 0, n)
                return
        elif n >= 44 and pkt[0] >> 4 == 6 and pkt[6] in _PORTED:
            e = self._wire.get(pkt[6:7] + pkt[8:44])
            if e is not None and e.packet_mode:
                e.handle(pkt, 0, n)
                return
        try:
            c = classify(pkt)
        except ParseError:
            self.malformed += 1
            return
        p = c.packet
        if c.fragment:
            self._fragment(pkt)
            return
        key = c.key
        e = self.table.get(key)
        if e is None:
            e = self._new_flow(c)
            if e is None:
                return
        e.handle(pkt, p.payload_offset, p.payload_offset + p.payload_len)

    def _fragment(self, pkt: bytes) -> None:
        """An IPv4/IPv6 fragment: held until its datagram is complete (bounded memory and
        time, see ``Reassembler``); then the datagram goes to its flow like any packet. A
        payload stack (udp, dccp, tcp, ...) gets the whole reassembled payload, to its
        NAT-mapped target; a packet-mode flow (raw stack, dropped) gets the original
        fragments, since a raw socket cannot send a datagram larger than the MTU.
        Fragments of datagrams that never complete are counted (``fragments_dropped``)."""
        self.fragments += 1
        try:
            done = self.reassembler.push(pkt, time.monotonic())
        except FragmentError:
            self.malformed += 1
            return
        if done is None:
            return
        try:
            c = classify(done.packet)
        except ParseError:
            self.malformed += 1
            return
        e = self.table.get(c.key)
        if e is None:
            e = self._new_flow(c)
            if e is None:
                return
        if e.packet_mode:
            for f in done.fragments:
                e.handle(f, 0, len(f))
        else:
            p = c.packet
            e.handle(done.packet, p.payload_offset, p.payload_offset + p.payload_len)

    def _new_flow(self, c: Any) -> StackEngine | None:
        key: FlowKey = c.key
        now = time.time()
        ev = flow_new_event(c, now)
        sink = self.sink
        if type(sink) is not NullSink:  # the bench's sink: skip the copy
            try:
                sink.event(ev)
                # a copy: the selector below must not change what the log sees
                sink.flow_seen(key, dict(ev.fields), now)
            except Exception as err:  # the log must never stop the packet path
                self._count_error(err)
        udp = c.proto == UDP
        default = self.config.execution.default_stack if udp else "raw"
        try:
            d = self.selector.decide(ev, now)
        except Exception as err:
            self.decide_errors += 1
            log.warning("selector failed on %s (%s): using %s", key, err, default)
            d = Decision(stack=default, rule="fallback")
        try:
            sink.decision(key, d, now)
        except Exception as err:
            self._count_error(err)
        env = self._env or self._make_env()
        # the endpoint (UDP flows) is built when a payload stack is first activated; the
        # flow keeps its first packet's fields as one int (``note``), not a dict
        e = StackEngine(key, env, now, None, c.note())
        e.rule = d.rule or ""
        if d.interface:
            e.interface = d.interface
        if d.target is not None:
            e.target_override = d.target
        if d.dscp is not None:
            e.dscp = d.dscp
        if d.drop:
            e.set_drop()
        else:
            name = d.stack or default
            if not e.can_carry(name):
                log.warning("flow %s: stack %r cannot carry it, using raw", key, name)
                name = "raw"
            try:
                e.activate(name, d.options, d.rule)
            except EngineError as err:
                # the chosen stack failed to open: the default stack, else raw, else drop
                for fb in dict.fromkeys((default, "raw")):
                    if fb == name or not e.can_carry(fb):
                        continue
                    try:
                        e.activate(fb, None, "fallback")
                    except EngineError:
                        continue
                    log.warning("flow %s: %s; using %s", key, err, fb)
                    break
                else:
                    log.warning("flow %s: %s; dropping", key, err)
                    e.set_drop()
        # last seen: the latest tick (one float shared by every flow made since, not one
        # each); the next tick sees the first packet's activity and touches it
        evicted = self.table.insert(key, e, self._last_tick)
        if evicted is not None:
            ek, ee = evicted
            flowlog.info("flow %s evicted (table full, %d flows)", ek, self.table.max_flows)
            ee.close()
            self._unregister(ek)
        self._register(e)
        if flowlog.isEnabledFor(logging.INFO):  # the arguments cost more than the check
            flowlog.info("flow %s created: stack=%s target=%s rule=%s", key,
                         e.stack_name or "drop", _fmt_target(e.target), e.rule or "-")
        return e

    def _make_env(self) -> FlowEnv:
        loop = self._loop or asyncio.get_event_loop()
        env = self._env = FlowEnv(loop=loop, nat=self.nat, fwmark=self.config.vnic.fwmark,
                                  stack_options=self._stack_options,
                                  on_error=self._stack_error,
                                  fallback=self.config.execution.default_stack,
                                  make_endpoint=self._make_endpoint)
        return env

    def _make_endpoint(self, key: FlowKey) -> Endpoint | None:
        """A UDP flow's endpoint (built when its first payload stack is activated)."""
        if key.proto != UDP:
            return None
        return Endpoint(key, self._write_tapped if self.tap is not None else self._write)

    def _write_tapped(self, pkt: bytes) -> int:
        tap = self.tap
        if tap is not None:
            try:
                tap(pkt, time.time(), "net->app")
            except Exception as e:
                self._count_error(e)
        return self._write(pkt)

    def _stack_options(self, name: str) -> Mapping[str, Any]:
        # stacks check their options strictly: only [stacks.<name>] goes in
        opts: dict[str, Any] = dict(self.config.stacks.get(name, {}))
        if name == "raw":
            opts["raw"] = self._raw
        return opts

    def _stack_error(self, e: StackEngine, err: StackError) -> None:
        """A stack reported an error. The engine already dropped a failed stack and fell
        back (see ``StackEngine``); refresh the fast path and tell the rules
        (``stack.error``) and the log."""
        flowlog.warning("flow %s: stack %s error: %s (%s)", e.key, err.stack, err.reason,
                        "remote" if err.remote else "local")
        if self.table.get(e.key) is not e:
            return  # a flow already closed (evicted, expired)
        self._register(e)
        fatal = e.last_error_fatal
        if fatal and e.rule == "fallback" and e.stack_name:
            self._log_decision(e.key, Decision(stack=e.stack_name, rule="fallback"))
        now = time.time()
        ev = Event("stack.error", now, {**self._flow_fields(e), "failed_stack": err.stack,
                                        "reason": err.reason, "remote": err.remote,
                                        "fatal": fatal}, e.key)
        self._publish(ev)

    # ------------------------------------------------------------------ fast-path tables
    def _register(self, e: StackEngine) -> None:
        key = e.key
        fk = _fast_key(key) if key.proto in _PORTED else b""
        if fk:
            self._wire[bytes([key.proto]) + fk] = e
        if key.proto != UDP:
            return
        table = self._fast6 if key.family == 6 else self._fast4
        many = e.send_many
        if e.packet_mode or e.dropping or e.active is None or many is None:
            table.pop(fk, None)
        else:
            table[fk] = many

    def _unregister(self, key: FlowKey) -> None:
        if key.proto not in _PORTED:
            return
        fk = _fast_key(key)
        self._wire.pop(bytes([key.proto]) + fk, None)
        (self._fast6 if key.family == 6 else self._fast4).pop(fk, None)

    # ------------------------------------------------------------------ errors
    def _count_error(self, e: BaseException) -> None:
        self.errors += 1
        msg = f"{type(e).__name__}: {e}"
        if msg != self.last_error:
            self.last_error = msg
            log.warning("packet error (counted): %s", msg)

    def _tun_failed(self, e: OSError) -> None:
        if self._failed:
            return
        self._failed = True
        msg = f"reading the TUN failed: {e.strerror}; the datapath stops"
        log.error("%s", msg)
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        if self.on_failure is not None:
            self.on_failure(msg)

    # ------------------------------------------------------------------ timer: metrics, idle
    def _tick(self) -> None:
        loop = self._loop
        if loop is None or self._closed:
            return
        interval = self.config.execution.metrics_interval_s
        self._timer = loop.call_later(interval, self._tick)
        try:
            self.tick()
        except Exception as e:
            log.exception("tick failed: %s", e)

    def tick(self, now_mono: float | None = None) -> None:
        """Per-interval work: flow.metrics events, idle detection and expiry.

        The sweep is two-tier so that it does not cost O(flows) every interval (issue 6,
        ``bench flows``: 0.2-1 s per tick at 10^5 flows before): flows that were active
        at the previous tick (the most recent end of the table's LRU order) are checked
        every tick, exactly as before; the others are checked in slices of at least
        ``COLD_PER_TICK`` a tick, each once per round (up to 10^4 flows: every tick; a
        round never takes more than a quarter of the idle timeout). Expiry asks each flow
        that is due whether it had traffic first, so a flow is never expired while
        active; an idle flow goes at the first tick ``idle_timeout_s`` after the tick
        that last saw it active (exact to the tick for flows active at the previous tick,
        to the round for the others). Metrics cover each flow's own interval (since the
        tick that last saw it active)."""
        mono = time.monotonic() if now_mono is None else now_mono
        now = time.time()
        prev = self._last_tick
        self._last_tick = mono
        self.reassembler.expire(mono)
        table = self.table
        check = self._check_flow
        for key, e in table.recent(prev):  # active at the previous tick, or new since
            check(key, e, mono, now)
        cold = self._cold
        if self._cold_i >= len(cold):  # a new round
            cold = self._cold = table.keys()
            self._cold_i = 0
        ex = self.config.execution
        idle_s = ex.idle_timeout_s
        # inf ("never expire") visits the idle flows in one round, as a short timeout would
        rounds = (max(1, int(idle_s / max(ex.metrics_interval_s, 1e-3) / 4))
                  if math.isfinite(idle_s) else 1)
        per = max(COLD_PER_TICK, -(-len(cold) // rounds))
        i = self._cold_i
        self._cold_i = j = min(i + per, len(cold))
        entry = table.entry
        for key in cold[i:j]:
            ce = entry(key)
            if ce is not None and ce[1] < prev:
                check(key, ce[0], mono, now)
        if j >= len(cold):
            self._cold = []
            self._cold_i = 0
        for key, e in table.expire(mono, keep=lambda k, v: check(k, v, mono, now)):
            idle = ex.idle_timeout_s
            ev = Event("flow.idle", now, {**self._flow_fields(e), "idle_s": idle}, key)
            po, bo, pi, bi, dr = e.totals()
            flowlog.info("flow %s expired after %.0f s idle: out %d pkts/%d B, in %d pkts/%d B,"
                         " drops %d", key, idle, po, bo, pi, bi, dr)
            e.close()
            self._unregister(key)
            self._publish(ev)

    def _check_flow(self, key: FlowKey, e: StackEngine, mono: float, now: float) -> bool:
        """One flow at a tick: if it had traffic since it was last seen active, touch it
        and report its metrics (sink outcome, flow.metrics); True if it had."""
        activity = e.activity()
        if activity == e.last_activity:
            return False
        e.last_activity = activity
        last = self.table.touch_last(key, mono)
        if last is None:  # gone from the table since it was listed
            return False
        dt = max(mono - last, 1e-6)
        t = e.totals()
        p = e.last_metrics
        e.last_metrics = t
        dpo, dbo, dpi, dbi, ddr = t[0] - p[0], t[1] - p[1], t[2] - p[2], t[3] - p[3], t[4] - p[4]
        metrics = {
            "packets": dpo + dpi, "bytes": dbo + dbi,
            "rate_bps": (dbo + dbi) * 8 / dt, "pps": (dpo + dpi) / dt,
            "loss": e.interval_loss(p[0]), "rtt_ms": e.rtt_ms(), "drops": ddr,
            "interval_s": dt,
        }
        try:
            self.sink.outcome(key, e.stack_name, now, metrics)
        except Exception as err:
            self._count_error(err)
        if self.metrics_listeners:
            ev = Event("flow.metrics", now, {**self._flow_fields(e), **metrics}, key)
            self._emit(ev)
        return True

    def _publish(self, ev: Event) -> None:
        """An event for the log (``sink.event``; a failing sink is counted) and the
        listeners."""
        try:
            self.sink.event(ev)
        except Exception as err:
            self._count_error(err)
        self._emit(ev)

    def _emit(self, ev: Event) -> None:
        for cb in list(self.metrics_listeners):
            try:
                cb(ev)
            except Exception as err:
                log.warning("metrics listener %r failed: %s", cb, err)

    def _flow_fields(self, e: StackEngine) -> dict[str, Any]:
        """The flow's ``FLOW_FIELDS`` (its first packet's) with its stack and interface
        now."""
        return note_fields(e.key, e.first or 0, iface=e.interface or "", stack=e.stack_name)

    # ------------------------------------------------------------------ Actuator
    def _engine(self, flow: FlowKey) -> StackEngine:
        e = self.table.get(flow)
        if e is None:
            raise FlowNotFound(f"no flow {flow}")
        return e

    def switch(self, flow: FlowKey, stack: str, options: Mapping[str, Any] | None = None,
               *, rule: str | None = None) -> None:
        """Switch ``flow`` to ``stack`` between two packets. Raises FlowNotFound or
        EngineError (unknown stack, or one that cannot carry the flow / failed to open)."""
        e = self._engine(flow)
        old = "drop" if e.dropping else e.stack_name or "drop"
        e.activate(stack, options, rule)
        self._register(e)
        self._log_decision(flow, Decision(stack=stack, rule=rule, options=options or {}))
        if old != stack:
            flowlog.info("flow %s switched %s -> %s (target %s, rule %s)", flow, old, stack,
                         _fmt_target(e.target), rule or "-")

    def _replace(self, flow: FlowKey, attr: str, value: Any, decision: Decision,
                 rule: str | None) -> StackEngine:
        """Set one of the flow's placement attributes (``interface``, ``target_override``)
        and rebuild its active stack on it; if that fails the flow keeps the old value."""
        e = self._engine(flow)
        old = getattr(e, attr)
        setattr(e, attr, value)
        try:
            e.reactivate()
        except EngineError:
            setattr(e, attr, old)
            raise
        if rule is not None:
            e.rule = rule
        self._register(e)
        self._log_decision(flow, decision)
        return e

    def use_interface(self, flow: FlowKey, ifname: str, *, rule: str | None = None) -> None:
        self._replace(flow, "interface", ifname or None, Decision(interface=ifname, rule=rule),
                      rule)
        flowlog.info("flow %s moved to interface %s (rule %s)", flow, ifname or "-", rule or "-")

    def retarget(self, flow: FlowKey, address: str, port: int | None,
                 *, rule: str | None = None) -> None:
        self._engine(flow)  # FlowNotFound before any complaint about the address
        try:
            addr = str(ipaddress.ip_address(address))
        except ValueError:
            raise ValueError(f"retarget {flow}: not an IP address: {address!r}") from None
        if (":" in addr) != (flow.family == 6):
            raise ValueError(f"retarget {flow}: {addr} is not an IPv{flow.family} address")
        e = self._replace(flow, "target_override", (addr, port),
                          Decision(target=(addr, port), rule=rule), rule)
        flowlog.info("flow %s retargeted to %s (rule %s)", flow, _fmt_target(e.target),
                     rule or "-")

    def set_dscp(self, flow: FlowKey, dscp: int) -> None:
        if not 0 <= dscp < 64:
            raise ValueError(f"dscp must be 0..63, got {dscp}")
        self._engine(flow).set_dscp(dscp)
        self._log_decision(flow, Decision(dscp=dscp))

    def drop(self, flow: FlowKey) -> None:
        e = self._engine(flow)
        e.set_drop()
        self._register(e)
        self._log_decision(flow, Decision(drop=True))
        flowlog.info("flow %s: dropping", flow)

    def flows(self) -> list[FlowInfo]:
        return [self._info(key, e) for key, e in self.table.items()]

    def flow_info(self, flow: FlowKey) -> FlowInfo | None:
        """One flow's view, O(1) (the decision engine reads a flow's current stack and
        interface before it acts); None if there is no such flow."""
        e = self.table.get(flow)
        return None if e is None else self._info(flow, e)

    def _info(self, key: FlowKey, e: StackEngine) -> FlowInfo:
        po, bo, pi, bi, _ = e.totals()
        return FlowInfo(key, "drop" if e.dropping else e.stack_name or "drop",
                        e.interface or "", _fmt_target(e.target), po, pi, bo, bi, e.rule,
                        e.created, self.table.last_seen(key))

    def _log_decision(self, flow: FlowKey, d: Decision) -> None:
        try:
            self.sink.decision(flow, d, time.time())
        except Exception as err:
            self._count_error(err)

    # ------------------------------------------------------------------ configuration reload
    def reload(self, config: Config) -> None:
        """Apply a new configuration's NAT map and default stack to new and live flows
        (flows whose stack the static selector chose). VNIC settings need a restart."""
        if config.vnic != self.config.vnic:
            log.warning("reload: [vnic] changes need a restart; ignored")
            config.vnic = self.config.vnic
        self.config = config
        self.nat.update(config.nat)
        if isinstance(self.selector, StaticSelector):
            self.selector.set_default(config.execution.default_stack)
        if self._env is not None:  # where a failed stack's flow falls back to
            self._env.fallback = config.execution.default_stack
        for key, e in list(self.table.items()):
            try:
                if (e.rule == "static" and key.proto == UDP and not e.dropping
                        and e.stack_name != config.execution.default_stack):
                    self.switch(key, config.execution.default_stack, rule="static")
                elif e.active is not None and e.target_for(e.stack_name) != e.active.ctx.target:
                    e.reactivate()
                    self._register(e)
                    flowlog.info("flow %s retargeted to %s (config reload)", key,
                                 _fmt_target(e.target))
            except EngineError as err:
                log.warning("reload: flow %s: %s", key, err)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        c = self.table.counters()
        return {
            "rx_packets": self.rx_packets, "fast_packets": self.fast_packets,
            "batched": self.batched, "pauses": self.pauses,
            "slow_packets": self.slow_packets, "malformed": self.malformed,
            "fragments": self.fragments, "reassembled": self.reassembler.stats.reassembled,
            "fragments_dropped": self.reassembler.stats.dropped_fragments,
            "dropped": self.dropped, "errors": self.errors,
            "decide_errors": self.decide_errors, "flows": c.current,
            "flows_created": c.created, "flows_expired": c.expired,
            "flows_evicted": c.evicted,
        }


def _no_write(_pkt: bytes) -> int:
    return 0

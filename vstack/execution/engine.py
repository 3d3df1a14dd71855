"""The stack engine: one per flow. It holds the flow's endpoint (UDP flows), asks the NAT
engine for the target of each stack, and is the flow's stack manager.

Stack manager: a stack is built on first use from the registry (``STACKS``), opened, and
cached: **one stack per stack name**, the one for the flow's current target, interface and
options (the config's ``[stacks.<name>]`` plus the decision's). Switching the active stack
replaces one reference between two packets (one asyncio loop: nothing runs in between), so
no packet is split across stacks. Stacks that were active before stay open: replies still
in flight on them reach the application, and switching back is instant. A stack that is
not ready yet (a handshake) queues what it is given (its own bounded queue, see
``Stack``), so a switch to it loses nothing.

A stack whose target, interface or options no longer match (retarget, use_interface, a
decision with other options, a config reload) is *superseded*: it leaves the cache at once
(the next use builds a fresh one) and is closed ``RETIRE_S`` later, so replies already in
flight on it still reach the application; its counters stay in the flow's totals.

A stack that **fails** (``ctx.on_error`` from a stack whose ``failed`` is true: the DCCP
peer reset or vanished) leaves the cache and is closed at once; if it was the active stack
the flow falls back to ``fallback`` (the config's default stack, normally udp; then udp,
then raw; else it drops), so traffic keeps flowing, and a later use of the failed stack
builds a fresh one (a new handshake). Errors that do not end a stack (UDP's ICMP errors,
TCP's reconnects) are only reported. Either way the engine's ``on_error`` hears of it
(the datapath turns it into a ``stack.error`` event).

Which stacks can carry a flow: a stack whose ``carries`` is ``"payload"`` (the default:
UDP, DCCP, ...) needs the endpoint, so only UDP flows; every flow can use ``raw``
(``carries = "packet"``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from itertools import chain
from typing import Any

from vstack.analysis.flowkey import FlowKey
from vstack.execution.endpoint import Endpoint
from vstack.execution.nat import NatTable
from vstack.execution.stacks.base import STACKS, Stack, StackContext, StackError

log = logging.getLogger("vstack.flow")

UDP = 17
RETIRE_S = 1.0  # a superseded stack stays open this long for replies in flight


class EngineError(ValueError):
    """A request the engine cannot carry out (unknown stack, stack that cannot carry the
    flow, a stack that failed to open). The flow keeps its current stack."""


def carries_packets(cls: type[Stack]) -> bool:
    return getattr(cls, "carries", "payload") == "packet"


class FlowEnv:
    """What every flow of one datapath shares (one object, referenced by each engine, so
    a flow pays one slot for it rather than seven; issue 6, ``bench flows``)."""

    __slots__ = ("fallback", "fwmark", "loop", "make_endpoint", "nat", "on_error",
                 "stack_options")

    def __init__(self, *, loop: asyncio.AbstractEventLoop, nat: NatTable, fwmark: int,
                 stack_options: Callable[[str], Mapping[str, Any]],
                 on_error: Callable[[StackEngine, StackError], None] | None = None,
                 fallback: str = "udp",
                 make_endpoint: Callable[[FlowKey], Endpoint | None] | None = None) -> None:
        self.loop = loop
        self.nat = nat
        self.fwmark = fwmark
        self.stack_options = stack_options
        self.on_error = on_error
        self.fallback = fallback  # the stack a flow falls back to when its active one fails
        # builds a UDP flow's endpoint when a payload stack is first activated (None: the
        # flow has none, so only packet stacks can carry it)
        self.make_endpoint = make_endpoint


class _StackErrors:
    """A stack's ``ctx.on_error``: tells its engine which stack reported (a slotted object
    instead of a closure + cell + box list per stack)."""

    __slots__ = ("engine", "stack")

    def __init__(self, engine: StackEngine) -> None:
        self.engine = engine
        self.stack: Stack | None = None

    def __call__(self, err: StackError) -> None:
        self.engine._stack_error(self.stack, err)


# shared and never written: a flow without a stack (retiring) yet
_NO_STACKS: dict[str, Stack] = {}
_NO_RETIRING: list[Stack] = []
_ZERO2 = (0, 0)
_ZERO5 = (0, 0, 0, 0, 0)
_NO_OPTIONS: Mapping[str, Any] = {}


class StackEngine:
    """Endpoint + NAT + stack manager of one flow.

    Memory (issue 6, ``bench flows``): one per flow, so ``__slots__``, everything the
    flows share in one ``FlowEnv``, and what most flows never need built on first use:
    the stack cache (dicts), the retiring list, the closed stacks' counters, the endpoint
    (a dropped flow has none). ``send``/``send_many`` are None while the flow drops."""

    __slots__ = ("_closed", "_lost_mark", "active", "created", "dropping",
                 "drops", "dscp", "endpoint", "env", "failures", "first", "interface", "key",
                 "last_activity", "last_error_fatal", "last_metrics", "packet_mode",
                 "retiring", "rule", "send", "send_many", "stack_name", "stacks", "switches",
                 "target_override")

    def __init__(self, key: FlowKey, env: FlowEnv, created: float,
                 endpoint: Endpoint | None = None, first: Any = None) -> None:
        self.key = key
        self.env = env
        self.endpoint = endpoint
        self.created = created
        self.first = first  # the datapath's note of the first packet (event fields)
        # one cached stack per name; each stack's ``built_for`` says what it was built
        # for: (target, interface, effective options without the engine's dscp, the
        # decision's own options)
        self.stacks: dict[str, Stack] = _NO_STACKS
        self.retiring: list[Stack] = _NO_RETIRING  # superseded, closed RETIRE_S later
        self.failures = 0  # stacks that failed (dropped from the cache)
        self.last_error_fatal = False  # the last on_error came from a stack that failed
        self.active: Stack | None = None
        self.stack_name = ""
        self.rule = ""
        self.target_override: tuple[str, int | None] | None = None
        self.interface: str | None = None
        self.dscp: int | None = None
        self.dropping = False
        self.drops = 0  # packets dropped by a drop decision / no stack
        self.packet_mode = True  # the active stack takes whole packets (raw)
        # None: no stack (dropping) -> counted in drops
        self.send: Callable[[Any], None] | None = None
        # the fast path hands a batch of equal-size payloads of this flow at once
        self.send_many: Callable[[list[memoryview]], None] | None = None
        self.switches = 0
        # closed stacks' out pkts/bytes, in pkts/bytes, drops, lost (None: none closed)
        self._closed: list[int] | None = None
        self._lost_mark = 0  # packets lost at the last interval_loss()
        # activity snapshot for idle detection and metrics intervals (owned by the datapath)
        self.last_activity = 0
        self.last_metrics: tuple[int, int, int, int, int] = _ZERO5

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.env.loop

    @property
    def nat(self) -> NatTable:
        return self.env.nat

    @property
    def fallback(self) -> str:
        return self.env.fallback

    # ------------------------------------------------------------------ NAT
    def target_for(self, stack: str) -> tuple[str, int]:
        k = self.key
        if self.target_override is not None:
            addr, port = self.target_override
            return addr, k.dport if port is None else port
        if stack == "raw":  # raw packets leave unchanged
            return k.dst, k.dport
        return self.env.nat.lookup(k.dst, k.dport, stack)

    @property
    def target(self) -> tuple[str, int]:
        return self.active.ctx.target if self.active is not None else self.target_for(
            self.stack_name or "raw")

    # ------------------------------------------------------------------ stack manager
    def can_carry(self, name: str) -> bool:
        cls = STACKS.get(name)
        return cls is not None and (carries_packets(cls) or (
            self.key.proto == UDP and (self.endpoint is not None
                                       or self.env.make_endpoint is not None)))

    def _get_stack(self, name: str, options: Mapping[str, Any] | None) -> Stack:
        cls = STACKS.get(name)
        if cls is None:
            raise EngineError(f"unknown stack {name!r} (known: {', '.join(sorted(STACKS))})")
        if not self.can_carry(name):
            raise EngineError(f"stack {name!r} cannot carry {self.key.proto_name} flows "
                              "(only UDP flows have an endpoint)")
        env = self.env
        target = self.target_for(name)
        requested: Mapping[str, Any] = dict(options) if options else _NO_OPTIONS
        opts: dict[str, Any] = dict(env.stack_options(name))
        if requested:
            opts.update(requested)
        st = self.stacks.get(name)
        built = st.built_for if st is not None else None
        if (st is not None and not getattr(st, "failed", False) and built is not None
                and built[0] == target and built[1] == self.interface and built[2] == opts):
            return st
        built_for = (target, self.interface, dict(opts) if opts else _NO_OPTIONS, requested)
        if self.dscp is not None:
            opts.setdefault("dscp", self.dscp)
        ep = self.endpoint
        if ep is None and not carries_packets(cls) and env.make_endpoint is not None:
            ep = self.endpoint = env.make_endpoint(self.key)
        errors = _StackErrors(self)
        ctx = StackContext(loop=env.loop, family=self.key.family, target=target,
                           deliver=ep.deliver if ep is not None else _no_deliver,
                           on_error=errors, fwmark=env.fwmark, interface=self.interface,
                           options=opts,
                           deliver_gso=ep.deliver_gso if ep is not None else None)
        try:
            new = cls(ctx)
            errors.stack = new
            new.built_for = built_for
            new.open()
        except Exception as e:  # a stack's failure (or bug) must not take the flow down
            if errors.stack is not None:
                self._close(errors.stack)
            raise EngineError(f"stack {name!r} to {_fmt(target)} failed to open: {e}") from e
        if st is not None:  # superseded (or failed): out of the cache, closed later / now
            self._evict(name, st, retire=not getattr(st, "failed", False))
        if self.stacks is _NO_STACKS:
            self.stacks = {}
        self.stacks[name] = new
        return new

    def _requested(self, name: str) -> Mapping[str, Any] | None:
        st = self.stacks.get(name)
        b = st.built_for if st is not None else None
        return b[3] if b is not None else None

    def activate(self, name: str, options: Mapping[str, Any] | None = None,
                 rule: str | None = None) -> Stack:
        """Make ``name`` the active stack (built and cached on first use)."""
        st = self._get_stack(name, options)
        if st is not self.active or self.dropping:
            if self.active is not None and st is not self.active:
                self.switches += 1
            self.active = st
            self.stack_name = name
            self.packet_mode = carries_packets(type(st))
            self.send = st.send
            many = getattr(st, "send_many", None)
            self.send_many = many if many is not None else _one_by_one(st.send)
        if rule is not None:
            self.rule = rule
        self.dropping = False
        return st

    def reactivate(self) -> Stack | None:
        """Rebuild the active stack after a change of target or interface (with the options
        it was built with), and retire the cached stacks the change superseded."""
        st = None
        if self.stack_name:
            st = self.activate(self.stack_name, self._requested(self.stack_name))
        self.retire_stale()
        return st

    def retire_stale(self) -> None:
        """Retire every cached stack (but the active one) built for another target or
        interface than the flow's current ones."""
        for name, st in list(self.stacks.items()):
            if st is self.active:
                continue
            b = st.built_for
            target, iface = (b[0], b[1]) if b is not None else (None, None)
            if target != self.target_for(name) or iface != self.interface:
                self._evict(name, st, retire=True)

    def _evict(self, name: str, st: Stack, *, retire: bool) -> None:
        """Take ``st`` out of the cache: close it now, or ``RETIRE_S`` later."""
        if self.stacks.get(name) is st:
            del self.stacks[name]
        if retire:
            if self.retiring is _NO_RETIRING:
                self.retiring = []
            self.retiring.append(st)
            try:
                self.env.loop.call_later(RETIRE_S, self._retire_now, st)
            except RuntimeError:  # the loop is closed
                self._retire_now(st)
        else:
            self._close(st)

    def _retire_now(self, st: Stack) -> None:
        if st in self.retiring:
            self.retiring.remove(st)
            self._close(st)

    def _close(self, st: Stack) -> None:
        """Close a stack that left the cache; its counters stay in the flow's totals."""
        try:
            st.close()
        except Exception:  # a stack's own bug must not stop the flow
            log.exception("closing stack %s of %s", st.name, self.key)
        m = st.metrics
        t = self._closed
        if t is None:
            t = self._closed = [0, 0, 0, 0, 0, 0]
        t[0] += m.packets_out
        t[1] += m.bytes_out
        t[2] += m.packets_in
        t[3] += m.bytes_in
        t[4] += m.drops
        t[5] += m.lost

    def set_drop(self) -> None:
        self.dropping = True
        self.packet_mode = True
        self.send = None
        self.send_many = None

    def set_dscp(self, dscp: int) -> None:
        self.dscp = dscp
        for st in self.stacks.values():
            setter = getattr(st, "set_dscp", None)
            if setter is not None:
                setter(dscp)

    def _stack_error(self, st: Stack | None, err: StackError) -> None:
        self.last_error_fatal = st is not None and bool(getattr(st, "failed", False))
        if st is not None and self.last_error_fatal:
            self._failed(st)
        on_error = self.env.on_error
        if on_error is not None:
            on_error(self, err)

    def _failed(self, st: Stack) -> None:
        """``st`` is gone for good: out of the cache, closed; the flow falls back if it
        was on it."""
        if st in self.retiring:
            self._retire_now(st)
            return
        if self.stacks.get(st.name) is not st:
            return  # not ours any more (already closed or replaced)
        self.failures += 1
        was_active = st is self.active and not self.dropping
        self._evict(st.name, st, retire=False)
        if st is self.active:
            self.active = None
            self.send = None
            self.send_many = None
            self.packet_mode = True
        if not was_active:
            return
        failed, rule = st.name, self.rule
        for name in dict.fromkeys((self.env.fallback, "udp", "raw")):
            if name == failed or not self.can_carry(name):
                continue
            try:
                self.activate(name, self._requested(name), rule="fallback")
            except EngineError as e:
                log.warning("flow %s: fallback to %s failed: %s", self.key, name, e)
                continue
            log.warning("flow %s: stack %s failed; fell back to %s (rule was %s)", self.key,
                        failed, name, rule or "-")
            return
        log.warning("flow %s: stack %s failed and no fallback stack opens: dropping",
                    self.key, failed)
        self.stack_name = ""
        self.set_drop()

    # ------------------------------------------------------------------ per packet (slow path)
    def handle(self, packet: bytes | memoryview, start: int, end: int) -> None:
        """A packet of this flow that did not take the fast path; ``packet[start:end]`` is
        its transport payload."""
        send = self.send
        if send is None:
            self.drops += 1
        elif self.packet_mode:
            send(packet)
        else:
            send(memoryview(packet)[start:end])

    # ------------------------------------------------------------------ counters
    def totals(self) -> tuple[int, int, int, int, int]:
        """(packets out, bytes out, packets in, bytes in, drops) over all its stacks."""
        c = self._closed
        po, bo, pi, bi, dr = (c[0], c[1], c[2], c[3], c[4]) if c is not None else _ZERO5
        for st in chain(self.stacks.values(), self.retiring):
            m = st.metrics
            po += m.packets_out
            bo += m.bytes_out
            pi += m.packets_in
            bi += m.bytes_in
            dr += m.drops
        return po, bo, pi, bi, dr + self.drops

    def activity(self) -> int:
        """Packets out + in + dropped so far: the datapath's idle check (cheaper than
        ``totals``; it runs for every flow at every tick)."""
        c = self._closed
        n = self.drops if c is None else self.drops + c[0] + c[2] + c[4]
        for st in self.stacks.values():
            m = st.metrics
            n += m.packets_out + m.packets_in + m.drops
        for st in self.retiring:
            m = st.metrics
            n += m.packets_out + m.packets_in + m.drops
        return n

    def interval_loss(self, sent_before: int) -> float:
        """Packets detected lost / packets sent since the previous call (0..1), over all
        the flow's stacks; stacks that do not detect loss (UDP) count as sent, not lost.
        ``sent_before``: packets out at the previous call (the caller keeps it, with its
        other counters: the flow keeps one int here, not a tuple)."""
        c = self._closed
        sent, lost = (c[0], c[5]) if c is not None else _ZERO2
        for st in (*self.stacks.values(), *self.retiring):
            refresh = getattr(st, "refresh_metrics", None)
            if refresh is not None:
                refresh()
            sent += st.metrics.packets_out
            lost += st.metrics.lost
        dlost = lost - self._lost_mark
        if dlost == 0:
            return 0.0
        self._lost_mark = lost
        if dlost < 0:
            return 0.0
        return min(1.0, dlost / max(sent - sent_before, 1))

    def rtt_ms(self) -> float:
        return self.active.metrics.rtt_ms if self.active is not None else -1.0

    def close(self) -> None:
        stacks = [*self.stacks.values(), *self.retiring]
        self.stacks = _NO_STACKS
        self.retiring = _NO_RETIRING
        for st in stacks:  # a stack's own bug must not stop the others closing
            self._close(st)
        self.active = None
        self.send = None
        self.send_many = None


def _one_by_one(send: Callable[[Any], None]) -> Callable[[list[memoryview]], None]:
    def send_many(payloads: list[memoryview]) -> None:
        for p in payloads:
            send(p)
    return send_many


def _no_deliver(_payload: bytes) -> None:
    pass


def _fmt(t: tuple[str, int]) -> str:
    return f"[{t[0]}]:{t[1]}" if ":" in t[0] else f"{t[0]}:{t[1]}"

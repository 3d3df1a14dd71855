"""The stack engine: one per flow. It holds the flow's endpoint (UDP flows), asks the NAT
engine for the target of each stack, and is the flow's stack manager.

Stack manager: a stack is built on first use from the registry (``STACKS``), opened, and
cached under (stack name, target, interface); switching the active stack replaces one
reference between two packets (one asyncio loop: nothing runs in between), so no packet
is split across stacks. Stacks that were active before stay open: replies still in flight
on them reach the application, and switching back is instant. A stack that is not ready
yet (a handshake) queues what it is given (its own bounded queue, see ``Stack``), so a
switch to it loses nothing.

Which stacks can carry a flow: a stack whose ``carries`` is ``"payload"`` (the default:
UDP, DCCP, ...) needs the endpoint, so only UDP flows; every flow can use ``raw``
(``carries = "packet"``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from vstack.analysis.flowkey import FlowKey
from vstack.execution.endpoint import Endpoint
from vstack.execution.nat import NatTable
from vstack.execution.stacks.base import STACKS, Stack, StackContext, StackError

log = logging.getLogger("vstack.flow")

UDP = 17


class EngineError(ValueError):
    """A request the engine cannot carry out (unknown stack, stack that cannot carry the
    flow, a stack that failed to open). The flow keeps its current stack."""


def carries_packets(cls: type[Stack]) -> bool:
    return getattr(cls, "carries", "payload") == "packet"


class StackEngine:
    """Endpoint + NAT + stack manager of one flow."""

    def __init__(self, key: FlowKey, *, loop: asyncio.AbstractEventLoop, nat: NatTable,
                 fwmark: int, endpoint: Endpoint | None,
                 stack_options: Callable[[str], Mapping[str, Any]], created: float,
                 on_error: Callable[[StackEngine, StackError], None] | None = None) -> None:
        self.key = key
        self.loop = loop
        self.nat = nat
        self.fwmark = fwmark
        self.endpoint = endpoint
        self._stack_options = stack_options
        self._on_error = on_error
        self.created = created
        self.stacks: dict[tuple[str, tuple[str, int], str | None], Stack] = {}
        self.active: Stack | None = None
        self.stack_name = ""
        self.rule = ""
        self.target_override: tuple[str, int | None] | None = None
        self.interface: str | None = None
        self.dscp: int | None = None
        self.dropping = False
        self.drops = 0  # packets dropped by a drop decision / no stack
        self.packet_mode = True  # the active stack takes whole packets (raw)
        self.send: Callable[[Any], None] = self._drop
        # the fast path hands a batch of equal-size payloads of this flow at once
        self.send_many: Callable[[list[memoryview]], None] = self._drop
        self.switches = 0
        self._closed_totals = [0, 0, 0, 0, 0]  # out pkts/bytes, in pkts/bytes, drops
        # activity snapshot for idle detection and metrics intervals (owned by the datapath)
        self.last_activity = 0
        self.last_metrics: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)

    # ------------------------------------------------------------------ NAT
    def target_for(self, stack: str) -> tuple[str, int]:
        k = self.key
        if self.target_override is not None:
            addr, port = self.target_override
            return addr, k.dport if port is None else port
        if stack == "raw":  # raw packets leave unchanged
            return k.dst, k.dport
        return self.nat.lookup(k.dst, k.dport, stack)

    @property
    def target(self) -> tuple[str, int]:
        return self.active.ctx.target if self.active is not None else self.target_for(
            self.stack_name or "raw")

    # ------------------------------------------------------------------ stack manager
    def can_carry(self, name: str) -> bool:
        cls = STACKS.get(name)
        return cls is not None and (carries_packets(cls) or (
            self.key.proto == UDP and self.endpoint is not None))

    def _get_stack(self, name: str, options: Mapping[str, Any] | None) -> Stack:
        cls = STACKS.get(name)
        if cls is None:
            raise EngineError(f"unknown stack {name!r} (known: {', '.join(sorted(STACKS))})")
        if not self.can_carry(name):
            raise EngineError(f"stack {name!r} cannot carry {self.key.proto_name} flows "
                              "(only UDP flows have an endpoint)")
        target = self.target_for(name)
        ck = (name, target, self.interface)
        st = self.stacks.get(ck)
        if st is not None:
            return st
        opts: dict[str, Any] = dict(self._stack_options(name))
        if options:
            opts.update(options)
        if self.dscp is not None:
            opts.setdefault("dscp", self.dscp)
        ep = self.endpoint
        ctx = StackContext(loop=self.loop, family=self.key.family, target=target,
                           deliver=ep.deliver if ep is not None else _no_deliver,
                           on_error=self._stack_error, fwmark=self.fwmark,
                           interface=self.interface, options=opts,
                           deliver_gso=ep.deliver_gso if ep is not None else None)
        try:
            st = cls(ctx)
            st.open()
        except Exception as e:  # a stack's failure (or bug) must not take the flow down
            raise EngineError(f"stack {name!r} to {_fmt(target)} failed to open: {e}") from e
        self.stacks[ck] = st
        return st

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
        """Rebuild the active stack after a change of target or interface."""
        if not self.stack_name:
            return None
        return self.activate(self.stack_name)

    def set_drop(self) -> None:
        self.dropping = True
        self.packet_mode = True
        self.send = self._drop
        self.send_many = self._drop

    def _drop(self, _pkt: Any) -> None:
        self.drops += 1

    def set_dscp(self, dscp: int) -> None:
        self.dscp = dscp
        for st in self.stacks.values():
            setter = getattr(st, "set_dscp", None)
            if setter is not None:
                setter(dscp)

    def _stack_error(self, err: StackError) -> None:
        if self._on_error is not None:
            self._on_error(self, err)

    # ------------------------------------------------------------------ per packet (slow path)
    def handle(self, packet: bytes | memoryview, start: int, end: int) -> None:
        """A packet of this flow that did not take the fast path; ``packet[start:end]`` is
        its transport payload."""
        if self.packet_mode:
            self.send(packet)
        else:
            self.send(memoryview(packet)[start:end])

    # ------------------------------------------------------------------ counters
    def totals(self) -> tuple[int, int, int, int, int]:
        """(packets out, bytes out, packets in, bytes in, drops) over all its stacks."""
        po, bo, pi, bi, dr = self._closed_totals
        for st in self.stacks.values():
            m = st.metrics
            po += m.packets_out
            bo += m.bytes_out
            pi += m.packets_in
            bi += m.bytes_in
            dr += m.drops
        return po, bo, pi, bi, dr + self.drops

    def rtt_ms(self) -> float:
        return self.active.metrics.rtt_ms if self.active is not None else -1.0

    def close(self) -> None:
        for st in self.stacks.values():
            try:
                st.close()
            except Exception:  # a stack's own bug must not stop the others closing
                log.exception("closing stack %s of %s", st.name, self.key)
        self.stacks.clear()
        self.active = None
        self.send = self._drop
        self.send_many = self._drop


def _one_by_one(send: Callable[[Any], None]) -> Callable[[list[memoryview]], None]:
    def send_many(payloads: list[memoryview]) -> None:
        for p in payloads:
            send(p)
    return send_many


def _no_deliver(_payload: bytes) -> None:
    pass


def _fmt(t: tuple[str, int]) -> str:
    return f"[{t[0]}]:{t[1]}" if ":" in t[0] else f"{t[0]}:{t[1]}"

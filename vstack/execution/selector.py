"""How the decision side talks to the execution side.

``StackSelector`` is asked, synchronously, on the first packet of every flow, *before* that
packet leaves: it returns a ``Decision``. The static selector (``--stack udp`` plus a NAT
map) and the rule engine (``vstack.decision``) both implement it.

``Actuator`` is what the execution engine offers the decision side for later decisions
(timers, measurements, management commands, link events): switch a flow to another stack,
move it to another interface, retarget its NAT, and list the flows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from vstack.analysis.flowkey import FlowKey
from vstack.decision.events import Event


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a flow. ``None`` fields mean "keep what the flow has / the default"."""

    stack: str | None = None
    interface: str | None = None
    target: tuple[str, int | None] | None = None  # NAT retarget: (address, port or None)
    dscp: int | None = None
    drop: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    rule: str | None = None  # the rule that decided ("static" for the static selector)
    rules_version: str | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)  # snapshot the rule saw
    propensity: float = 1.0  # probability the policy picked this stack (exploration)
    explored: bool = False


@dataclass(frozen=True, slots=True)
class FlowInfo:
    """A read-only view of one flow, for the decision engine and ``vstack flows``."""

    key: FlowKey
    stack: str
    interface: str
    target: str
    packets_out: int
    packets_in: int
    bytes_out: int
    bytes_in: int
    rule: str
    created: float
    last_seen: float


class StackSelector(Protocol):
    def decide(self, event: Event, now: float) -> Decision:
        """``event`` is a ``flow.new`` event with the classifier's fields."""
        ...


class Actuator(Protocol):
    def switch(self, flow: FlowKey, stack: str, options: Mapping[str, Any] | None = None,
               *, rule: str | None = None) -> None: ...

    def use_interface(self, flow: FlowKey, ifname: str, *, rule: str | None = None) -> None: ...

    def retarget(self, flow: FlowKey, address: str, port: int | None,
                 *, rule: str | None = None) -> None: ...

    def set_dscp(self, flow: FlowKey, dscp: int) -> None: ...

    def drop(self, flow: FlowKey) -> None: ...

    def flows(self) -> Iterable[FlowInfo]: ...

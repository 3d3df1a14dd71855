"""Events that enter the decision engine, and the schema of their fields.

Every event is one frozen, slotted dataclass: a dotted ``type`` (``flow.new``,
``link.down``, ``mgmt.congestion``, ``timer.switch`` ...), the time it happened (the
caller's ``now``; replay passes the trace's timestamps), the fields, and the flow it is
about, if any. The schema below is what ``vstack rules check`` checks conditions against.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vstack.analysis.flowkey import FlowKey

# Field name -> type name ("str", "int", "float", "bool", "addr").  "addr" is an IP address
# string, which may be tested for membership of a prefix set with ``in``.
FLOW_FIELDS: dict[str, str] = {
    "flow": "str",  # str(FlowKey)
    "proto": "str",  # udp, tcp, icmp, icmp6, dccp, udplite, or the number as text
    "family": "int",  # 4 or 6
    "src": "addr",
    "dst": "addr",
    "sport": "int",
    "dport": "int",
    "dscp": "int",
    "tcp_flags": "str",  # e.g. "S", "SA", "" for non-TCP
    "length": "int",  # IP length of the packet that raised the event (first packet)
    "payload_len": "int",  # transport payload length
    "iface": "str",  # interface the flow leaves on ("" = routing decides)
    "stack": "str",  # current stack ("" before the first decision)
}
METRIC_FIELDS: dict[str, str] = {
    "packets": "int",
    "bytes": "int",
    "rate_bps": "float",  # goodput over the interval, bit/s
    "pps": "float",
    "loss": "float",  # 0..1 over the interval
    "rtt_ms": "float",  # -1 when the stack does not measure it
    "drops": "int",  # packets the stack dropped (queue full) in the interval
    "interval_s": "float",
}

EVENT_SCHEMA: dict[str, dict[str, str]] = {
    "flow.new": dict(FLOW_FIELDS),
    "flow.metrics": {**FLOW_FIELDS, **METRIC_FIELDS},
    "flow.idle": {**FLOW_FIELDS, "idle_s": "float"},
    # a stack of the flow reported an error; fatal: the stack is gone (DCCP peer reset or
    # vanished) and the flow fell back to its default stack (``stack`` is the one it is on
    # now); remote: the peer's doing, not a local failure
    "stack.error": {**FLOW_FIELDS, "failed_stack": "str", "reason": "str", "remote": "bool",
                    "fatal": "bool"},
    "link.up": {"ifname": "str", "index": "int"},
    "link.down": {"ifname": "str", "index": "int"},
    "addr.add": {"ifname": "str", "address": "addr", "prefixlen": "int", "family": "int"},
    "addr.del": {"ifname": "str", "address": "addr", "prefixlen": "int", "family": "int"},
    "route.change": {"action": "str", "dst": "str", "gateway": "str", "ifname": "str"},
}
# mgmt.<type> events carry whatever the authenticated JSON message carried; these are the
# known ones. timer.<name> events carry {"name": str}.
MGMT_SCHEMA: dict[str, dict[str, str]] = {
    "mgmt.congestion": {"link": "str", "level": "float"},
    "mgmt.switch": {"flow": "str", "stack": "str"},
    "mgmt.retarget": {"flow": "str", "target": "str"},
}
TIMER_FIELDS: dict[str, str] = {"name": "str"}


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    time: float
    fields: Mapping[str, Any] = field(default_factory=dict)
    flow: FlowKey | None = None


def schema_for(event_type: str) -> dict[str, str] | None:
    """Known fields of an event type, or None if the type is unknown."""
    if event_type in EVENT_SCHEMA:
        return EVENT_SCHEMA[event_type]
    if event_type in MGMT_SCHEMA:
        return MGMT_SCHEMA[event_type]
    if event_type.startswith("mgmt.") and len(event_type) > 5:
        return {}  # unknown management type: fields are free-form
    if event_type.startswith("timer.") and len(event_type) > 6:
        return dict(TIMER_FIELDS)
    return None

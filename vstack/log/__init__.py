"""The decision log. ``vstack.log.writer`` batches records to SQLAlchemy off the packet path.

The datapath and the decision engine talk to it through ``DecisionSink``; ``NullSink`` is
the default when no database is configured.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from vstack.analysis.flowkey import FlowKey
from vstack.decision.events import Event
from vstack.execution.selector import Decision


class DecisionSink(Protocol):
    def event(self, event: Event) -> None: ...

    def decision(self, flow: FlowKey | None, decision: Decision, now: float) -> None: ...

    def outcome(self, flow: FlowKey, stack: str, now: float,
                metrics: Mapping[str, Any]) -> None: ...

    def flow_seen(self, flow: FlowKey, features: Mapping[str, Any], now: float) -> None: ...

    def close(self) -> None: ...


class NullSink:
    def event(self, event: Event) -> None:
        pass

    def decision(self, flow: FlowKey | None, decision: Decision, now: float) -> None:
        pass

    def outcome(self, flow: FlowKey, stack: str, now: float, metrics: Mapping[str, Any]) -> None:
        pass

    def flow_seen(self, flow: FlowKey, features: Mapping[str, Any], now: float) -> None:
        pass

    def close(self) -> None:
        pass

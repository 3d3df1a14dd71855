"""The static selector: ``[execution] default_stack`` (or ``--stack``) for every UDP flow,
``raw`` for everything else; the NAT map of the configuration picks the target per stack
(the engine's NAT). Implements ``StackSelector``; ``set_default`` changes the choice for
new flows (configuration reload)."""

from __future__ import annotations

from vstack.decision.events import Event
from vstack.execution.selector import Decision


class StaticSelector:
    def __init__(self, default_stack: str = "udp") -> None:
        self.default_stack = default_stack

    def set_default(self, stack: str) -> None:
        self.default_stack = stack

    def decide(self, event: Event, now: float) -> Decision:
        proto = event.fields.get("proto")
        stack = self.default_stack if proto == "udp" else "raw"
        return Decision(stack=stack, rule="static", facts={"proto": proto})

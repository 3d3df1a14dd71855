"""The NAT engine: the flow's virtual destination -> the real target, per stack.

The map comes from ``[nat]`` in the configuration: ``"addr:port"`` (or ``"addr"``, any
port) -> stack name -> target (``"addr:port"``, or ``"addr"`` to keep the port). The most
specific entry wins (address+port, then address); with no entry the target is the virtual
destination itself (identity). A per-flow override (``Actuator.retarget``) beats the map.
"""

from __future__ import annotations

from collections.abc import Mapping

from vstack.config import Target


def _fmt(addr: str, port: int | None = None) -> str:
    a = f"[{addr}]" if ":" in addr else addr
    return a if port is None else f"{a}:{port}"


class NatTable:
    __slots__ = ("_map",)

    def __init__(self, nat: Mapping[str, Mapping[str, Target]] | None = None) -> None:
        self._map: dict[str, dict[str, Target]] = {}
        self.update(nat or {})

    def update(self, nat: Mapping[str, Mapping[str, Target]]) -> None:
        """Replace the map (configuration reload)."""
        self._map = {k: dict(v) for k, v in nat.items()}

    def lookup(self, dst: str, dport: int, stack: str) -> tuple[str, int]:
        """The real target of ``dst:dport`` when carried by ``stack``."""
        for key in (_fmt(dst, dport), _fmt(dst)):
            per_stack = self._map.get(key)
            if per_stack is not None:
                t = per_stack.get(stack)
                if t is not None:
                    return t.address, dport if t.port is None else t.port
        return dst, dport

    def entries(self) -> dict[str, dict[str, str]]:
        return {k: {s: str(t) for s, t in v.items()} for k, v in self._map.items()}

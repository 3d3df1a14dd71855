"""The stack interface. A stack carries one flow's payloads to its target and hands the
replies back. The stack engine never needs to know which stack it drives: new stacks
(DCCP, TCP-framed, UDP-Lite, MPTCP) register themselves with ``@register_stack``.

A stack is built once per flow by the stack manager, on first use, and cached. ``send`` is
the hot path: it must not block and should not allocate more than it must. A stack that is
not ready yet (a DCCP handshake in progress) queues up to a bound and counts what it drops.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class StackError:
    """Reported by a stack to its engine: the peer vanished, a reset, a socket error."""

    stack: str
    reason: str
    remote: bool  # True: the peer's doing (reset, unreachable); False: a local failure


@dataclass(slots=True)
class StackMetrics:
    packets_out: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    bytes_in: int = 0
    drops: int = 0  # dropped by the stack (queue full, not ready)
    lost: int = 0  # detected lost on the wire (stacks that know, e.g. DCCP CCID2)
    rtt_ms: float = -1.0  # -1: not measured by this stack


@dataclass(slots=True)
class StackContext:
    """What the stack engine gives a stack."""

    loop: asyncio.AbstractEventLoop
    family: int  # 4 or 6
    target: tuple[str, int]  # NAT-mapped target (address, port)
    deliver: Callable[[bytes], None]  # a reply payload -> the application (endpoint builds it)
    on_error: Callable[[StackError], None]
    fwmark: int = 0  # SO_MARK for egress sockets, so they bypass the VNIC
    interface: str | None = None  # SO_BINDTODEVICE when set
    options: dict[str, Any] = field(default_factory=dict)
    # a coalesced reply (UDP_GRO: ``buf`` holds datagrams of ``seg`` bytes, the last may be
    # shorter) -> the application; the endpoint writes one GSO super-packet into the TUN
    # where the VNIC offloads, else delivers them one by one. None: deliver each.
    deliver_gso: Callable[[bytes, int], None] | None = None


class Stack(abc.ABC):
    name: ClassVar[str]

    def __init__(self, ctx: StackContext) -> None:
        self.ctx = ctx
        self.metrics = StackMetrics()

    @abc.abstractmethod
    def open(self) -> None:
        """Start: create sockets, begin a handshake. Must not block."""

    @property
    def ready(self) -> bool:
        return True

    @abc.abstractmethod
    def send(self, payload: bytes) -> None:
        """Carry one application payload to the target (hot path)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything; idempotent."""

    def retarget(self, target: tuple[str, int]) -> None:
        """Default: close and let the engine rebuild. Stacks that can retarget in place
        (UDP) override this."""
        raise NotImplementedError


STACKS: dict[str, type[Stack]] = {}


def register_stack(cls: type[Stack]) -> type[Stack]:
    STACKS[cls.name] = cls
    return cls

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
import contextlib
import logging
import select
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

log = logging.getLogger("vstack.stacks")


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
    # "payload": the stack carries the UDP payload (needs the flow's endpoint);
    # "packet": whole IP packets (raw). Declared here so that looking it up is cheap.
    carries: ClassVar[str] = "payload"
    # one per flow and stack: no instance dict where a subclass declares slots too
    # (UdpStack); ``built_for`` is the stack engine's note of what it was built for
    __slots__ = ("__weakref__", "built_for", "ctx", "metrics")

    def __init__(self, ctx: StackContext) -> None:
        self.ctx = ctx
        self.metrics = StackMetrics()
        self.built_for: Any = None

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


class Readable(Protocol):
    """What :class:`ReaderMux` calls: ``on_readable()`` when the registered fd is readable
    (or has an error pending)."""

    def on_readable(self) -> None: ...


class ReaderMux:
    """Many sockets' readability through one ``epoll`` on one loop (issue 6, flow scale).

    ``loop.add_reader`` per socket costs a ``Handle``, a ``contextvars`` copy, a
    ``SelectorKey`` and selector map entries per flow (~350 bytes and ~10 us of Python);
    here a flow costs one epoll registration and one dict entry ``fd -> object``, and the
    loop watches one fd, the mux's epoll. When it is readable, ``_ready`` asks the epoll
    which sockets are (``poll(0)``, level-triggered) and calls each one's
    ``on_readable()``; a socket that leaves data behind (its own per-wakeup bound) is
    reported again on the next round of the loop, as with ``add_reader``. The price: one
    ``epoll_wait`` more per wakeup of the reply path.

    ``ReaderMux.of(loop)`` gives the loop's mux (made on first use; it unregisters and
    closes its epoll when its last socket leaves).
    """

    __slots__ = ("__weakref__", "_ep", "_handlers", "_loop", "errors", "wakeups")
    _muxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ReaderMux] = (
        weakref.WeakKeyDictionary())
    MAX_EVENTS = 256

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ep: select.epoll | None = None
        self._handlers: dict[int, Readable] = {}
        self.wakeups = 0
        self.errors = 0

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> ReaderMux:
        mux = cls._muxes.get(loop)
        if mux is None:
            mux = cls._muxes[loop] = cls(loop)
        return mux

    def __len__(self) -> int:
        return len(self._handlers)

    def add(self, fd: int, handler: Readable) -> None:
        """Call ``handler.on_readable()`` whenever ``fd`` is readable (until ``remove``)."""
        ep = self._ep
        if ep is None:
            ep = select.epoll()
            try:
                self._loop.add_reader(ep.fileno(), self._ready)
            except BaseException:  # e.g. a closed loop: nobody would watch this epoll
                ep.close()
                raise
            self._ep = ep
        ep.register(fd, select.EPOLLIN)
        self._handlers[fd] = handler

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed); idempotent."""
        if self._handlers.pop(fd, None) is None:
            return
        ep = self._ep
        if ep is None:
            return
        with contextlib.suppress(OSError, ValueError):
            ep.unregister(fd)
        if not self._handlers:  # the last one: give the loop its fd back
            self._ep = None
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                self._loop.remove_reader(ep.fileno())
            ep.close()
            if ReaderMux._muxes.get(self._loop) is self:  # the mux holds its loop strongly
                del ReaderMux._muxes[self._loop]

    def _ready(self) -> None:
        ep = self._ep
        if ep is None:
            return
        self.wakeups += 1
        handlers = self._handlers
        for fd, _ev in ep.poll(0, self.MAX_EVENTS):
            h = handlers.get(fd)
            if h is None:
                continue
            try:
                h.on_readable()
            except Exception:  # one flow's bug must not starve the others' replies
                self.errors += 1
                log.exception("reader for fd %d failed", fd)

"""The management UDP port: a thin asyncio adapter around ``Verifier``.

Every datagram goes through the verifier with the wall clock as ``now``; an accepted one
is handed to ``submit`` (the decision engine), a rejected one is counted, logged (one
line per rejection, rate-limited), and never acted on. No reply is sent either way, so
the port gives an attacker nothing to measure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from vstack.decision.events import Event
from vstack.management.auth import Accepted, Verifier

log = logging.getLogger("vstack.management")


class RateLimiter:
    """At most ``burst`` log lines per ``interval_s``; counts what it suppressed (sans-IO:
    ``now`` is passed in)."""

    def __init__(self, burst: int = 10, interval_s: float = 10.0) -> None:
        self.burst = burst
        self.interval_s = interval_s
        self._window_start = -float("inf")
        self._used = 0
        self.suppressed = 0  # in the current window, not yet reported

    def allow(self, now: float) -> tuple[bool, int]:
        """(may log now, how many lines were suppressed since the last allowed one)."""
        if now - self._window_start >= self.interval_s:
            self._window_start = now
            self._used = 0
        if self._used < self.burst:
            self._used += 1
            dropped, self.suppressed = self.suppressed, 0
            return True, dropped
        self.suppressed += 1
        return False, 0


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: ManagementServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server.handle(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.warning("management socket error: %s", exc)


def parse_listen(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[V6]:PORT"`` (the config's ``management.listen``)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT or [ADDR]:PORT, not {text!r}")
    return host.strip("[]"), int(port)


class ManagementServer:
    """``ManagementServer(loop, ("0.0.0.0", 7400), verifier, engine_submit)``;
    ``await server.start()``; ``server.close()``.

    ``submit`` is called on the loop with each accepted ``Event``; an exception from it is
    logged and counted (``submit_errors``), and the port keeps serving."""

    def __init__(self, loop: asyncio.AbstractEventLoop, bind: tuple[str, int],
                 verifier: Verifier, submit: Callable[[Event], None], *,
                 clock: Callable[[], float] = time.time,
                 log_burst: int = 10, log_interval_s: float = 10.0) -> None:
        self.loop = loop
        self.bind = bind
        self.verifier = verifier
        self.submit = submit
        self.clock = clock
        self.limiter = RateLimiter(log_burst, log_interval_s)
        self.submit_errors = 0
        self._transport: asyncio.DatagramTransport | None = None

    @classmethod
    def from_config(cls, loop: asyncio.AbstractEventLoop, cfg: Any,
                    submit: Callable[[Event], None]) -> ManagementServer | None:
        """From ``Config.management`` (``listen``, ``key``, ``max_skew_s``); None when
        ``listen`` is empty (the interface is off). Raises ValueError on a bad listen
        address or an empty key."""
        if not cfg.listen:
            return None
        if not cfg.key:
            raise ValueError("management.key: empty; the management interface needs a "
                             "shared key")
        return cls(loop, parse_listen(cfg.listen),
                   Verifier(cfg.key, max_skew_s=cfg.max_skew_s), submit)

    async def start(self) -> None:
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=self.bind)
        self._transport = transport
        log.info("management interface listening on %s", self.address)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); useful with port 0."""
        if self._transport is None:
            raise RuntimeError("management server not started")
        sockname = self._transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    @property
    def counters(self) -> dict[str, int]:
        return {**self.verifier.counters, "submit_errors": self.submit_errors}

    def handle(self, data: bytes, addr: Any) -> None:
        verdict = self.verifier.verify(data, self.clock())
        if isinstance(verdict, Accepted):
            log.debug("management %s from %s accepted", verdict.event.type, addr)
            try:
                self.submit(verdict.event)
            except Exception:
                self.submit_errors += 1
                log.exception("management event %s: submit failed", verdict.event.type)
            return
        ok, suppressed = self.limiter.allow(self.loop.time())
        if ok:
            more = f" ({suppressed} more rejections not logged)" if suppressed else ""
            log.warning("management message from %s rejected: %s: %s%s",
                        _peer(addr), verdict.reason, verdict.detail, more)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


def _peer(addr: Any) -> str:
    try:
        host, port = addr[0], addr[1]
    except (TypeError, IndexError):
        return str(addr)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

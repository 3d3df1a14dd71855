"""The DCCP stack: an application's UDP payloads travel as DCCP-Data (CCID2) to the flow's
NAT-mapped DCCP target; payloads that come back are handed to the application as UDP.

Built by the stack manager on first use (``open`` starts the handshake and returns at
once), cached and reused, so a later switch back to DCCP costs nothing. While the handshake
runs, ``send`` queues up to ``queue`` payloads (``ctx.options["queue"]``, default 1024) and
counts the rest as drops; the queue is flushed into the connection at HandshakeComplete. A
full CCID2 window is the connection's business (it queues up to its own bound and refuses
beyond it, which this stack counts as drops too).

Options (``ctx.options``): ``service_code`` (default 0x44434350, "DCCP"), ``transport``
("raw": IP protocol 33, "udp": DCCP-UDP, RFC 6773), ``udp_port`` (DCCP-UDP: the UDP port
the target listens on, default the same number as its DCCP port; the target's port stays
the DCCP port inside the encapsulation, and each stack has its own UDP source port),
``queue``, ``conn`` (extra keyword arguments for the connection; its
``sequence_window`` defaults to the endpoint's 1000, not RFC 4340's 100:
:data:`~vstack.dccp.endpoint.ENDPOINT_SEQUENCE_WINDOW`, since CCID2's cwnd is capped at W/5).

``open`` raises (``TransportError``/``OSError``/``ValueError``) when the connection cannot
even start (no socket, bad options): the engine turns that into ``EngineError`` and the flow
keeps, or falls back to, another stack. Once open, the peer vanishing (timeout) or
resetting reaches the engine as ``ctx.on_error(StackError)`` (``remote=True``); a protocol
error as ``remote=False``. Either failure is terminal (``failed`` is true): the engine
drops the stack from its cache, and a later use builds a fresh one (a new handshake).

``close`` sends Close and frees the socket when the peer's Reset(Closed) arrives, or after
``LINGER_S``, or when the loop shuts down (``asyncio.run`` cancels the lingering task),
whichever comes first; a connection that is not open is freed at once. ``metrics.rtt_ms`` and
``metrics.lost`` come from the connection's CCID2 sender (pulled every 0.5 s and at every
connection event).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from vstack.dccp import connection as dc
from vstack.dccp.endpoint import DEFAULT_SERVICE, DccpClient
from vstack.execution.stacks.base import Stack, StackError, register_stack

DEFAULT_QUEUE = 1024
METRICS_INTERVAL = 0.5  # seconds between pulls of RTT and loss from CCID2
LINGER_S = 2.0  # after Close: free the socket at the peer's Reset, or after this long
_lingering: set[asyncio.Task[None]] = set()  # strong references to the release tasks
log = logging.getLogger("vstack.dccp")


@register_stack
class DccpStack(Stack):
    name = "dccp"

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        opts = ctx.options or {}
        self.service_code = int(opts.get("service_code", DEFAULT_SERVICE))
        self.transport = str(opts.get("transport", "raw"))
        self.udp_port = int(opts.get("udp_port", 0) or 0)
        self.queue_max = int(opts.get("queue", DEFAULT_QUEUE))
        self.conn_options: dict[str, Any] = dict(opts.get("conn", {}))
        self._queue: collections.deque[bytes] = collections.deque()
        self.client: DccpClient | None = None
        self._failed = False
        self._closed = False
        self.handshake_started: float | None = None
        self.handshake_done: float | None = None
        self._metrics_timer: Any = None

    # ------------------------------------------------------------------ Stack API
    def open(self) -> None:
        if self.client is not None or self._closed:
            return
        host, port = self.ctx.target  # the DCCP port, also with DCCP-UDP (RFC 6773 §3.2)
        client = DccpClient(
            (host, port), transport=self.transport, service_code=self.service_code,
            fwmark=self.ctx.fwmark, device=self.ctx.interface,
            on_datagram=self._deliver, on_event=self._event, loop=self.ctx.loop,
            conn_options=self.conn_options,
            udp_port=self.udp_port)  # raises: nothing of it stays open
        self.client = client
        try:
            self.handshake_started = self.ctx.loop.time()
            client.connect()
        except BaseException:
            self.client = None
            client.release()
            raise
        self._metrics_timer = self.ctx.loop.call_later(METRICS_INTERVAL, self._metrics_tick)

    @property
    def failed(self) -> bool:
        """The connection is gone for good (peer reset or vanished, protocol error)."""
        return self._failed

    @property
    def ready(self) -> bool:
        return self.client is not None and self.client.is_open

    def send(self, payload: bytes) -> None:
        c = self.client
        if c is None or self._failed or self._closed:
            self.metrics.drops += 1
            return
        if not c.is_open or self._queue:
            if len(self._queue) >= self.queue_max:
                self.metrics.drops += 1
                return
            self._queue.append(bytes(payload))  # the fast path hands memoryviews
            return
        self._send_now(c, payload)

    def send_many(self, payloads: list[Any]) -> None:
        """A batch from the fast path (a run of equal-size datagrams, or a USO super-packet
        split in user space, issue 6). Once the connection refuses one that fits its MPS
        (its queue is full: nothing drains it before this batch is done), the rest are
        counted as drops without asking again, so an overload costs one refusal per
        batch instead of one per datagram (per-datagram refusals starved the connection's
        own ack processing: 712 datagrams/s under a GSO sender, docs/speed.md)."""
        c = self.client
        if c is None or self._failed or self._closed or not c.is_open or self._queue:
            for p in payloads:
                self.send(p)
            return
        m = self.metrics
        mps = c.conn.config.mps
        n = len(payloads)
        i = 0
        while i < n:
            rest = payloads if i == 0 else payloads[i:]
            k = c.send_many(rest)  # one call for the run (issue 6)
            if k:
                m.packets_out += k
                m.bytes_out += sum(map(len, rest[:k])) if k < len(rest) else sum(map(len, rest))
                i += k
            if i >= n:
                return
            if len(payloads[i]) <= mps:  # the queue is full
                m.drops += n - i
                return
            m.drops += 1  # larger than the MPS: refused alone
            i += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._stop_metrics()
        c = self.client
        if c is None:
            return
        loop = self.ctx.loop
        if not c.is_open or self._failed or loop.is_closed() or not loop.is_running():
            c.release()
            return
        try:
            c.close()  # Close -> the peer's Reset(Closed); then free the socket
        except Exception:
            c.release()
            return
        task = loop.create_task(_release_after_close(c))
        _lingering.add(task)
        task.add_done_callback(_lingering.discard)

    # ---------------------------------------------------------------- internals
    def _send_now(self, c: DccpClient, payload: bytes) -> None:
        if c.send(payload):
            self.metrics.packets_out += 1
            self.metrics.bytes_out += len(payload)
        else:
            self.metrics.drops += 1

    def _deliver(self, data: bytes) -> None:
        self.metrics.packets_in += 1
        self.metrics.bytes_in += len(data)
        self.ctx.deliver(data)

    def _event(self, ev: Any) -> None:
        if isinstance(ev, dc.HandshakeComplete):
            self.handshake_done = self.ctx.loop.time()
            log.info("dccp to %s:%d open (CCID %d) after %.1f ms, %d queued payloads",
                     self.ctx.target[0], self.ctx.target[1], ev.ccid,
                     (self.handshake_done - (self.handshake_started or 0.0)) * 1000,
                     len(self._queue))
            c = self.client
            while self._queue and c is not None:
                self._send_now(c, self._queue.popleft())
        elif isinstance(ev, dc.ResetReceived):
            if not (self._closed and ev.code == 1):  # Reset(Closed) ends our own Close
                self._fail(f"peer reset the connection (code {ev.code})", remote=True)
        elif isinstance(ev, dc.PeerTimeout):
            self._fail(f"peer vanished: {ev.reason}", remote=True)
        elif isinstance(ev, dc.ProtocolError):
            self._fail(f"protocol error, we reset: {ev.reason}", remote=False)
        elif isinstance(ev, dc.ConnectionClosed) and not self._closed:
            self._fail("connection closed by the peer", remote=True)
        self._update_metrics()

    def _update_metrics(self) -> None:
        c = self.client
        if c is None:
            return
        rtt = c.conn.rtt_ms
        if rtt is not None:
            self.metrics.rtt_ms = float(rtt)
        self.metrics.lost = int(c.conn.loss)

    def _metrics_tick(self) -> None:
        self._metrics_timer = None
        if self._closed or self._failed:
            return
        self._update_metrics()
        self._metrics_timer = self.ctx.loop.call_later(METRICS_INTERVAL, self._metrics_tick)

    def _stop_metrics(self) -> None:
        if self._metrics_timer is not None:
            self._metrics_timer.cancel()
            self._metrics_timer = None

    def refresh_metrics(self) -> None:
        """Pull RTT and loss from CCID2 now (the engine calls this before reading metrics)."""
        self._update_metrics()

    def _fail(self, reason: str, remote: bool) -> None:
        if self._failed:
            return
        self._failed = True
        self._queue.clear()
        self._update_metrics()
        self._stop_metrics()
        if self.client is not None:
            self.client.release()
        self.ctx.on_error(StackError(self.name, reason, remote))


async def _release_after_close(c: DccpClient) -> None:
    """Free ``c`` once the peer answered our Close (ConnectionClosed), after ``LINGER_S``,
    or when the loop shuts down and cancels this task, whichever comes first."""
    try:
        await c.wait_closed(LINGER_S)
    except (TimeoutError, ConnectionError):
        pass
    finally:
        c.release()


def lingering() -> int:
    """How many closed DCCP stacks still wait for the peer's Reset (tests, stats)."""
    return len(_lingering)

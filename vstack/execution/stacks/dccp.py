"""The DCCP stack: an application's UDP payloads travel as DCCP-Data (CCID2) to the flow's
NAT-mapped DCCP target; payloads that come back are handed to the application as UDP.

Built by the stack manager on first use (``open`` starts the handshake and returns at
once), cached and reused, so a later switch back to DCCP costs nothing. While the handshake
runs, ``send`` queues up to ``queue`` payloads (``ctx.options["queue"]``, default 1024) and
counts the rest as drops; the queue is flushed into the connection at HandshakeComplete. A
full CCID2 window is the connection's business (it queues up to its own bound and refuses
beyond it, which this stack counts as drops too).

Options (``ctx.options``): ``service_code`` (default 0x44434350, "DCCP"), ``transport``
("raw": IP protocol 33, "udp": DCCP-UDP, RFC 6773), ``udp_port`` (DCCP-UDP server port;
default the target's port), ``queue``, ``conn`` (extra keyword arguments for the
connection).

The peer vanishing (timeout) or resetting reaches the engine as ``ctx.on_error(StackError)``
(``remote=True``); a local socket failure as ``remote=False``. ``metrics.rtt_ms`` and
``metrics.lost`` come from the connection's CCID2 sender (pulled every 0.5 s and at every
connection event).
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from vstack.dccp import connection as dc
from vstack.dccp.endpoint import DEFAULT_SERVICE, DccpClient
from vstack.dccp.transport import TransportError
from vstack.execution.stacks.base import Stack, StackError, register_stack

DEFAULT_QUEUE = 1024
METRICS_INTERVAL = 0.5  # seconds between pulls of RTT and loss from CCID2
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
        host, port = self.ctx.target
        if self.transport == "udp" and self.udp_port:
            port = self.udp_port
        try:
            self.client = DccpClient(
                (host, port), transport=self.transport, service_code=self.service_code,
                fwmark=self.ctx.fwmark, device=self.ctx.interface,
                on_datagram=self._deliver, on_event=self._event, loop=self.ctx.loop,
                conn_options=self.conn_options)
            self.handshake_started = self.ctx.loop.time()
            self.client.connect()
            self._metrics_timer = self.ctx.loop.call_later(METRICS_INTERVAL, self._metrics_tick)
        except (TransportError, OSError, ValueError) as e:
            self._fail(f"cannot open DCCP to {host}:{port}: {e}", remote=False)

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

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._stop_metrics()
        c = self.client
        if c is None:
            return
        if c.is_open:
            try:
                c.close()  # Close -> the peer's Reset(Closed); then free the socket
            except Exception:
                c.release()
                return
            self.ctx.loop.call_later(2.0, c.release)
        else:
            c.release()

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

"""``TraceRecorder``: ``vstack run --record FILE`` writes packet headers and events as JSONL.

One JSON object per line (format in ``docs/log.md``)::

    {"kind":"header","format":"vstack-trace","version":1,"started":1764370000.5,
     "host":"edge1","snaplen":128,"meta":{...}}
    {"kind":"packet","t":1764370000.51,"dir":"app->net","len":1228,"data":"RQAEzA..."}
    {"kind":"event","t":1764370001.5,"type":"flow.metrics",
     "flow":"udp:10.0.0.1:5000->10.201.1.2:9000","fields":{"packets":12,...}}

``data`` is base64 of the first ``snaplen`` bytes of the raw IP packet (headers, payload
cut off); ``len`` is the packet's full length. ``dir`` is ``app->net`` (read from the TUN)
or ``net->app`` (a reply towards the application), as in
``vstack.analysis.classifier.Direction``.

The recorder is called on the packet path. It only formats a short line into a buffered
file object (the OS does the writing); it never raises: an I/O error (disk full) stops the
recording, is kept in ``error`` and counted in ``errors``.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import io
import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from vstack.analysis.flowkey import FlowKey
from vstack.decision.events import Event
from vstack.execution.selector import Decision
from vstack.log import DecisionSink, NullSink
from vstack.log.writer import jsonable

TRACE_FORMAT = "vstack-trace"
TRACE_VERSION = 1
DEFAULT_SNAPLEN = 128
DIRECTIONS = ("app->net", "net->app")


def _direction(direction: object) -> str:
    if isinstance(direction, enum.Enum):
        direction = direction.value
    text = str(direction)
    if text in DIRECTIONS:
        return text
    if text in ("out", "tx", "app_to_net", "APP_TO_NET"):
        return "app->net"
    if text in ("in", "rx", "net_to_app", "NET_TO_APP"):
        return "net->app"
    raise ValueError(f"unknown packet direction {direction!r} (app->net or net->app)")


class TraceRecorder:
    """Writes a JSONL trace to ``path`` (``-`` is not supported: the file is binary-safe
    text, opened here and closed by ``close``)."""

    def __init__(self, path: str | os.PathLike[str], *, snaplen: int = DEFAULT_SNAPLEN,
                 meta: Mapping[str, Any] | None = None, started: float | None = None) -> None:
        if snaplen < 20:
            raise ValueError("snaplen must be at least 20 bytes (an IPv4 header)")
        self.path = os.fspath(path)
        self.snaplen = snaplen
        self.packets = 0
        self.events = 0
        self.errors = 0
        self.error: str | None = None
        self._last_event: Event | None = None
        self._f: io.TextIOWrapper | None = open(  # noqa: SIM115 - closed by close()
            self.path, "w", encoding="utf-8", buffering=1 << 16)
        self._write({"kind": "header", "format": TRACE_FORMAT, "version": TRACE_VERSION,
                     "started": time.time() if started is None else started,
                     "host": socket.gethostname(), "snaplen": snaplen,
                     "meta": jsonable(meta or {})})

    def _write(self, obj: Mapping[str, Any]) -> None:
        f = self._f
        if f is None:
            self.errors += 1
            return
        try:
            f.write(json.dumps(obj, separators=(",", ":")))
            f.write("\n")
        except (OSError, ValueError) as e:
            self.errors += 1
            self.error = str(e)
            self._f = None
            with contextlib.suppress(OSError):
                f.close()

    def packet(self, buf: bytes | bytearray | memoryview, now: float,
               direction: object = "app->net") -> None:
        """Record the first ``snaplen`` bytes of one raw IP packet."""
        head = bytes(buf[: self.snaplen])
        self.packets += 1
        self._write({"kind": "packet", "t": now, "dir": _direction(direction), "len": len(buf),
                     "data": base64.b64encode(head).decode("ascii")})

    def event(self, event: Event) -> None:
        """Record one event that entered the decision engine (the same object twice in a
        row, as the datapath and the engine both pass flow.new, is recorded once)."""
        if event is self._last_event:
            return
        self._last_event = event
        self.events += 1
        self._write({"kind": "event", "t": event.time, "type": event.type,
                     "flow": None if event.flow is None else str(event.flow),
                     "fields": jsonable(event.fields)})

    def flush(self) -> None:
        if self._f is not None:
            try:
                self._f.flush()
            except OSError as e:
                self.errors += 1
                self.error = str(e)

    def stats(self) -> dict[str, Any]:
        return {"path": self.path, "packets": self.packets, "events": self.events,
                "errors": self.errors, "error": self.error}

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError as e:
                self.errors += 1
                self.error = str(e)

    def __enter__(self) -> TraceRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordingSink:
    """A ``DecisionSink`` that records every event to a ``TraceRecorder`` and passes
    everything on to ``inner`` (a ``LogWriter`` or ``NullSink``): hand it to the engine and
    the datapath, and call ``recorder.packet`` on the packet path."""

    def __init__(self, recorder: TraceRecorder, inner: DecisionSink | None = None) -> None:
        self.recorder = recorder
        self.inner: DecisionSink = inner if inner is not None else NullSink()

    def event(self, event: Event) -> None:
        self.recorder.event(event)
        self.inner.event(event)

    def decision(self, flow: FlowKey | None, decision: Decision, now: float) -> None:
        self.inner.decision(flow, decision, now)

    def outcome(self, flow: FlowKey, stack: str, now: float, metrics: Mapping[str, Any]) -> None:
        self.inner.outcome(flow, stack, now, metrics)

    def flow_seen(self, flow: FlowKey, features: Mapping[str, Any], now: float) -> None:
        self.inner.flow_seen(flow, features, now)

    @property
    def dropped(self) -> int:
        """The inner writer's dropped-record count (0 without a writer)."""
        return int(getattr(self.inner, "dropped", 0))

    def stats(self) -> dict[str, Any]:
        """The inner writer's ``stats()`` (if any) plus ``record``: the recorder's."""
        inner = getattr(self.inner, "stats", None)
        base: dict[str, Any] = dict(inner()) if callable(inner) else {}
        return {**base, "record": self.recorder.stats()}

    def close(self) -> None:
        self.recorder.close()
        self.inner.close()


def open_sink(db_url: str, run_info: Any = None, record: str = "",
              **writer_kwargs: Any) -> DecisionSink:
    """The daemon's sink from ``[log]``: ``db_url`` "" = no database (``NullSink``), else a
    ``LogWriter`` (raises ``db.DatabaseError`` at start); ``record`` "" = no trace, else a
    ``RecordingSink`` around it (its ``recorder`` takes the packets)."""
    from vstack.log.writer import LogWriter

    sink: DecisionSink = LogWriter(db_url, run_info, **writer_kwargs) if db_url else NullSink()
    if record:
        try:
            rec = TraceRecorder(record)
        except BaseException:
            sink.close()
            raise
        return RecordingSink(rec, sink)
    return sink


__all__ = ["DEFAULT_SNAPLEN", "DIRECTIONS", "TRACE_FORMAT", "TRACE_VERSION", "RecordingSink",
           "TraceRecorder", "open_sink"]

"""The local control socket between the daemon and the CLI (``vstack flows`` ...).

Protocol: a unix stream socket (default ``/run/vstack/control.sock``, mode 0600), JSON
lines. Each request is one line::

    {"id": 1, "method": "flows", "params": {}}

and gets one response line with the same ``id``::

    {"id": 1, "ok": true, "result": ...}
    {"id": 1, "ok": false, "error": {"type": "KeyError", "message": "no such flow"}}

A connection may carry any number of requests, answered in order. The daemon registers
one handler per method (``flows``, ``why``, ``switch``, ``rules_reload``, ``stats``); a
handler takes the ``params`` dict and returns something JSON-able (dataclasses such as
``FlowInfo`` and ``FlowKey`` are converted by ``to_jsonable``), or an awaitable of it.
An exception in a handler becomes an error response; the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import json
import logging
import math
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from vstack.analysis.flowkey import FlowKey
from vstack.execution.selector import Actuator, FlowInfo

log = logging.getLogger("vstack.control")

DEFAULT_SOCKET = "/run/vstack/control.sock"
SOCKET_ENV = "VSTACK_CONTROL_SOCKET"
MAX_LINE = 1 << 20  # one request or response line

Handler = Callable[[dict[str, Any]], Any]


def default_socket_path() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class ControlError(Exception):
    """The daemon answered with an error (or could not be asked)."""

    def __init__(self, message: str, kind: str = "ControlError") -> None:
        super().__init__(message)
        self.kind = kind


class DaemonNotRunning(ControlError):
    pass


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values for what handlers return: ``FlowKey`` as its string, dataclasses
    as dicts of their fields, mappings, sequences and sets as dicts and lists, non-finite
    floats as null."""
    if isinstance(obj, FlowKey):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.hex()
    return str(obj)


def flowinfo_to_dict(info: FlowInfo) -> dict[str, Any]:
    d: dict[str, Any] = to_jsonable(info)
    d["flow"] = d.pop("key")
    return d


FLOWS_LIMIT = 10_000  # flows in one ``flows`` answer unless ``limit`` asks otherwise


def flows_limit(params: Mapping[str, Any]) -> int:
    """The ``limit`` of a ``flows`` request (default ``FLOWS_LIMIT``)."""
    limit = params.get("limit", FLOWS_LIMIT)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError("flows 'limit' must be an integer >= 0")
    return limit


def flows_result(flows: Iterable[FlowInfo], log_dropped: int | None = None,
                 limit: int | None = None, total: int | None = None) -> dict[str, Any]:
    """What the daemon's ``flows`` handler should return: at most ``limit`` flows (only
    those are encoded), ``total`` (how many there are; default: len of ``flows``),
    ``truncated`` when some were left out, and the decision-log writer's dropped-record
    count when there is a writer."""
    fl = flows if isinstance(flows, list) else list(flows)
    shown = fl if limit is None or len(fl) <= limit else fl[:limit]
    n = len(fl) if total is None else total
    out: dict[str, Any] = {"flows": [flowinfo_to_dict(f) for f in shown], "total": n}
    if len(shown) < n:
        out["truncated"] = True
    if log_dropped is not None:
        out["log_dropped"] = log_dropped
    return out


def actuator_handlers(actuator: Actuator,
                      log_dropped: Callable[[], int | None] | None = None) -> dict[str, Handler]:
    """The ``flows`` and ``switch`` handlers over the execution engine's ``Actuator``
    (the daemon adds ``why``, ``rules_reload`` and ``stats``, which other parts own).
    ``flows`` takes ``limit`` (default ``FLOWS_LIMIT``): a daemon with 10^6 flows answers
    with the first ``limit`` and the ``total``, never one huge line. ``switch`` is
    attributed to the rule ``"cli"`` in the decision log."""

    def flows(params: dict[str, Any]) -> Any:
        limit = flows_limit(params)
        dropped = log_dropped() if log_dropped else None
        table: Any = getattr(actuator, "table", None)
        info = getattr(actuator, "flow_info", None)
        if callable(info) and hasattr(table, "__len__") and hasattr(table, "__iter__"):
            # the datapath's flow table: build only the first ``limit`` flows' views, not
            # all of them (10^6 flows: O(limit) work on the loop, not O(flows))
            keys = itertools.islice(iter(table), limit)
            shown = [f for f in map(info, keys) if f is not None]
            return flows_result(shown, dropped, limit, total=len(table))
        return flows_result(actuator.flows(), dropped, limit)

    def switch(params: dict[str, Any]) -> Any:
        flow, stack = params.get("flow"), params.get("stack")
        if not isinstance(flow, str) or not isinstance(stack, str) or not stack:
            raise ValueError("switch needs 'flow' (a flow key) and 'stack' (a stack name)")
        key = FlowKey.parse(flow)
        actuator.switch(key, stack, rule="cli")
        return {"flow": str(key), "stack": stack}

    return {"flows": flows, "switch": switch}


def _encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


class ControlServer:
    """``ControlServer(path, {"flows": h, ...})``; ``await start()``; ``await close()``
    (also an async context manager). ``start`` refuses to take over a socket another live
    process answers on, and replaces a stale one."""

    def __init__(self, path: str, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers: dict[str, Handler] = dict(handlers)
        self.requests = 0
        self.errors = 0
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def register(self, method: str, handler: Handler) -> None:
        self.handlers[method] = handler

    async def start(self) -> None:
        parent = os.path.dirname(self.path) or "."
        os.makedirs(parent, mode=0o755, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)  # the socket file is born 0600: no window for others
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            sock.listen(16)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                           limit=MAX_LINE)
        except BaseException:
            sock.close()
            raise
        self._inode = os.stat(self.path).st_ino
        log.info("control socket listening on %s", self.path)

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{self.path} exists and is not a socket; not touching it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.path)  # stale: left by a daemon that died
            return
        finally:
            probe.close()
        raise OSError(f"another vstack daemon is answering on {self.path}")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._inode = None

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(_encode(_error(None, "ValueError",
                                                f"request longer than {MAX_LINE} bytes")))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                writer.write(await self.dispatch(line))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def dispatch(self, line: bytes) -> bytes:
        """One request line -> one response line (also usable without a socket)."""
        self.requests += 1
        rid: Any = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("request must be a JSON object")
            rid = req.get("id")
            method = req.get("method")
            params = req.get("params", {})
            if not isinstance(method, str):
                raise ValueError("request needs a string 'method'")
            if not isinstance(params, dict):
                raise ValueError("'params' must be an object")
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            self.errors += 1
            return _encode(_error(rid, "BadRequest", str(e)))
        handler = self.handlers.get(method)
        if handler is None:
            self.errors += 1
            known = ", ".join(sorted(self.handlers)) or "none"
            return _encode(_error(rid, "UnknownMethod",
                                  f"unknown method {method!r} (known: {known})"))
        try:
            result = handler(params)
            if inspect.isawaitable(result):
                result = await result
            return _encode({"id": rid, "ok": True, "result": to_jsonable(result)})
        except Exception as e:
            self.errors += 1
            from vstack.workers import WorkerError

            # a worker's error keeps its type there; any other error is named by its class
            kind = e.kind if isinstance(e, WorkerError) and e.kind else type(e).__name__
            log.warning("control %s failed: %s: %s", method, kind, e)
            return _encode(_error(rid, kind, str(e)))


def _error(rid: Any, kind: str, message: str) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": {"type": kind, "message": message}}


class ControlClient:
    """Synchronous client for the CLI: ``ControlClient(path).call("flows")``.

    Raises ``DaemonNotRunning`` when nothing listens on ``path``, ``ControlError`` when the
    daemon answers with an error."""

    def __init__(self, path: str | None = None, timeout: float = 10.0) -> None:
        self.path = path or default_socket_path()
        self.timeout = timeout
        self._next_id = 0

    def call(self, method: str, **params: Any) -> Any:
        self._next_id += 1
        rid = self._next_id
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise DaemonNotRunning(
                    f"the vstack daemon is not running (nothing answers on {self.path}); "
                    "start it with 'vstack run', or pass --socket PATH") from None
            except PermissionError:
                raise ControlError(f"permission denied on {self.path} (the control socket "
                                   "is root-only; run as root)") from None
            sock.sendall(_encode({"id": rid, "method": method, "params": params}))
            buf = bytearray()
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_LINE * 16:
                    raise ControlError("response too long")
        except TimeoutError:
            raise ControlError(f"the daemon did not answer within {self.timeout:g}s") from None
        finally:
            sock.close()
        if not buf:
            raise ControlError("the daemon closed the connection without answering")
        try:
            resp = json.loads(buf)
        except ValueError as e:
            raise ControlError(f"bad response from the daemon: {e}") from None
        if not isinstance(resp, dict) or "ok" not in resp:
            raise ControlError("bad response from the daemon")
        if not resp["ok"]:
            err = resp.get("error") or {}
            raise ControlError(str(err.get("message", "unknown error")),
                               str(err.get("type", "ControlError")))
        return resp.get("result")


async def serve_forever(server: ControlServer, stop: Awaitable[Any]) -> None:
    """Run ``server`` until ``stop`` completes, then remove the socket."""
    await server.start()
    try:
        await stop
    finally:
        await server.close()

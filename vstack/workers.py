"""Every core (issue 6): one worker process per queue of a multi-queue TUN.

``vstack run --workers N`` (``[vnic] queues = N``; the default, 0, is one per core:
``default_workers()``) creates the TUN with ``IFF_MULTI_QUEUE``; the parent opens N-1
more queues and forks one worker per extra queue before its own event loop starts. The
parent is worker 0: it forwards packets on its own queue like the others and also keeps
everything that exists once per host (routes, nftables, state file, management port,
control socket, netlink monitor).

**Flows never move between workers.** The kernel picks the queue of a packet written to
the TUN by the flow's hash (``tun_select_queue``: the flow's recorded queue, or the hash
scaled to the queue count), so every packet of a flow reaches the same worker, which owns
that flow's whole state: its stack engine and sockets, its rule-engine facts, its timers.

**Consistency of decisions.** Every worker runs the *same* ruleset (the same rules file)
with its *own* engine, so a flow is decided by the same rules whichever worker it lands
on, with no IPC on the first packet's path. What must reach every engine goes through the
parent, over one **link** per worker (a ``socketpair`` made before the fork, JSON lines,
the control socket's protocol and dispatcher, ``ControlServer.dispatch``):

* management messages (after authentication, in the parent) and netlink monitor events
  without a flow are forwarded to every worker's engine (method ``event``, one way), so
  all engines see the same host events; an event naming a flow (``mgmt.switch``,
  ``mgmt.retarget``, ...) goes only to the worker that owns the flow (``owner_only``: the
  others answer "not mine" without submitting it);
* ``vstack rules reload`` reloads the parent's rules first: a bad file is refused there
  with its positioned error and no worker is touched (the old rules keep running
  everywhere); a good one is then prepared on every worker (``rules_prepare``: parsed,
  checked and held only if it has the parent's version; a file edited in between is
  refused) and, if all hold it, swapped in everywhere (``rules_commit``); if one refuses,
  all drop it (``rules_abort``) and nothing changed. Only a failure in the swap itself
  leaves mixed versions, reported as an error naming every worker's version. SIGHUP is
  forwarded too (each process reloads on its own);
* ``vstack flows`` merges every worker's flows (each tagged ``worker``); ``switch`` and
  ``why`` go to the worker that knows the flow; ``stats`` gives per-worker counters and
  their totals (``vstack.services``).

``WorkerLink`` is the parent's client of one link: requests go out as they come and one
reader task matches answers by id; each request is bounded by a timeout covering all its
waiting; a worker that died, does not answer, or is marked unresponsive (two timeouts in a
row, until it answers again) is a clear ``WorkerUnavailable`` error (a late answer is
recognised by its id and dropped); a bad answer fails one request, never the link.

**Decision log.** Each worker writes its own log (worker ``k`` > 0: ``<db>-w<k>``, trace
``<record>-w<k>``): SQLite takes one writer at a time, and forwarding every record to the
parent would put IPC on the per-flow path. Every log line carries ``w<k>``. ``vstack learn``
reads the ``-w<k>`` siblings of the database it is given (``worker_dbs``); ``vstack why``
asks the owning worker's in-memory history. Rules that aggregate over flows (counts
across flows) still see one worker's share. See ``docs/speed.md``.

Lifetime: workers die with the parent (``PR_SET_PDEATHSIG``), so a ``SIGKILL``ed daemon
leaves no queue open (the TUN vanishes with its last fd); SIGTERM/SIGINT/SIGHUP sent to
the parent are forwarded; a worker whose link closes (the parent is gone) stops. The
parent watches every worker's pidfd (``Workers.watch``): a worker that exits is logged,
reaped and its link marked dead at once (its queue and flows are gone; the kernel moves
their packets to the remaining queues), not at the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vstack.analysis.flowkey import FlowKey
from vstack.config import Config, ConfigError
from vstack.decision.events import Event
from vstack.vnic.tun import Tun, open_tun

log = logging.getLogger("vstack.workers")
PR_SET_PDEATHSIG = 1
LINK_LINE = 64 << 20  # one answer on a link (``flows`` of many flows is long)
LINK_TIMEOUT_S = 5.0  # a worker that does not answer within this is reported, not awaited
MAX_NOTES = 4096  # forwarded events waiting for one link; more are dropped and counted
UNRESPONSIVE_AFTER = 2  # timeouts in a row after which a link is unresponsive


def default_workers() -> int:
    """One worker per core this process may run on (at most 256, ``check_workers``)."""
    return max(1, min(256, len(os.sched_getaffinity(0))))


def run_config(name: str, wid: int, daemon_run: str, workers: int) -> dict[str, Any]:
    """The ``config`` of every worker's ``runs`` row (the parent's too): the daemon's name,
    the worker, how many there are, and ``daemon_run``, one id for the whole daemon run
    made before the fork (run ids count separately in each worker's log; ``vstack learn
    --run N`` finds the sibling logs' runs by it)."""
    return {"name": name, "worker": wid, "workers": workers, "daemon_run": daemon_run}


def worker_db(db_url: str, wid: int) -> str:
    """The decision log (or trace) of worker ``wid`` (0: the configured one)."""
    if not db_url or wid == 0:
        return db_url
    stem, dot, ext = db_url.rpartition(".")
    if dot and "/" not in ext:
        return f"{stem}-w{wid}.{ext}"
    return f"{db_url}-w{wid}"


def worker_dbs(db_url: str, limit: int = 256) -> list[str]:
    """``db_url`` and the logs of workers 1, 2, ... that exist beside it (SQLite files
    only; other URLs are returned alone). Readers of the decision log (``vstack learn``)
    take them all."""
    out = [db_url]
    prefix = "sqlite:///"
    if not db_url.startswith(prefix):
        return out
    for wid in range(1, limit):
        url = worker_db(db_url, wid)
        if not os.path.exists(url[len(prefix):]):
            break
        out.append(url)
    return out


def _tag_logs(wid: int) -> None:
    for h in logging.getLogger().handlers:
        h.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)-7s w{wid} %(name)s: %(message)s", datefmt="%H:%M:%S"))


# --------------------------------------------------------------------------- the links
def event_to_json(ev: Event) -> dict[str, Any]:
    """An ``Event`` as link ``params`` (``event_from_json`` reverses it)."""
    from vstack.control import to_jsonable

    return {"type": ev.type, "time": ev.time, "fields": to_jsonable(dict(ev.fields)),
            "flow": None if ev.flow is None else str(ev.flow)}


def event_from_json(params: Mapping[str, Any]) -> Event:
    etype, t, fields, flow = (params.get("type"), params.get("time"), params.get("fields"),
                              params.get("flow"))
    if not isinstance(etype, str) or not isinstance(t, int | float) or isinstance(t, bool):
        raise ValueError("event needs a string 'type' and a numeric 'time'")
    if not isinstance(fields, dict):
        raise ValueError("event 'fields' must be an object")
    if flow is not None and not isinstance(flow, str):
        raise ValueError("event 'flow' must be a flow key or null")
    return Event(etype, float(t), fields, FlowKey.parse(flow) if flow else None)


class WorkerUnavailable(RuntimeError):
    """A worker died, or did not answer on its link in time."""


class WorkerError(Exception):
    """A worker answered a request with an error; ``kind`` is the error's type there."""

    def __init__(self, wid: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.wid = wid
        self.kind = kind


_ID_HEAD = re.compile(rb'^\s*\{\s*"id"\s*:\s*(-?\d+)')


def _head_id(head: bytes) -> int | None:
    """The ``id`` at the start of an answer line we could not (or would not) decode."""
    m = _ID_HEAD.match(head)
    return int(m.group(1)) if m else None


async def read_link_line(reader: asyncio.StreamReader, limit: int) -> tuple[bytes, bool]:
    """One line from a link: ``(line, False)``, or ``(head, True)`` for a line longer than
    ``limit``, skipped up to its newline (``head``: its first bytes, for its id) so the
    next line is read whole. ``(b"", False)`` at EOF (a partial last line is dropped)."""
    try:
        return await reader.readuntil(b"\n"), False
    except asyncio.IncompleteReadError:
        return b"", False
    except asyncio.LimitOverrunError as e:
        head = await reader.read(max(e.consumed, 1))
    while True:  # skip the rest of the over-long line
        try:
            await reader.readuntil(b"\n")
            return head[:256], True
        except asyncio.IncompleteReadError:
            return b"", False
        except asyncio.LimitOverrunError as e:
            await reader.read(max(e.consumed, 1))


class WorkerLink:
    """The parent's end of one worker's link: ``await request(method, params)`` returns the
    result, or raises ``WorkerError`` (the worker's handler failed, or its answer was
    over-long or undecodable: that request fails, the link stays) / ``WorkerUnavailable``
    (dead, unresponsive, or no answer within ``timeout``); ``notify`` sends one way (its
    answer is read and dropped), in order with the requests.

    Requests are written as they come (no lock: one reader task matches answers to
    requests by id), and the timeout covers everything a request waits for (opening the
    link, the socket buffer, the answer). ``UNRESPONSIVE_AFTER`` timeouts in a row mark
    the link unresponsive: requests fail at once and notes are dropped (counted) until
    any answer arrives again (the worker answers what it was sent when it recovers)."""

    def __init__(self, wid: int, sock: socket.socket, pid: int | None = None,
                 timeout: float = LINK_TIMEOUT_S, line_limit: int = LINK_LINE) -> None:
        self.wid = wid
        self.pid = pid
        self.timeout = timeout
        self.line_limit = line_limit
        self.counters: Counter[str] = Counter()
        self.dead: str | None = None
        self.unresponsive = False
        self._fails = 0  # timeouts in a row
        self._sock: socket.socket | None = sock
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._opening: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._queued: list[bytes] = []  # written once the link is open
        self._next = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._notes: dict[int, str] = {}  # ids of notes in flight -> method

    def __repr__(self) -> str:
        return f"worker {self.wid}" + (f" (pid {self.pid})" if self.pid else "")

    def _unavailable(self) -> WorkerUnavailable | None:
        if self.dead is not None:
            return WorkerUnavailable(f"{self!r} is unavailable: {self.dead}")
        if self.unresponsive:
            return WorkerUnavailable(f"{self!r} is unavailable: it did not answer its last "
                                     f"{UNRESPONSIVE_AFTER} requests (no request is sent "
                                     "until it answers again)")
        return None

    def mark_dead(self, why: str) -> WorkerUnavailable:
        """The worker is gone (its link closed, or its process exited): every request
        waiting on it fails now, later ones at once."""
        if self.dead is None:
            self.dead = why
            log.error("%r: %s", self, why)
            self._close_transport()
        err = WorkerUnavailable(f"{self!r} is unavailable: {self.dead}")
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(err)
        self._waiting.clear()
        self._notes.clear()
        return err

    def _close_transport(self) -> None:
        if self._pump is not None and self._pump is not _current_task():
            self._pump.cancel()
        if self._writer is not None:
            self._writer.close()
        elif self._sock is not None:
            self._sock.close()
        self._writer = self._reader = None
        self._sock = None

    def _open_started(self) -> asyncio.Task[None]:
        if self._opening is None:
            self._opening = asyncio.get_running_loop().create_task(self._open())
        return self._opening

    async def _open(self) -> None:
        if self._sock is None or self.dead is not None:
            return
        try:
            self._reader, writer = await asyncio.open_unix_connection(
                sock=self._sock, limit=self.line_limit)
        except OSError as e:
            self.mark_dead(f"its link failed ({type(e).__name__}: {e})")
            return
        if self.dead is not None:  # marked dead while opening
            writer.close()
            self._reader = None
            return
        for line in self._queued:  # notes sent before the link was open, in order
            writer.write(line)
        self._queued.clear()
        self._writer = writer
        self._pump = asyncio.get_running_loop().create_task(self._read_answers())

    def _send(self, method: str, params: Mapping[str, Any] | None) -> int:
        self._next += 1
        rid = self._next
        line = json.dumps({"id": rid, "method": method, "params": dict(params or {})},
                          separators=(",", ":"), allow_nan=False).encode() + b"\n"
        if self._writer is None:
            self._queued.append(line)
            self._open_started()
        else:
            self._writer.write(line)
        return rid

    async def request(self, method: str, params: Mapping[str, Any] | None = None, *,
                      timeout: float | None = None) -> Any:
        wait = self.timeout if timeout is None else timeout
        down = self._unavailable()
        if down is not None:
            self.counters["fast_fails"] += 1
            raise down
        self.counters["requests"] += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        try:
            rid = self._send(method, params)
        except OSError as e:
            raise self.mark_dead(f"its link failed ({type(e).__name__}: {e})") from None
        self._waiting[rid] = fut
        try:
            resp = await asyncio.wait_for(self._exchange(fut), wait)
        except TimeoutError:
            self.counters["timeouts"] += 1
            self._fails += 1
            if self._fails >= UNRESPONSIVE_AFTER and not self.unresponsive:
                self.unresponsive = True
                self.counters["unresponsive"] += 1
                log.error("%r: no answer to %d requests in a row; marked unresponsive",
                          self, self._fails)
            raise WorkerUnavailable(f"{self!r} did not answer {method!r} within "
                                    f"{wait:g}s") from None
        except (OSError, EOFError) as e:
            raise self.mark_dead(f"its link failed ({type(e).__name__}: {e}); the worker "
                                 "has probably exited") from None
        finally:
            self._waiting.pop(rid, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved (mark_dead may have set it while we waited)
        if not resp.get("ok"):
            err = resp.get("error") or {}
            self.counters["errors"] += 1
            raise WorkerError(self.wid, str(err.get("type", "Error")),
                              str(err.get("message", "unknown error")))
        return resp.get("result")

    async def _exchange(self, fut: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
        if self._writer is None:
            await asyncio.shield(self._open_started())
        if self._writer is None:
            down = self._unavailable()
            if down is not None:
                raise down
            raise EOFError("the link was closed")
        await self._writer.drain()
        return await fut

    async def _read_answers(self) -> None:
        """The link's one reader: each answer to the request (or note) of its id."""
        assert self._reader is not None
        why = "the link was closed"
        try:
            while True:
                line, too_long = await read_link_line(self._reader, self.line_limit)
                if not line:
                    break
                self._answered()
                resp: Any = None
                rid: int | None
                if too_long:
                    self.counters["answers_too_long"] += 1
                    rid = _head_id(line)
                    resp = {"ok": False, "error": {
                        "type": "AnswerTooLong",
                        "message": f"{self!r}'s answer is longer than {self.line_limit} "
                                   "bytes (skipped; the link goes on)"}}
                else:
                    try:
                        resp = json.loads(line)
                        rid = resp.get("id") if isinstance(resp, dict) else None
                        if not isinstance(resp, dict) or not isinstance(rid, int):
                            raise ValueError("not an answer object with an integer id")
                    except (ValueError, RecursionError) as e:
                        self.counters["bad_answers"] += 1
                        rid = _head_id(line)
                        resp = {"ok": False, "error": {
                            "type": "BadAnswer",
                            "message": f"{self!r}'s answer is not valid JSON ({e})"}}
                self._deliver(rid, resp)
        except (OSError, EOFError) as e:
            why = f"its link failed ({type(e).__name__}: {e})"
        except asyncio.CancelledError:
            return
        self.mark_dead(f"{why}; the worker has probably exited")

    def _answered(self) -> None:
        self._fails = 0
        if self.unresponsive:
            self.unresponsive = False
            log.warning("%r answers again", self)

    def _deliver(self, rid: int | None, resp: dict[str, Any]) -> None:
        if rid is None and len(self._waiting) == 1:
            rid = next(iter(self._waiting))  # undecodable, but only one request waits
        fut = self._waiting.pop(rid, None) if rid is not None else None
        if fut is not None:
            if not fut.done():
                fut.set_result(resp)
            return
        method = self._notes.pop(rid, None) if rid is not None else None
        if method is None:
            self.counters["late_answers"] += 1  # of a request that timed out: dropped
        elif not resp.get("ok"):
            self.counters["notes_failed"] += 1
            log.warning("%r: %s failed there: %s", self, method, resp.get("error"))

    def notify(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        """Send a request one way (forwarded events): never waits; dropped and counted
        when the link is dead or unresponsive, or ``MAX_NOTES`` are unanswered."""
        if self._unavailable() is not None or len(self._notes) >= MAX_NOTES:
            self.counters["notes_dropped"] += 1
            return
        try:
            rid = self._send(method, params)
        except OSError as e:
            self.mark_dead(f"its link failed ({type(e).__name__}: {e})")
            self.counters["notes_dropped"] += 1
            return
        self._notes[rid] = method
        self.counters["notes"] += 1

    async def close(self) -> None:
        if self.dead is None:
            self.dead = "the daemon is stopping"  # not an error: nothing logged
        self.mark_dead(self.dead)  # fails what still waits
        self._close_transport()


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


async def check_links(links: Sequence[WorkerLink], timeout: float = 30.0) -> str | None:
    """Ask every worker once (at start): None if all answer, else what went wrong with the
    first that does not (it died while starting: its log lines say why)."""
    for link in links:
        try:
            await link.request("stats", timeout=timeout)
        except WorkerUnavailable as e:
            return f"{e} (it did not start; see its log lines)"
        except WorkerError:
            pass  # it answered
    return None


async def serve_link(sock: socket.socket, dispatch: Callable[[bytes], Awaitable[bytes]],
                     limit: int = LINK_LINE) -> None:
    """The worker's end of its link: one request line in, ``dispatch``'s answer out, until
    the parent closes it. An over-long request is answered with an error and skipped."""
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=limit)
    try:
        while True:
            line, too_long = await read_link_line(reader, limit)
            if not line:
                break
            if too_long:
                log.error("link: request longer than %d bytes; skipped", limit)
                writer.write(json.dumps({"id": _head_id(line), "ok": False, "error": {
                    "type": "RequestTooLong",
                    "message": f"request longer than {limit} bytes"}}).encode() + b"\n")
            else:
                writer.write(await dispatch(line))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


# ------------------------------------------------------------------------- the processes
class Workers:
    """The forked workers of one daemon (the parent's handle): their pids and the parent's
    ends of their links (``links()``, on the running loop)."""

    def __init__(self, pids: Sequence[int], socks: Sequence[socket.socket] = ()) -> None:
        self.pids = list(pids)
        self._socks = list(socks)
        self._links: list[WorkerLink] | None = None
        self._pidfds: dict[int, int] = {}  # pid -> pidfd, while watched
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exited: dict[int, str] = {}  # pid -> how it ended (reaped by the watch)

    def watch(self) -> None:
        """Notice a worker's exit when it happens (``pidfd_open`` + ``add_reader`` on the
        running loop): log it, mark its link dead (requests fail at once) and reap it."""
        self._loop = loop = asyncio.get_running_loop()
        links = {lk.pid: lk for lk in self.links()}
        for pid in self.pids:
            if pid in self._pidfds:
                continue
            try:
                fd = os.pidfd_open(pid)
            except (OSError, AttributeError) as e:  # gone already (reaped) / no pidfd
                log.warning("worker pid %d: not watched (%s)", pid, e)
                continue
            self._pidfds[pid] = fd
            loop.add_reader(fd, self._exited, pid, links.get(pid))

    def _exited(self, pid: int, link: WorkerLink | None) -> None:
        self._unwatch(pid)
        how = "exited"
        with contextlib.suppress(ChildProcessError):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                       else f"exited with status {os.waitstatus_to_exitcode(status)}")
        self.exited[pid] = how
        self.pids = [p for p in self.pids if p != pid]  # reaped: never signalled again
        quiet = how in ("exited with status 0", f"killed by signal {signal.SIGTERM.value}",
                        f"killed by signal {signal.SIGINT.value}")  # e.g. ^C to the group
        log.log(logging.WARNING if quiet else logging.ERROR,
                "worker pid %d %s; its queue and flows are gone", pid, how)
        if link is not None:
            link.mark_dead(f"its process {how}")

    def _unwatch(self, pid: int) -> None:
        fd = self._pidfds.pop(pid, None)
        if fd is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)
        os.close(fd)

    def links(self, timeout: float = LINK_TIMEOUT_S) -> list[WorkerLink]:
        if self._links is None:
            self._links = [WorkerLink(wid, s, pid, timeout) for wid, (pid, s)
                           in enumerate(zip(self.pids, self._socks, strict=True), start=1)]
        return self._links

    def signal(self, sig: int) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        for pid in list(self._pidfds):
            self._unwatch(pid)
        for s in self._socks:
            s.close()
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        left = set(self.pids)
        while left and time.monotonic() < deadline:
            for pid in list(left):
                with contextlib.suppress(ChildProcessError):
                    done, _ = os.waitpid(pid, os.WNOHANG)
                    if not done:
                        continue
                left.discard(pid)
            if left:
                time.sleep(0.02)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def spawn(cfg: Config, config_path: Path | None, tun: Tun, n: int,
          daemon_run: str = "") -> Workers:
    """Open ``n - 1`` more queues of ``tun`` and fork a worker on each, each with a link;
    ``daemon_run`` goes into every worker's run info (``run_config``)."""
    if n <= 1:
        return Workers([])
    _tag_logs(0)
    from vstack.dccp.endpoint import set_port_slice

    set_port_slice(0, n)  # raw DCCP client ports: each worker its own slice (no collisions)
    parent = os.getpid()
    queues: list[Tun] = []
    pairs: list[tuple[socket.socket, socket.socket]] = []
    pids: list[int] = []  # every child forked so far (stopped if a later step fails)
    try:
        for _ in range(n - 1):
            queues.append(open_tun(tun.name, vnet_hdr=tun.vnet_hdr, multi_queue=True))
            pairs.append(socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM))
        for wid, q in enumerate(queues, start=1):
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    _child_setup(wid, parent)
                    set_port_slice(wid, n)
                    tun.close()
                    for other in queues:
                        if other is not q:
                            other.close()
                    mine = pairs[wid - 1][1]
                    for a, b in pairs:
                        a.close()
                        if b is not mine:
                            b.close()
                    code = asyncio.run(_worker(cfg, config_path, q, wid, mine, daemon_run, n))
                except BaseException:  # never return into the parent's code
                    log.exception("worker %d failed", wid)
                finally:
                    logging.shutdown()
                    os._exit(code)
            pids.append(pid)
    except BaseException as e:
        log.error("starting %d workers failed (%s); stopping the %d forked", n - 1, e,
                  len(pids))
        Workers(pids, [a for a, _b in pairs]).stop(timeout=5.0)
        for q in queues:
            q.close()
        for _a, b in pairs:
            b.close()
        set_port_slice(0, 1)
        raise
    for q in queues:
        q.close()  # the workers hold them
    for _a, b in pairs:
        b.close()
    log.info("%d workers: pids %s (worker 0 is this process)", n, " ".join(map(str, pids)))
    return Workers(pids, [a for a, _b in pairs])


def _child_setup(wid: int, parent: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before PDEATHSIG was set: no signal comes
        os._exit(0)
    _tag_logs(wid)


async def _worker(cfg: Config, config_path: Path | None, q: Tun, wid: int,
                  link: socket.socket | None = None, daemon_run: str = "",
                  workers: int = 0) -> int:
    from vstack.cli.daemon import (
        build_datapath,
        log_counters,
        open_engine,
        open_log,
        reload_config,
    )
    from vstack.control import ControlServer
    from vstack.services import local_services

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    sink = open_log(cfg, wid, daemon_run, workers)
    engine, rules = open_engine(cfg, sink)
    dp, driver = build_datapath(cfg, engine, rules, sink, q.vnet_hdr)
    dp.on_failure = lambda _msg: stop.set()
    svc = local_services(cfg, dp, engine, driver, sink)
    server = ControlServer("", svc.link_handlers())

    def reload() -> None:
        if config_path is not None:
            reload_config(config_path, cfg, dp, driver, log)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    dp.attach(q.fd, loop)
    link_task: asyncio.Task[None] | None = None
    if link is not None:
        link_task = loop.create_task(serve_link(link, server.dispatch))
        link_task.add_done_callback(lambda _t: stop.set())  # the parent is gone
    log.info("worker %d ready on a queue of %s", wid, q.name)
    try:
        await log_counters(dp, stop, cfg.execution.metrics_interval_s, log)
    finally:
        if link_task is not None:
            link_task.cancel()
            with contextlib.suppress(BaseException):
                await link_task
        s = dp.stats()
        dp.close()
        if driver is not None:
            driver.stop()
        if sink is not None:
            with contextlib.suppress(Exception):
                sink.close()
        q.close()
        log.info("final counters %s", " ".join(f"{k}={v}" for k, v in s.items()))
    return 0


def check_workers(n: int) -> int:
    if not 1 <= n <= 256:
        raise ConfigError(f"--workers: must be 1..256, got {n}")
    return n

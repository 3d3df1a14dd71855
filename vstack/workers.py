"""Every core (issue 6): one worker process per queue of a multi-queue TUN.

``vstack run --workers N`` (``[vnic] queues = N``) creates the TUN with
``IFF_MULTI_QUEUE``; the parent opens N-1 more queues and forks one worker per extra queue
before its own event loop starts; the parent is worker 0 and keeps everything that exists
once per host (routes, nftables, state file, management, control socket, monitor).

**Flows never move between workers.** The kernel picks the queue of a packet written to
the TUN by the flow's hash (``tun_select_queue``: the flow's recorded queue, or the hash
scaled to the queue count), so every packet of a flow reaches the same worker, which owns
that flow's whole state: its stack engine and sockets, its rule-engine facts, its timers.

**Consistency of decisions.** Every worker runs the *same* ruleset (it loads the same
rules file, and reloads it on the SIGHUP the parent forwards) with its *own* engine, so a
flow is decided by the same rules whichever worker it lands on; per-flow state never needs
sharing because a flow stays on its worker. Each worker writes its own decision log
(worker ``k`` > 0: ``<db>-w<k>``, SQLite allows one writer at a time; a shared file would
serialise the workers), with the worker id in every log line. What is *not* shared:
rules that aggregate over flows (counts across flows) see one worker's share, and the
control socket / management lists worker 0's flows. See ``docs/speed.md``.

Lifetime: workers die with the parent (``PR_SET_PDEATHSIG``), so a ``SIGKILL``ed daemon
leaves no queue open (the TUN vanishes with its last fd); SIGTERM/SIGINT/SIGHUP sent to
the parent are forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vstack.config import Config, ConfigError
from vstack.vnic.tun import Tun, open_tun

log = logging.getLogger("vstack.workers")
PR_SET_PDEATHSIG = 1


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def worker_db(db_url: str, wid: int) -> str:
    """The decision log of worker ``wid`` (0: the configured one)."""
    if not db_url or wid == 0:
        return db_url
    stem, dot, ext = db_url.rpartition(".")
    if dot and "/" not in ext:
        return f"{stem}-w{wid}.{ext}"
    return f"{db_url}-w{wid}"


def _tag_logs(wid: int) -> None:
    for h in logging.getLogger().handlers:
        h.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)-7s w{wid} %(name)s: %(message)s", datefmt="%H:%M:%S"))


class Workers:
    """The forked workers of one daemon (the parent's handle)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)

    def signal(self, sig: int) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
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


def spawn(cfg: Config, config_path: Path | None, tun: Tun, n: int) -> Workers:
    """Open ``n - 1`` more queues of ``tun`` and fork a worker on each."""
    if n <= 1:
        return Workers([])
    _tag_logs(0)
    from vstack.dccp.endpoint import set_port_slice

    set_port_slice(0, n)  # raw DCCP client ports: each worker its own slice (no collisions)
    queues = [open_tun(tun.name, vnet_hdr=tun.vnet_hdr, multi_queue=True)
              for _ in range(n - 1)]
    pids: list[int] = []
    for wid, q in enumerate(queues, start=1):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                _child_setup(wid)
                set_port_slice(wid, n)
                tun.close()
                for other in queues:
                    if other is not q:
                        other.close()
                code = asyncio.run(_worker(cfg, config_path, q, wid))
            except BaseException:  # never return into the parent's code
                log.exception("worker %d failed", wid)
            finally:
                logging.shutdown()
                os._exit(code)
        pids.append(pid)
    for q in queues:
        q.close()  # the workers hold them
    log.info("%d workers: pids %s (worker 0 is this process)", n, " ".join(map(str, pids)))
    return Workers(pids)


def _child_setup(wid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    _tag_logs(wid)


async def _worker(cfg: Config, config_path: Path | None, q: Tun, wid: int) -> int:
    from vstack.cli.daemon import reload_config
    from vstack.datapath import Datapath

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    sink: Any = None
    if cfg.log.db:
        from vstack.log.recorder import open_sink

        sink = open_sink(worker_db(cfg.log.db, wid), {"config": cfg.vnic.name, "worker": wid})
    engine: Any = None
    driver: Any = None
    if cfg.decision.rules:
        from vstack.decision.driver import EngineDriver
        from vstack.decision.engine import RulesFile

        rules = RulesFile(cfg.decision.rules)
        engine = rules.engine(None, sink, backend=cfg.decision.backend,
                              exploration=cfg.decision.exploration)
    dp_cls: type[Datapath] = Datapath
    if q.vnet_hdr:
        from vstack.fastpath import OffloadDatapath

        dp_cls = OffloadDatapath
    dp = dp_cls(cfg, engine, sink)
    if engine is not None:
        engine.actuator = dp
        dp.metrics_listeners.append(lambda ev: engine.submit(ev, ev.time))
        driver = EngineDriver(engine, rules)
        driver.start()
    dp.on_failure = lambda _msg: stop.set()

    def reload() -> None:
        if config_path is not None:
            reload_config(config_path, cfg, dp, driver, log)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    dp.attach(q.fd, loop)
    log.info("worker %d ready on a queue of %s", wid, q.name)
    last: dict[str, Any] = {}
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=cfg.execution.metrics_interval_s)
            s = dp.stats()
            if s != last:
                log.info("counters %s", " ".join(f"{k}={v}" for k, v in s.items()))
                last = s
    finally:
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

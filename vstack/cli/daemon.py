"""``vstack run``: the daemon; ``vstack demo``: the paper's scenario on a netns testbed.

``vstack run [--config FILE] [--stack NAME] [--workers N]`` creates the VNIC, routes the
configured prefixes through it, and runs until SIGTERM/SIGINT, with one worker process per
core (``--workers``, ``[vnic] queues``; ``vstack.workers``); SIGHUP reloads the configuration file
(NAT map and default stack, applied to live flows) and the rules file. ``[decision] rules``
puts the rule engine in charge (selector for new flows, ``flow.metrics``/``flow.idle``
events, timers, actions through the datapath's Actuator); ``[log] db`` / ``record`` open
the decision log and the packet/event trace. It logs a line per flow created,
switched or expired, and the datapath counters every metrics interval (when they moved).
Everything it added to the host is removed on the way out; after a crash, at the next
start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from vstack.cli.app import app
from vstack.config import Config, ConfigError, load

log = logging.getLogger("vstack")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema checks at start


def _fail(msg: str, code: int = 1) -> typer.Exit:
    typer.echo(f"vstack: error: {msg}", err=True)
    return typer.Exit(code)


def load_config(path: Path | None, stack: str | None) -> Config:
    cfg = load(path) if path is not None else Config()
    if stack:
        cfg.execution.default_stack = stack
    from vstack.execution.stacks import load_builtin
    from vstack.execution.stacks.base import STACKS

    load_builtin()
    if cfg.vnic.queues == 0:  # issue 6: one worker per core unless told otherwise
        from vstack.workers import default_workers

        cfg.vnic.queues = default_workers()
    if cfg.execution.default_stack not in STACKS:
        raise ConfigError(f"execution.default_stack: unknown stack "
                          f"{cfg.execution.default_stack!r} (known: {', '.join(sorted(STACKS))})")
    return cfg


def reload_config(config_path: Path, cfg: Config, dp: Any, driver: Any,
                  logger: logging.Logger = log) -> Config | None:
    """SIGHUP (the daemon and each worker): load ``config_path`` again and apply it to the
    datapath ``dp`` and the rule ``driver`` (None: no rules). The running queue count is
    kept (``--workers`` is not in the file). None if the file does not load (logged,
    nothing changes)."""
    try:
        new = load_config(config_path, None)
    except ConfigError as e:
        logger.error("SIGHUP: configuration not reloaded: %s", e)
        return None
    new.vnic.queues = cfg.vnic.queues  # --workers is not in the file
    dp.reload(new)
    if driver is not None:
        driver.reload()
    return new


async def log_counters(dp: Any, stop: asyncio.Event, interval: float,
                       logger: logging.Logger = log) -> None:
    """Until ``stop``: every ``interval`` log the datapath's counters when they changed
    (the daemon's and every worker's loop)."""
    last: dict[str, Any] = {}
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
        s = dp.stats()
        if s != last:
            logger.info("counters %s", " ".join(f"{k}={v}" for k, v in s.items()))
            last = s


def serve(cfg: Config, config_path: Path | None = None) -> int:
    """Set up the VNIC, run the daemon until SIGTERM/SIGINT, tear down. Returns the exit
    status. (pyroute2's synchronous API must run outside the asyncio loop.)"""
    from vstack.vnic.netconf import SetupError, Vnic

    def interrupted(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    # a signal during setup unwinds through Vnic.setup, which removes what it added
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, interrupted)
    try:
        vnic = Vnic.setup(cfg.vnic, cfg.nat)
    except SetupError as e:
        typer.echo(f"vstack: error: {e}", err=True)
        return 1
    if cfg.execution.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, cfg.execution.nice)
        except OSError as e:
            log.warning("execution.nice = %d: %s", cfg.execution.nice, e.strerror)
    removed: list[str] = []
    global _WORKERS, _DAEMON_RUN
    _DAEMON_RUN = uuid.uuid4().hex  # one id for this run in every worker's log
    try:
        if cfg.vnic.queues > 1:  # issue 6: one worker process per extra TUN queue
            from vstack.workers import spawn

            _WORKERS = spawn(cfg, config_path, vnic.tun, cfg.vnic.queues, _DAEMON_RUN)
        code = asyncio.run(_serve(cfg, config_path, vnic))
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # let teardown finish
            signal.signal(sig, signal.SIG_IGN)
        if _WORKERS is not None:
            _WORKERS.stop()
            _WORKERS = None
        removed = vnic.close()
        log.info("stopped; removed %s", ", ".join(removed) or "nothing")
    return code


_WORKERS: Any = None  # vstack.workers.Workers of this daemon (--workers > 1)
_DAEMON_RUN = ""  # the id of this daemon run in every worker's run info (run_config)


def open_log(cfg: Config, wid: int = 0, daemon_run: str = "",
             workers: int | None = None) -> Any:
    """``[log]``: the decision log (``db``) and the trace recorder (``record``) of worker
    ``wid`` (0: the parent's, the configured files; k: ``<db>-w<k>``)."""
    if not cfg.log.db and not cfg.log.record:
        return None
    from vstack.log.recorder import open_sink
    from vstack.workers import run_config, worker_db

    info = run_config(cfg.vnic.name, wid, daemon_run or _DAEMON_RUN or uuid.uuid4().hex,
                      cfg.vnic.queues if workers is None else workers)
    return open_sink(worker_db(cfg.log.db, wid), {"config": info},
                     worker_db(cfg.log.record, wid))


def open_engine(cfg: Config, sink: Any) -> tuple[Any, Any]:
    """``[decision] rules``: the rule engine (a StackSelector) and its file."""
    if not cfg.decision.rules:
        return None, None
    from vstack.decision.engine import RulesFile

    rules = RulesFile(cfg.decision.rules)
    engine = rules.engine(None, sink, backend=cfg.decision.backend,
                          exploration=cfg.decision.exploration)
    return engine, rules


def build_datapath(cfg: Config, engine: Any, rules: Any, sink: Any, vnet_hdr: bool,
                   ) -> tuple[Any, Any]:
    """The datapath over the engine (or the static selector) and the log, wired up: the
    engine acts on it and hears its metrics, its ``EngineDriver`` runs, the trace recorder
    taps its packets. Returns ``(datapath, driver)``; the daemon and every worker use it."""
    from vstack.datapath import Datapath

    dp_cls: type[Datapath] = Datapath
    if vnet_hdr:  # [vnic] offload: virtio_net_hdr on every packet (issue 6)
        from vstack.fastpath import OffloadDatapath

        dp_cls = OffloadDatapath
    dp = dp_cls(cfg, engine, sink)
    driver = None
    if engine is not None:
        from vstack.decision.driver import EngineDriver

        engine.actuator = dp
        dp.metrics_listeners.append(lambda ev: engine.submit(ev, ev.time))
        driver = EngineDriver(engine, rules)
        driver.start()
    recorder = getattr(sink, "recorder", None)
    if recorder is not None:
        dp.tap = recorder.packet
    return dp, driver


async def _serve(cfg: Config, config_path: Path | None, vnic: Any) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        sink = open_log(cfg)
    except Exception as e:
        typer.echo(f"vstack: error: log.db / log.record: {e}", err=True)
        return 1
    try:
        engine, rules = open_engine(cfg, sink)
    except Exception as e:
        if sink is not None:
            sink.close()
        typer.echo(f"vstack: error: decision.rules: {e}", err=True)
        return 1
    dp, driver = build_datapath(cfg, engine, rules, sink, vnic.tun.vnet_hdr)
    if engine is not None:
        log.info("decision: rules %s (version %s)", cfg.decision.rules, engine.rules_version)
    if dp.tap is not None:
        log.info("recording packet headers and events to %s", cfg.log.record)
    failed: list[str] = []

    def on_failure(msg: str) -> None:
        failed.append(msg)
        stop.set()

    dp.on_failure = on_failure
    services: Any = None
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def reload() -> None:
            if config_path is None:
                log.info("SIGHUP: no configuration file to reload")
                return
            new = reload_config(config_path, cfg, dp, driver)
            if new is None:
                return
            if _WORKERS is not None:
                _WORKERS.signal(signal.SIGHUP)
            try:
                vnic.update_nat(new.nat)
            except Exception as e:
                log.error("SIGHUP: raw-stack NAT rules not updated: %s", e)
            log.info("configuration reloaded from %s", config_path)

        loop.add_signal_handler(signal.SIGHUP, reload)
        dp.attach(vnic.tun.fd, loop)
        from vstack.services import start_services  # management, monitor, control socket

        links = _WORKERS.links() if _WORKERS is not None else []
        if _WORKERS is not None:
            _WORKERS.watch()  # a worker that exits is noticed (logged, reaped) at once
        services = await start_services(cfg, dp, engine, driver, sink, workers=links)
        if links:  # a worker that died while starting fails the daemon, as worker 0 would
            from vstack.workers import check_links

            bad = await check_links(links)
            if bad is not None:
                on_failure(bad)
        v = vnic.describe()
        if not failed:
            log.info("vstack ready: device %s (%s, %s), routes %s via table %d, fwmark 0x%x, "
                     "default stack %s", v["name"], v["address4"] or "-",
                     v["address6"] or "-", ",".join(cfg.vnic.routes), cfg.vnic.table,
                     cfg.vnic.fwmark, cfg.execution.default_stack)
        await log_counters(dp, stop, cfg.execution.metrics_interval_s)
    finally:
        if services is not None:
            await services.close()
        s = dp.stats()
        dp.close()
        if driver is not None:
            driver.stop()
        if sink is not None:
            try:
                sink.close()
            except Exception as e:
                log.error("closing the decision log: %s", e)
        log.info("final counters %s", " ".join(f"{k}={v}" for k, v in s.items()))
    if failed:
        typer.echo(f"vstack: error: {failed[0]}", err=True)
        return 1
    return 0


@app.command()
def run(
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML configuration file"),
    stack: str | None = typer.Option(None, "--stack", help="default stack for UDP flows "
                                     "(overrides execution.default_stack)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
    workers: int | None = typer.Option(
        None, "--workers", help="worker processes, one per TUN queue (0: one per core; "
        "default: the config's vnic.queues, else one per core)"),
) -> None:
    """Run the vstack daemon: VNIC, routes, datapath, until SIGTERM/SIGINT (SIGHUP reloads)."""
    setup_logging(verbose)
    try:
        cfg = load_config(config, stack)
        if workers is not None:
            from vstack.workers import check_workers, default_workers

            cfg.vnic.queues = check_workers(workers or default_workers())
    except ConfigError as e:
        raise _fail(str(e)) from None
    code = serve(cfg, config)
    if code:
        raise typer.Exit(code)


# ---------------------------------------------------------------------------- demo
DEMO_SERVER = r"""
import socket, sys, time, select
socks = []
for spec in sys.argv[1:]:
    host, port = spec.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    s.setblocking(False)
    socks.append((spec, s))
counts = {spec: 0 for spec, _ in socks}
nxt = time.monotonic() + 1
while True:
    r, _, _ = select.select([s for _, s in socks], [], [], max(0, nxt - time.monotonic()))
    for spec, s in socks:
        if s in r:
            while True:
                try:
                    data, peer = s.recvfrom(65535)
                except BlockingIOError:
                    break
                counts[spec] += 1
                s.sendto(data, peer)
    if time.monotonic() >= nxt:
        nxt += 1
        print(" ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
        counts = dict.fromkeys(counts, 0)
"""

DEMO_CLIENT = r"""
import socket, sys, time
dst, port, rate, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((dst, port))
s.setblocking(False)
sent = got = 0
t0 = time.monotonic()
while time.monotonic() - t0 < secs:
    s.send(sent.to_bytes(8, "big") + b"x" * 192)
    sent += 1
    try:
        while True:
            s.recv(65535)
            got += 1
    except BlockingIOError:
        pass
    time.sleep(1 / rate)
time.sleep(0.3)
try:
    while True:
        s.recv(65535)
        got += 1
except BlockingIOError:
    pass
print(f"client: sent {sent} replies {got}", flush=True)
"""


@app.command()
def demo(
    seconds: float = typer.Option(20.0, "--seconds", help="how long the application sends"),
    period: float = typer.Option(5.0, "--period", help="switch the flow every PERIOD s"),
    rate: int = typer.Option(200, "--rate", help="datagrams per second"),
    scenario: str = typer.Option("dccp", "--scenario",
                                 help="dccp: the paper's UDP <-> DCCP switch; "
                                      "nat: switch between two UDP servers (NAT)"),
) -> None:
    """The paper's scenario on a netns testbed: an application's UDP flow is switched
    every PERIOD seconds (UDP <-> DCCP stacks, or between two UDP servers by NAT);
    per-second counts at each server."""
    setup_logging()
    from vstack.testbed import Testbed, TestbedError

    if scenario not in ("dccp", "nat"):
        raise _fail(f"--scenario: expected dccp or nat, got {scenario!r}", 2)
    run_demo: Callable[..., Any] | None = None
    if scenario == "dccp":
        try:
            from vstack.dccp import experiment

            run_demo = experiment.run_demo
        except ImportError as e:
            log.warning("the DCCP scenario is not available (%s): running the NAT scenario", e)
    try:
        tb = Testbed(prefix="vd")
    except TestbedError as e:
        raise _fail(str(e)) from None
    with tb:
        if run_demo is not None:
            run_demo(tb, seconds=seconds, period=period, rate=float(rate), echo=typer.echo)
        else:
            _demo(tb, seconds, period, rate)


def _demo(tb: Any, seconds: float, period: float, rate: int) -> None:
    import subprocess
    import tempfile

    l1, l2 = tb.links
    vdst = f"{l1.server4}:9000"
    targets = [f"{l1.server4}:9000", f"{l2.server4}:9000"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "vstack.toml"

        def write_cfg(i: int) -> None:
            cfg_path.write_text(f'[vnic]\nname = "vstk0"\n[execution]\nmetrics_interval_s = 5.0\n'
                                f'[nat."{vdst}"]\nudp = "{targets[i]}"\n')

        write_cfg(0)
        server = tb.popen(tb.server, [sys.executable, "-c", DEMO_SERVER, *targets],
                          stdout=subprocess.PIPE, text=True)
        daemon = tb.popen(tb.edge, [sys.executable, "-m", "vstack", "run", "--config",
                                    str(cfg_path)], stderr=subprocess.PIPE, text=True)
        assert daemon.stderr is not None and server.stdout is not None
        for line in daemon.stderr:
            sys.stderr.write(line)
            if "vstack ready" in line:
                break
            if daemon.poll() is not None:
                raise _fail("the daemon did not start")
        import os
        import threading

        def pump(src: Any, prefix: str, out: Any) -> None:
            for line in src:
                out.write(f"{prefix}{line}")
                out.flush()

        threading.Thread(target=pump, args=(daemon.stderr, "", sys.stderr), daemon=True).start()
        threading.Thread(target=pump, args=(server.stdout, "servers: ", sys.stdout),
                         daemon=True).start()
        typer.echo(f"demo: app -> {vdst} through vstack; NAT switches between "
                   f"{targets[0]} and {targets[1]} every {period:g} s")
        client = tb.popen(tb.edge, [sys.executable, "-c", DEMO_CLIENT, l1.server4, "9000",
                                    str(rate), str(seconds)], stdout=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        i = 0
        while client.poll() is None:
            time.sleep(0.1)
            if time.monotonic() - t0 >= period * (i + 1) and time.monotonic() - t0 < seconds:
                i += 1
                write_cfg(i % 2)
                os.kill(daemon.pid, signal.SIGHUP)
                typer.echo(f"demo: switched to {targets[i % 2]}")
        assert client.stdout is not None
        typer.echo(client.stdout.read().strip())
        daemon.send_signal(signal.SIGTERM)
        with contextlib.suppress(Exception):
            daemon.wait(5)
        server.terminate()

"""The paper's switching experiment (its Figure 1) on the netns testbed.

An unmodified UDP application in the edge namespace sends datagrams at a fixed rate to a
virtual destination. ``vstack run`` (a real daemon: TUN, routes, datapath) carries the flow
to the UDP server or, through the DCCP stack, to the DCCP server, both in the server
namespace (``vstack serve udp`` / ``vstack serve dccp``, sinks counting packets per 10 ms).
Every ``period`` seconds the flow is switched between the two through the daemon's control
socket (what ``vstack switch`` does; a configuration reload with SIGHUP when there is no
control socket): the datapath switches the live flow between two packets. The
first switch to DCCP builds the stack (the handshake); later ones reuse the cached stack.

:func:`run_switch_scenario` runs it on an existing :class:`~vstack.testbed.Testbed` (what
``vstack demo`` calls); :func:`analyse` turns the servers' CSVs and the switch times into
the figures; :func:`plot` draws the Figure-1 style PNG.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vstack.testbed import wait_line

BIN_S = 0.010

APP = r"""
import socket, sys, time
dst, port, rate, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
size = int(sys.argv[5])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.connect((dst, port))
pad = b"x" * max(0, size - 8)
print("app ready", flush=True)
sent = 0
t0 = time.monotonic()
nxt = t0
while True:
    now = time.monotonic()
    if now - t0 >= secs:
        break
    while nxt <= now:
        try:
            s.send(sent.to_bytes(8, "big") + pad)
            sent += 1
        except OSError:
            pass
        nxt += 1.0 / rate
    time.sleep(max(0.0, min(nxt - time.monotonic(), 0.002)))
print(f"app sent {sent} t0={t0:.6f} t1={time.monotonic():.6f}", flush=True)
"""


@dataclass(slots=True)
class Switch:
    t: float  # CLOCK_MONOTONIC seconds when the switch was requested
    to: str  # "udp" or "dccp"
    cached: bool


@dataclass(slots=True)
class SwitchRun:
    sent: int = 0
    t0: float = 0.0
    t1: float = 0.0
    switches: list[Switch] = field(default_factory=list)
    udp_csv: str = ""
    dccp_csv: str = ""
    daemon_log: str = ""
    rate: float = 0.0  # the app's datagrams per second


class _Control:
    """A minimal client of the daemon's control socket (JSON lines, ``vstack.control``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._file: Any = None
        self._id = 0

    def call(self, method: str, params: dict[str, Any] | None = None,
             timeout: float = 3.0) -> Any:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(self.path)
            self._sock, self._file = s, s.makefile("rwb")
        self._id += 1
        req = {"id": self._id, "method": method, "params": params or {}}
        self._file.write(json.dumps(req).encode() + b"\n")
        self._file.flush()
        resp = json.loads(self._file.readline() or b"{}")
        if not resp.get("ok"):
            raise RuntimeError(f"control {method}: {resp.get('error')}")
        return resp.get("result")

    def find_flow(self, suffix: str, timeout: float = 5.0) -> str | None:
        """The key of the first flow whose key ends with ``suffix`` ("->addr:port")."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                for f in self.call("flows").get("flows", []):
                    if str(f.get("flow", "")).endswith(suffix):
                        return str(f["flow"])
            time.sleep(0.05)
        return None

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._file.close()
                self._sock.close()
            self._sock = None


def _config(name: str, vdst: str, udp_target: str, dccp_target: str, stack: str,
            transport: str, control: str, rules: str = "") -> str:
    return (f'[vnic]\nname = "{name}"\n'
            f'[control]\nsocket = "{control}"\n'
            f'[execution]\ndefault_stack = "{stack}"\nmetrics_interval_s = 1.0\n'
            f'[nat."{vdst}"]\nudp = "{udp_target}"\ndccp = "{dccp_target}"\n'
            f'[stacks.dccp]\ntransport = "{transport}"\n'
            + (f'[decision]\nrules = "{rules}"\n' if rules else ""))


PAPER_RULES = Path(__file__).resolve().parents[2] / "rules" / "paper.rules"


def _rules_with_period(src: Path, period: float, dst: Path) -> Path:
    """A copy of ``src`` whose ``param period`` is ``period`` seconds (the demo's
    --period); the rules themselves are unchanged."""
    text = re.sub(r"(?m)^param period = .*$", f"param period = {period:g}s", src.read_text())
    dst.write_text(text)
    return dst


_SWITCHED = re.compile(r"flow \S+ switched (\w+) -> (\w+)")


def run_switch_scenario(tb: Any, out_dir: str | Path, *, seconds: float = 30.0,
                        period: float = 5.0, rate: float = 1000.0, size: int = 200,
                        transport: str = "raw",
                        echo: Callable[[str], None] | None = None,
                        live_counts: bool = False, ipv6: bool = False,
                        rules: Path | None = None) -> SwitchRun:
    """Run the experiment on testbed ``tb`` (edge + server namespaces); CSVs go to
    ``out_dir``. ``echo`` receives progress lines (the demo prints them); with
    ``live_counts`` also each server's per-second counts as they come.

    With ``rules`` (e.g. ``rules/paper.rules``) the daemon's rule engine switches the flow
    by its own timer (``param period`` set to ``period``) and the switches are read from
    the daemon's log; without, the scenario switches it through the control socket."""
    say = echo or (lambda _m: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    l1 = tb.links[0]
    server = l1.server6 if ipv6 else l1.server4
    host = f"[{server}]" if ipv6 else server
    vdst = f"{host}:9000"
    udp_t, dccp_t = f"{host}:7000", f"{host}:7001"
    run = SwitchRun(udp_csv=str(out / "udp.csv"), dccp_csv=str(out / "dccp.csv"), rate=rate)
    py = sys.executable
    lim = str(seconds + 30)
    udp_srv = tb.popen(tb.server, [py, "-m", "vstack", "serve", "udp", "--port", "7000",
                                   "--bind", server, "--csv", run.udp_csv,
                                   "--seconds", lim],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dccp_args = [py, "-m", "vstack", "serve", "dccp", "--port", "7001", "--bind", server,
                 "--csv", run.dccp_csv, "--seconds", lim]
    if transport == "udp":
        dccp_args.append("--udp-encap")
    dccp_srv = tb.popen(tb.server, dccp_args, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)
    procs = [udp_srv, dccp_srv]
    daemon_lines: list[str] = []
    server_lines: dict[str, list[str]] = {"udp": [], "dccp": []}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "vstack.toml"
        ctl_path = str(Path(tmp) / "control.sock")
        ctl = _Control(ctl_path)
        name = f"vb{secrets.token_hex(3)}"
        stacks = ["udp", "dccp"]

        rules_path = ""
        if rules is not None:
            rules_path = str(_rules_with_period(rules, period, Path(tmp) / rules.name))

        def write_cfg(stack: str) -> None:
            tmpf = cfg.with_suffix(".tmp")
            tmpf.write_text(_config(name, vdst, udp_t, dccp_t, stack, transport, ctl_path,
                                    rules_path))
            os.replace(tmpf, cfg)

        write_cfg("udp")
        try:
            wait_line(udp_srv, "ready", 20)
            wait_line(dccp_srv, "ready", 20)
            daemon = tb.popen(tb.edge, [py, "-m", "vstack", "run", "--config", str(cfg)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(daemon)
            wait_line(daemon, "vstack ready", 30, daemon_lines)

            def pump(p: subprocess.Popen[str], into: list[str], live: bool) -> None:
                assert p.stdout is not None
                for line in p.stdout:
                    into.append(line)
                    if live:
                        say(f"  {line.rstrip()}")

            say(f"switch: app -> {vdst} through vstack; udp -> {udp_t}, dccp -> {dccp_t} "
                f"({transport}); switching every {period:g} s for {seconds:g} s at "
                f"{rate:g} pkt/s")
            threading.Thread(target=pump, args=(daemon, daemon_lines, False),
                             daemon=True).start()
            for name, p in (("udp", udp_srv), ("dccp", dccp_srv)):
                threading.Thread(target=pump, args=(p, server_lines[name], live_counts),
                                 daemon=True).start()
            app = tb.popen(tb.edge, [py, "-c", APP, server, "9000", str(rate),
                                     str(seconds), str(size)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(app)
            wait_line(app, "app ready", 20)
            t_start = time.monotonic()
            # switch through the control socket (vstack switch): the daemon does nothing
            # else then; without it, a reloaded configuration (SIGHUP) does the same
            seen = {"udp"}  # the flow starts on UDP: that stack exists from the start
            if rules is not None:
                say(f"switch: by the rule engine ({rules.name}, period {period:g} s)")
                _follow_rule_switches(app, daemon_lines, run, seen, t_start, seconds, say)
            flow = None if rules is not None else ctl.find_flow(f"->{vdst}")
            if rules is None:
                say(f"switch: flow {flow} via the control socket" if flow else
                    "switch: no control socket; switching by configuration reload (SIGHUP)")
            i = 0
            while rules is None and app.poll() is None:
                now = time.monotonic()
                if now - t_start >= period * (i + 1) and now - t_start < seconds - 0.5:
                    i += 1
                    to = stacks[i % 2]
                    write_cfg(to)  # new flows (and a SIGHUP) follow the same choice
                    run.switches.append(Switch(time.monotonic(), to, to in seen))
                    if flow is not None:
                        try:
                            ctl.call("switch", {"flow": flow, "stack": to})
                        except (OSError, RuntimeError, ValueError) as e:
                            say(f"switch: control socket failed ({e}); using SIGHUP")
                            flow = None
                            os.kill(daemon.pid, signal.SIGHUP)
                    else:
                        os.kill(daemon.pid, signal.SIGHUP)
                    seen.add(to)
                    say(f"switch: t={now - t_start:5.1f}s -> {to}"
                        f"{' (cached stack)' if run.switches[-1].cached else ' (new stack)'}")
                time.sleep(0.005)
            assert app.stdout is not None
            line = app.stdout.read()
            for tok in line.split():
                k, _, v = tok.partition("=")
                if k == "t0":
                    run.t0 = float(v)
                elif k == "t1":
                    run.t1 = float(v)
            parts = line.split()
            if "sent" in parts:
                run.sent = int(parts[parts.index("sent") + 1])
            time.sleep(1.0)  # let the tail of the flow arrive
        finally:
            ctl.close()
            for p in reversed(procs):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in reversed(procs):
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            run.daemon_log = "".join(daemon_lines)
    time.sleep(0.2)  # the pump threads read the servers' last lines
    for name in ("udp", "dccp"):
        done = [ln for ln in server_lines[name] if " done " in ln]
        if done and not live_counts:
            say(done[-1].strip())
    return run


def _follow_rule_switches(app: subprocess.Popen[str], daemon_lines: list[str],
                          run: SwitchRun, seen: set[str], t_start: float, seconds: float,
                          say: Callable[[str], None]) -> None:
    """Until the app ends, record each switch the daemon logs (``flow ... switched A -> B``)
    at the time it is seen (the gap analysis locates it precisely from the servers' bins).
    A switch in the app's last half second has no traffic after it and is not counted."""
    done = 0
    while app.poll() is None:
        while done < len(daemon_lines):
            m = _SWITCHED.search(daemon_lines[done])
            done += 1
            if m is None:
                continue
            to = m.group(2)
            now = time.monotonic()
            if now - t_start >= seconds - 0.5:
                continue
            run.switches.append(Switch(now, to, to in seen))
            seen.add(to)
            say(f"switch: t={now - t_start:5.1f}s -> {to}"
                f"{' (cached stack)' if run.switches[-1].cached else ' (new stack)'}")
        time.sleep(0.005)


# ------------------------------------------------------------------------------ analysis
def _bins(path: str) -> dict[int, int]:
    return _read(path)[0]


def _read(path: str) -> tuple[dict[int, int], dict[int, tuple[float, float]]]:
    """{bin: packets} and {bin: (first, last arrival)} from a server's CSV."""
    counts: dict[int, int] = {}
    times: dict[int, tuple[float, float]] = {}
    with contextlib.suppress(FileNotFoundError), open(path, newline="") as f:
        for row in csv.DictReader(f):
            k = round(float(row["t_mono"]) / BIN_S)
            counts[k] = int(row["packets"])
            if row.get("first"):
                times[k] = (float(row["first"]), float(row["last"]))
    return counts, times


def _precise_gap(t_switch: float, new: dict[int, tuple[float, float]],
                 old: dict[int, tuple[float, float]], interval: float,
                 horizon: float = 2.0) -> float | None:
    """Milliseconds between the old server's last packet and the new server's first at a
    switch, less the app's own packet interval (0 when nothing was late). None without the
    arrival times (an old CSV)."""
    k0 = int(t_switch / BIN_S)
    kn = [k for k in range(k0 - 1, k0 + int(horizon / BIN_S)) if k in new]
    if not kn:
        return None
    first_new = new[kn[0]][0]
    lasts = [old[k][1] for k in range(k0 - int(horizon / BIN_S), kn[0] + 1)
             if k in old and old[k][1] <= first_new]
    if not lasts:
        return None
    return round(max(0.0, (first_new - max(lasts) - interval) * 1000), 1)


@dataclass(slots=True)
class SwitchFigures:
    sent: int
    received_udp: int
    received_dccp: int
    lost: int
    switches: int
    first_switch_gap_ms: float
    cached_switch_gap_ms: float
    switch_gaps_ms: list[float]
    empty_bins: int
    udp_pps: float
    dccp_pps: float
    dccp_udp_ratio: float
    csv: str
    png: str = ""
    handshake_ms: float = -1.0  # the DCCP stack's own measure (daemon log), -1: not seen

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _gap_after(k_switch: int, new: dict[int, int], old: dict[int, int],
               horizon: int = 200) -> float:
    """Milliseconds of silence at a switch: the empty bins between the old server's last
    bin with packets and the new server's first (both near the switch)."""
    first_new = None
    for k in range(k_switch - 1, k_switch + horizon):
        if new.get(k, 0):
            first_new = k
            break
    if first_new is None:
        return float(horizon * BIN_S * 1000)
    last_old = k_switch - 1
    for k in range(first_new - 1, k_switch - horizon, -1):
        if old.get(k, 0):
            last_old = k
            break
    return max(0.0, (first_new - last_old - 1) * BIN_S * 1000)


def analyse(run: SwitchRun, out_dir: str | Path) -> SwitchFigures:
    (udp, udp_t), (dccp, dccp_t) = _read(run.udp_csv), _read(run.dccp_csv)
    keys = sorted(set(udp) | set(dccp))
    out = Path(out_dir)
    combined = out / "switch.csv"
    lo = min(keys) if keys else 0
    hi = max(keys) if keys else -1
    with open(combined, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "udp", "dccp"])
        for k in range(lo, hi + 1):
            w.writerow([f"{(k - lo) * BIN_S:.2f}", udp.get(k, 0), dccp.get(k, 0)])
    gaps: list[float] = []
    for sw in run.switches:
        k = int(sw.t / BIN_S)
        new, old = (dccp, udp) if sw.to == "dccp" else (udp, dccp)
        new_t, old_t = (dccp_t, udp_t) if sw.to == "dccp" else (udp_t, dccp_t)
        precise = _precise_gap(sw.t, new_t, old_t, 1.0 / run.rate if run.rate else 0.0)
        gaps.append(precise if precise is not None else _gap_after(k, new, old))
    first = gaps[0] if gaps else 0.0
    cached = max(gaps[1:]) if len(gaps) > 1 else 0.0
    # empty 10 ms bins while the app was sending (skip the first and last 100 ms)
    k0, k1 = int(run.t0 / BIN_S) + 10, int(run.t1 / BIN_S) - 10
    empty = sum(1 for k in range(k0, k1) if not udp.get(k, 0) and not dccp.get(k, 0))
    # goodput per stack: packets per second at each server while it was the active one
    # (each interval between switches, minus 300 ms after the switch for the handshake)
    edges = [run.t0, *(s.t for s in run.switches), run.t1]
    active = ["udp", *(s.to for s in run.switches)]
    pk = {"udp": 0.0, "dccp": 0.0}
    dur = {"udp": 0.0, "dccp": 0.0}
    for j, stack in enumerate(active):
        a, b = edges[j] + 0.3, edges[j + 1]
        if b - a <= 0.5:
            continue
        src = udp if stack == "udp" else dccp
        pk[stack] += sum(src.get(k, 0) for k in range(int(a / BIN_S), int(b / BIN_S)))
        dur[stack] += (int(b / BIN_S) - int(a / BIN_S)) * BIN_S
    udp_pps = pk["udp"] / dur["udp"] if dur["udp"] else 0.0
    dccp_pps = pk["dccp"] / dur["dccp"] if dur["dccp"] else 0.0
    ru, rd = sum(udp.values()), sum(dccp.values())
    m = re.search(r"open \(CCID \d+\) after ([0-9.]+) ms", run.daemon_log)
    return SwitchFigures(
        handshake_ms=float(m.group(1)) if m else -1.0,
        sent=run.sent, received_udp=ru, received_dccp=rd, lost=max(0, run.sent - ru - rd),
        switches=len(run.switches), first_switch_gap_ms=first, cached_switch_gap_ms=cached,
        switch_gaps_ms=gaps, empty_bins=empty, udp_pps=round(udp_pps, 1),
        dccp_pps=round(dccp_pps, 1),
        dccp_udp_ratio=round(dccp_pps / udp_pps, 3) if udp_pps else 0.0, csv=str(combined))


def plot(figs: SwitchFigures, run: SwitchRun, png: str | Path) -> str:
    """Packets per 10 ms at each server over time, switches marked (Figure 1's style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts, u, d = [], [], []
    with open(figs.csv, newline="") as f:
        for row in csv.DictReader(f):
            ts.append(float(row["t_s"]))
            u.append(int(row["udp"]))
            d.append(int(row["dccp"]))
    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=120)
    ax.plot(ts, u, lw=0.8, color="tab:blue", label="UDP server")
    ax.plot(ts, d, lw=0.8, color="tab:red", label="DCCP server")
    lo = None
    with contextlib.suppress(Exception):
        lo = min(k for k in (*_bins(run.udp_csv), *_bins(run.dccp_csv))) * BIN_S
    if lo is not None:
        for s in run.switches:
            ax.axvline(s.t - lo, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("time [s]")
    ax.set_ylabel("packets per 10 ms")
    ax.set_title(f"UDP <-> DCCP switching every {_period(run):g} s: lost {figs.lost}, "
                 f"first switch {figs.first_switch_gap_ms:.0f} ms, cached "
                 f"{figs.cached_switch_gap_ms:.0f} ms, DCCP/UDP {figs.dccp_udp_ratio:.2f}",
                 fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return str(png)


def _period(run: SwitchRun) -> float:
    if len(run.switches) >= 2:
        return round(run.switches[1].t - run.switches[0].t, 1)
    return 0.0


def bench_switch(out_dir: str | Path, *, seconds: float = 30.0, period: float = 5.0,
                 rate: float = 1000.0, size: int = 200, transport: str = "raw",
                 echo: Callable[[str], None] | None = None,
                 ipv6: bool = False) -> SwitchFigures:
    """Build a testbed, run the scenario, analyse and plot. Needs root."""
    from vstack.testbed import Testbed

    with Testbed(prefix="vb") as tb:
        run = run_switch_scenario(tb, out_dir, seconds=seconds, period=period, rate=rate,
                                  size=size, transport=transport, echo=echo, ipv6=ipv6)
    figs = analyse(run, out_dir)
    figs.png = plot(figs, run, Path(out_dir) / "switch.png")
    (Path(out_dir) / "daemon.log").write_text(run.daemon_log)
    return figs


def summary_lines(figs: SwitchFigures) -> Sequence[str]:
    return [
        f"sent {figs.sent}, received udp {figs.received_udp} + dccp {figs.received_dccp}, "
        f"lost {figs.lost}",
        f"switches {figs.switches}: gaps (ms) {', '.join(f'{g:.1f}' for g in figs.switch_gaps_ms)}",
        f"first switch gap {figs.first_switch_gap_ms:.1f} ms (DCCP handshake "
        f"{figs.handshake_ms:.1f} ms), cached switch gap {figs.cached_switch_gap_ms:.1f} ms, "
        f"empty 10 ms bins {figs.empty_bins}",
        f"goodput udp {figs.udp_pps:.0f} pkt/s, dccp {figs.dccp_pps:.0f} pkt/s, "
        f"dccp/udp {figs.dccp_udp_ratio:.3f}",
        f"csv {figs.csv}  png {figs.png}",
    ]


def run_demo(tb: Any, *, seconds: float = 20.0, period: float = 5.0, rate: float = 200.0,
             echo: Callable[[str], None] = print) -> SwitchFigures:
    """``vstack demo``'s DCCP scenario on the demo's testbed ``tb``: the app's UDP flow
    switches UDP <-> DCCP every ``period`` s; per-second counts of both servers are echoed
    live, then the summary. Files go to a temporary folder that is removed."""
    with tempfile.TemporaryDirectory(prefix="vstack-demo-") as tmp:
        rules = PAPER_RULES if PAPER_RULES.is_file() else None
        run = run_switch_scenario(tb, tmp, seconds=seconds, period=period, rate=rate,
                                  echo=echo, live_counts=True, rules=rules)
        figs = analyse(run, tmp)
        for line in summary_lines(figs)[:-1]:
            echo(f"demo: {line}")
    return figs

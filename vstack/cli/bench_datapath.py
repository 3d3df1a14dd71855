"""``vstack bench throughput``: goodput through vstack against the direct kernel path.

On a fresh netns testbed, a generator in the edge namespace sends 1500-byte IP packets
(1472 B of UDP payload) for N seconds to a sink in the server namespace, alternately

* **vstack**: through the VNIC (a real ``vstack run`` process, UDP stack), and
* **direct**: the same generator with ``SO_MARK`` = the VNIC's fwmark, so its packets
  bypass the TUN and take the kernel path straight to the veth,

and reports the median of ``--runs`` runs each: goodput at the sink (UDP payload bits per
second, and datagrams per second), loss (1 - received/sent), vstack's CPU% (user+system
of the daemon process over the run) and the ratio vstack/direct. It also prints the CPU
time per delivered datagram of vstack (vstack runs) and of the generator (direct runs,
whose ``send`` does the whole kernel path): on a loaded host, where every process gets
a fair share of the cores, the goodput ratio measures the scheduler as much as vstack;
``cpu_ratio`` says what each path costs per datagram.

The sink is a UDP socket in the server namespace that is bound and never read: the
kernel's UDP MIB of that namespace counts every datagram that reached it (``InDatagrams``
queued + ``RcvbufErrors`` dropped for a full buffer). Every datagram pays the receiver's
full UDP input path (a UDP GSO super-packet is cut into its datagrams before it is
counted), and no receiving process competes with the generator and vstack for this
machine's two cores.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from vstack.cli.app import bench_app

SINK_PORT = 5201
PAYLOAD = 1472

GENERATOR = r"""
import json, socket, sys, time
dst, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
mark, size = int(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
if mark:
    s.setsockopt(socket.SOL_SOCKET, 36, mark)  # SO_MARK: bypass the VNIC
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
s.connect((dst, port))
buf = bytes(size)
send = s.send
n = errors = 0
clock = time.perf_counter
t0 = clock()
end = t0 + secs
while True:
    for _ in range(512):
        try:
            send(buf)
        except OSError:
            errors += 1
    n += 512
    if clock() >= end:
        break
el = clock() - t0
import resource
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"sent": n - errors, "errors": errors, "elapsed": el,
                  "cpu_s": ru.ru_utime + ru.ru_stime}), flush=True)
"""

SINK = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
time.sleep(1e9)
"""


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _sink_counter(tb: Any) -> tuple[int, int]:
    """Datagrams that reached UDP sockets in the server netns (IPv4 + IPv6 MIBs)."""
    total = 0
    for path, sect in (("/proc/net/snmp", "Udp:"), ("/proc/net/snmp6", "Udp6")):
        text = tb.run(tb.server, ["cat", path]).stdout
        if sect == "Udp:":
            rows = [ln.split() for ln in text.splitlines() if ln.startswith("Udp:")]
            mib = dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=True))
        else:
            mib = {}
            for ln in text.splitlines():
                k, _, v = ln.partition(" ")
                if k.startswith("Udp6"):
                    mib[k[4:]] = int(v.strip())
        total += mib.get("InDatagrams", 0) + mib.get("RcvbufErrors", 0)
    return total, 0


def _measure(tb: Any, argv: list[str], seconds: float, ticks: Callable[[], int], size: int,
             vstack: bool,
             counter: Callable[[Any], tuple[int, int]] | None = None) -> dict[str, float]:
    """Run the generator ``argv`` (it prints one JSON line) in the edge netns; count what
    reached the sink (``counter``, default the server netns' UDP MIB) and the CPU ticks
    ``ticks()`` (vstack's) over the run. Shared by ``bench throughput`` and its issue 6
    variants (``bench_speed``)."""
    sink_count = counter or _sink_counter
    clk = os.sysconf("SC_CLK_TCK")
    p0, _ = sink_count(tb)
    c0 = ticks()
    t0 = time.monotonic()
    g = tb.run(tb.edge, argv, timeout=seconds + 60)
    time.sleep(0.3)  # let the last packets drain through vstack
    wall = time.monotonic() - t0
    c1 = ticks()
    p1, _ = sink_count(tb)
    gen = json.loads(g.stdout.strip().splitlines()[-1])
    got = p1 - p0
    el = gen["elapsed"]
    return {
        "gbps": got * size * 8 / el / 1e9,
        "pps": got / el,
        "sent": gen["sent"],
        "received": got,
        "loss": max(0.0, 1 - got / gen["sent"]) if gen["sent"] else 0.0,
        "cpu": (c1 - c0) / clk / wall * 100 if vstack else 0.0,
        "gen_cpu": gen["cpu_s"] / el * 100,
        # CPU time per datagram delivered: vstack's own (vstack runs), the generator's
        # (direct runs: its send does the whole kernel path, receiver included)
        "us_per_pkt": ((c1 - c0) / clk if vstack else gen["cpu_s"]) / max(got, 1) * 1e6,
    }


def _one_run(tb: Any, mode: str, seconds: float, fwmark: int, daemon_pid: int,
             dst: str) -> dict[str, float]:
    argv = [sys.executable, "-c", GENERATOR, dst, str(SINK_PORT), str(seconds),
            str(fwmark if mode == "direct" else 0), str(PAYLOAD)]
    return _measure(tb, argv, seconds, lambda: _cpu_ticks(daemon_pid), PAYLOAD,
                    mode != "direct")



def echo_summary(out: dict[str, Any], runs: int, detail: str = "") -> None:
    """The direct / vstack / ratio lines of a throughput result (``detail``: after
    vstack's CPU, e.g. the stack and the sender)."""
    typer.echo(f"direct : {out['direct_gbps']:.2f} Gbit/s {out['direct_pps'] / 1e3:.1f} kpps "
               f"loss {out['direct_loss'] * 100:.1f}%")
    typer.echo(f"vstack : {out['vstack_gbps']:.2f} Gbit/s {out['vstack_pps'] / 1e3:.1f} kpps "
               f"loss {out['loss'] * 100:.1f}%  CPU {out['vstack_cpu_pct']:.0f}%{detail}")
    typer.echo(f"ratio  : {out['ratio']:.3f} (vstack / direct, medians of {runs} runs)")

@bench_app.command("throughput")
def throughput(
    seconds: float = typer.Option(5.0, "--seconds", help="length of each run"),
    runs: int = typer.Option(3, "--runs", help="runs per path (alternating), >= 1"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    ipv6: bool = typer.Option(False, "--ipv6", help="send over IPv6 (1452 B payload)"),
    nice: int = typer.Option(-10, "--nice", help="the daemon's execution.nice (priority "
                             "over the generator, as the kernel's forwarding has); 0: none"),
    sender: str = typer.Option("datagram", "--sender", help="datagram: one send per "
                               "datagram; gso: UDP_SEGMENT super-packets (issue 6); mmsg: "
                               "64 datagrams per sendmmsg (a cheaper per-datagram sender)"),
    stack: str = typer.Option("udp", "--stack", help="udp, or dccp (alternating with udp)"),
    workers: str = typer.Option("1", "--workers", help="vstack worker processes (TUN "
                                "queues); N,M: both, alternating in one invocation"),
    flows: int = typer.Option(1, "--flows", help="generator flows (round robin)"),
    payload: int = typer.Option(0, "--payload", help="datagram payload (0: 1472, dccp 1400)"),
) -> None:
    """Goodput of 1500-byte packets through vstack vs. the direct kernel path."""
    from vstack.testbed import Testbed, TestbedError

    try:
        counts = [int(w) for w in workers.split(",")]
    except ValueError:
        typer.echo(f"vstack: error: --workers: N or N,M,..., not {workers!r}", err=True)
        raise typer.Exit(2) from None
    if len(counts) > 1:
        from vstack.cli.bench_speed import run_workers_ratio

        run_workers_ratio(seconds=seconds, runs=runs, as_json=as_json, ipv6=ipv6, nice=nice,
                          sender=sender, counts=counts, flows=flows, payload=payload)
        return
    if (sender, stack, counts[0], flows, payload) != ("datagram", "udp", 1, 1, 0):
        from vstack.cli.bench_speed import run_throughput  # issue 6 variants

        run_throughput(seconds=seconds, runs=runs, as_json=as_json, ipv6=ipv6, nice=nice,
                       sender=sender, stack=stack, workers=counts[0], flows=flows,
                       payload=payload)
        return

    global PAYLOAD
    if runs < 1 or seconds <= 0:
        typer.echo("vstack: error: --runs must be >= 1 and --seconds > 0", err=True)
        raise typer.Exit(2)
    if ipv6:
        PAYLOAD = 1452
    try:
        tb = Testbed(prefix="vb")
    except TestbedError as e:
        typer.echo(f"vstack: error: {e}", err=True)
        raise typer.Exit(1) from None
    with tb, tempfile.TemporaryDirectory() as tmp:
        sink = tb.popen(tb.server, [sys.executable, "-c", SINK, str(SINK_PORT)],
                        stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        cfg = Path(tmp) / "bench.toml"
        cfg.write_text('[vnic]\nname = "vstk0"\nqueues = 1\n[execution]\nmetrics_interval_s = 1.0\n'
                       f"nice = {nice}\n")
        log = (Path(tmp) / "daemon.log").open("w+")
        daemon = tb.popen(tb.edge, [sys.executable, "-m", "vstack", "run", "--config",
                                    str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while "vstack ready" not in Path(log.name).read_text():
            if daemon.poll() is not None or time.monotonic() > deadline:
                typer.echo("vstack: error: the daemon did not start:\n"
                           + Path(log.name).read_text()[-2000:], err=True)
                raise typer.Exit(1)
            time.sleep(0.05)
        link = tb.links[0]
        dst = link.server6 if ipv6 else link.server4
        res: dict[str, list[dict[str, float]]] = {"direct": [], "vstack": []}
        # warm-up: creates the flow (first packet takes the slow path) outside the figures
        _one_run(tb, "vstack", 0.5, 0x5654, daemon.pid, dst)
        for i in range(runs):
            order = ("direct", "vstack") if i % 2 == 0 else ("vstack", "direct")
            for mode in order:
                r = _one_run(tb, mode, seconds, 0x5654, daemon.pid, dst)
                res[mode].append(r)
                if not as_json:
                    typer.echo(f"run {i + 1} {mode:6s}: {r['gbps']:6.2f} Gbit/s "
                               f"{r['pps'] / 1e3:7.1f} kpps loss {r['loss'] * 100:5.1f}%"
                               + (f" vstack CPU {r['cpu']:5.1f}%" if mode == "vstack" else ""))
        daemon.terminate()
        daemon.wait(10)

    def med(mode: str, k: str) -> float:
        return statistics.median(r[k] for r in res[mode])

    out = {
        "direct_gbps": round(med("direct", "gbps"), 3),
        "vstack_gbps": round(med("vstack", "gbps"), 3),
        "direct_pps": round(med("direct", "pps")),
        "vstack_pps": round(med("vstack", "pps")),
        "ratio": round(med("vstack", "gbps") / max(med("direct", "gbps"), 1e-9), 3),
        "loss": round(med("vstack", "loss"), 4),
        "direct_loss": round(med("direct", "loss"), 4),
        "vstack_cpu_pct": round(med("vstack", "cpu"), 1),
        "vstack_cpu_us_per_pkt": round(med("vstack", "us_per_pkt"), 2),
        "direct_cpu_us_per_pkt": round(med("direct", "us_per_pkt"), 2),
        # if each path had a core of its own: the ratio of the per-datagram CPU costs
        "cpu_ratio": round(med("direct", "us_per_pkt") / max(med("vstack", "us_per_pkt"),
                                                              1e-9), 3),
        "runs": runs,
        "seconds": seconds,
        "payload_bytes": PAYLOAD,
        "family": 6 if ipv6 else 4,
        "nice": nice,
    }
    if as_json:
        typer.echo(json.dumps(out))
        return
    echo_summary(out, runs)
    typer.echo(f"CPU per datagram: vstack {out['vstack_cpu_us_per_pkt']:.2f} us, direct "
               f"generator {out['direct_cpu_us_per_pkt']:.2f} us (ratio {out['cpu_ratio']:.2f})")

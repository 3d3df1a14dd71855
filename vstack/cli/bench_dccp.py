"""``vstack bench switch``: the paper's UDP <-> DCCP switching experiment (Figure 1).

Importing this module also registers the ``dccp`` stack with the stack engine, so every
``vstack`` command (``vstack run`` included) can carry flows over DCCP.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import typer

from vstack.cli.app import bench_app


@bench_app.command("switch")
def bench_switch(
    seconds: float = typer.Option(30.0, "--seconds", min=6.0, help="how long the app sends"),
    period: float = typer.Option(5.0, "--period", min=1.0, help="switch every PERIOD s"),
    rate: float = typer.Option(1000.0, "--rate", min=10.0, help="app datagrams per second"),
    size: int = typer.Option(200, "--size", min=8, max=1400, help="UDP payload bytes"),
    transport: str = typer.Option("raw", "--transport", help="DCCP transport: raw or udp"),
    ipv6: bool = typer.Option(False, "--ipv6", help="the app's flow and both servers on IPv6"),
    out: Path | None = typer.Option(None, "--out", help="folder for CSV/PNG (default: temp)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Switch an app's UDP flow between the UDP and the DCCP server every PERIOD s; report
    packets per 10 ms (CSV + PNG), loss, the gaps at the first and at cached switches, and
    DCCP/UDP goodput."""
    from vstack.dccp.experiment import bench_switch as run_bench
    from vstack.dccp.experiment import summary_lines

    if os.geteuid() != 0:
        typer.echo("vstack bench switch: needs root (network namespaces, TUN)", err=True)
        raise typer.Exit(1)
    if transport not in ("raw", "udp"):
        typer.echo("vstack bench switch: --transport must be raw or udp", err=True)
        raise typer.Exit(2)
    out_dir = out or Path(tempfile.mkdtemp(prefix="vstack-switch-"))
    echo = None if as_json else typer.echo
    try:
        figs = run_bench(out_dir, seconds=seconds, period=period, rate=rate, size=size,
                         transport=transport, echo=echo, ipv6=ipv6)
    except (RuntimeError, OSError) as e:
        typer.echo(f"vstack bench switch: {e}", err=True)
        raise typer.Exit(1) from e
    if as_json:
        from dataclasses import asdict

        typer.echo(json.dumps(asdict(figs)))
    else:
        for line in summary_lines(figs):
            typer.echo(line)


# The sending end of ``bench dccp``: a DccpClient in the edge netns that keeps the
# connection's queue full for SECONDS and prints CCID2's view as one JSON line.
_DCCP_CLIENT = r"""
import asyncio, json, statistics, sys, time
from vstack.dccp.ccid2 import Ccid2Config
from vstack.dccp.endpoint import DccpClient
dst, port, secs, transport, window, ratio, size = sys.argv[1:8]
async def main():
    opts = {}
    if int(window):
        opts["sequence_window"] = int(window)
    if int(ratio):
        opts["ccid2"] = Ccid2Config(max_ack_ratio=int(ratio))
    c = DccpClient((dst, int(port)), transport=transport, conn_options=opts)
    await c.open(10)
    payload = bytes(int(size))
    cc, st = c.conn.ccid, c.conn.stats
    t0 = time.monotonic()
    end = t0 + float(secs)
    cwnd, pipe = [], []
    while time.monotonic() < end:
        while c.send(payload):
            pass
        await asyncio.sleep(0)
        cwnd.append(cc.cwnd)
        pipe.append(cc.pipe)
    el = time.monotonic() - t0
    ss = c.sock.stats
    print(json.dumps({
        "sent_pps": round(st.data_sent / el), "elapsed": el, "data_sent": st.data_sent,
        "cwnd_median": statistics.median(cwnd), "pipe_median": statistics.median(pipe),
        "cwnd_max": cc.config.max_cwnd, "srtt_ms": round((cc.srtt or 0) * 1e3, 2),
        "rto_s": cc.rto, "acked": cc.stats.acked, "lost": cc.stats.lost,
        "reductions": cc.stats.reductions, "timeouts": cc.stats.timeouts,
        "acks_received": st.packets_received,
        "data_per_ack": round(st.data_sent / max(1, st.packets_received), 1),
        "ack_ratio": int(c.conn.features.local[5]),
        "out_of_window": st.out_of_window, "syncs_sent": st.syncs_sent,
        "send_refused_queue_full": st.send_dropped,
        "tx_gso_sendmsgs": ss.tx_gso, "tx_drops": ss.tx_drops}), flush=True)
    c.close()
    await asyncio.sleep(0.3)
    c.release()
asyncio.run(main())
"""


@bench_app.command("dccp")
def bench_dccp(
    seconds: float = typer.Option(3.0, "--seconds", min=0.5, help="how long the client sends"),
    transport: str = typer.Option("udp", "--transport", help="DCCP transport: udp or raw"),
    window: int = typer.Option(0, "--window", min=0,
                               help="client's Sequence Window (0: the endpoint default)"),
    ack_ratio: int = typer.Option(0, "--ack-ratio", min=0,
                                  help="CCID2 max Ack Ratio (0: the endpoint default)"),
    size: int = typer.Option(1400, "--size", min=1, max=1400, help="payload bytes"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """The DCCP path alone, no TUN and no application: a DCCP client that keeps its
    queue full, in the edge netns, to ``vstack serve dccp`` in the server netns; reports
    packets/s sent and received and CCID2's state (cwnd, pipe, RTT, acks, losses)."""
    import subprocess
    import sys
    import time

    from vstack.testbed import Testbed, TestbedError

    if os.geteuid() != 0:
        typer.echo("vstack bench dccp: needs root (network namespaces)", err=True)
        raise typer.Exit(1)
    if transport not in ("raw", "udp"):
        typer.echo("vstack bench dccp: --transport must be raw or udp", err=True)
        raise typer.Exit(2)
    load0 = os.getloadavg()[0]
    try:
        tb = Testbed(prefix="vq")
    except TestbedError as e:
        typer.echo(f"vstack bench dccp: {e}", err=True)
        raise typer.Exit(1) from None
    with tb, tempfile.TemporaryDirectory() as tmp:
        dst = tb.links[0].server4
        count = Path(tmp) / "count"
        srv = tb.popen(tb.server, [sys.executable, "-m", "vstack", "serve", "dccp", "--port",
                                   "5203", "--count-file", str(count)]
                       + (["--udp-encap"] if transport == "udp" else []),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.5)
            cl = tb.run(tb.edge, [sys.executable, "-c", _DCCP_CLIENT, dst, "5203",
                                  str(seconds), transport, str(window), str(ack_ratio),
                                  str(size)], timeout=seconds + 60)
            time.sleep(0.3)
            out = json.loads(cl.stdout.strip().splitlines()[-1])
            got = int(count.read_text().split()[0]) if count.exists() else 0
        finally:
            srv.terminate()
            srv.wait(10)
    out["received_pps"] = round(got / out["elapsed"])
    out["gbps"] = round(got * size * 8 / out["elapsed"] / 1e9, 3)
    out["transport"] = transport
    out["loadavg_start"] = round(load0, 2)
    out["loadavg_end"] = round(os.getloadavg()[0], 2)
    if as_json:
        typer.echo(json.dumps(out))
        return
    for k, v in out.items():
        typer.echo(f"{k:24s} {v}")

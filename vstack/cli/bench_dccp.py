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

"""``vstack serve udp|dccp``: the paper's two test servers.

Each runs as a *sink* that counts packets per 10 ms (per-second totals on stdout, every
10 ms bin in a CSV with ``--csv``) or as an *echo* that sends each datagram back.

    vstack serve udp  --port 7000 [--echo] [--bind ADDR] [--csv FILE] [--seconds N]
    vstack serve dccp --port 7001 [--echo] [--udp-encap [--udp-port U]] [--bind ADDR] [--csv FILE]

``--udp-encap``: DCCP-UDP (RFC 6773) instead of raw IP protocol 33. The server listens on
UDP port U (``--udp-port``; default the same number as the DCCP port P, an application's
own configured port as §3.8 recommends, rather than the system-wide default 6511), takes
any UDP source port, and carries DCCP port P inside the encapsulation.

The CSV has one row per 10 ms bin from the first packet to the end, empty bins included:
``t_mono,packets,bytes,first,last`` where ``t_mono`` is the bin's start on CLOCK_MONOTONIC
(seconds), which every process on the host shares, so ``vstack bench switch`` can line up
the bins of the UDP and the DCCP server; ``first``/``last`` are the arrival times of the
bin's first and last packet (empty for an empty bin).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from vstack.cli.app import serve_app

BIN_S = 0.010


@dataclass(slots=True)
class BinCounter:
    """Packets and bytes per 10 ms bin, keyed by the bin's index on CLOCK_MONOTONIC, with
    the arrival times of each bin's first and last packet (gaps finer than a bin)."""

    bin_s: float = BIN_S
    bins: dict[int, list[Any]] = field(default_factory=dict)  # [packets, bytes, first, last]
    packets: int = 0
    bytes: int = 0

    def add(self, nbytes: int, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        k = int(t / self.bin_s)
        b = self.bins.get(k)
        if b is None:
            self.bins[k] = [1, nbytes, t, t]
        else:
            b[0] += 1
            b[1] += nbytes
            b[3] = t
        self.packets += 1
        self.bytes += nbytes

    def rows(self) -> list[tuple[float, int, int, float | None, float | None]]:
        """(t_mono, packets, bytes, first, last) for every bin from the first to the last,
        empty ones included (first/last None)."""
        if not self.bins:
            return []
        lo, hi = min(self.bins), max(self.bins)
        out: list[tuple[float, int, int, float | None, float | None]] = []
        for k in range(lo, hi + 1):
            b = self.bins.get(k)
            t = round(k * self.bin_s, 6)
            out.append((t, b[0], b[1], b[2], b[3]) if b else (t, 0, 0, None, None))
        return out

    def write_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t_mono", "packets", "bytes", "first", "last"])
            for t, p, n, first, last in self.rows():
                w.writerow([f"{t:.3f}", p, n, "" if first is None else f"{first:.6f}",
                            "" if last is None else f"{last:.6f}"])


def read_bins_csv(path: str | Path) -> dict[int, int]:
    """A CSV written by :meth:`BinCounter.write_csv` -> {10 ms bin index: packets}."""
    out: dict[int, int] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out[round(float(row["t_mono"]) / BIN_S)] = int(row["packets"])
    return out


# ------------------------------------------------------------------------- UDP server
class UdpServer(asyncio.DatagramProtocol):
    """Sink or echo on a UDP port."""

    def __init__(self, echo: bool, counter: BinCounter) -> None:
        self.echo = echo
        self.counter = counter
        self.transport: asyncio.DatagramTransport | None = None
        self.echo_fail = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.counter.add(len(data))
        if self.echo and self.transport is not None:
            try:
                self.transport.sendto(data, addr)
            except OSError:
                self.echo_fail += 1

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def start_udp_server(port: int, echo: bool = False, bind: str | None = None,
                           counter: BinCounter | None = None,
                           family: int = socket.AF_INET) -> UdpServer:
    loop = asyncio.get_running_loop()
    host = bind or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    if fam == socket.AF_INET6:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, port))
    cnt = counter or BinCounter()
    _t, proto = await loop.create_datagram_endpoint(lambda: UdpServer(echo, cnt), sock=sock)
    return proto


# ------------------------------------------------------------------------ run helpers
async def _report_loop(counter: BinCounter, label: str, stop: asyncio.Event,
                       extra: Callable[[], str] | None = None) -> None:
    last_p, last_b = 0, 0
    t0 = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        p, b = counter.packets, counter.bytes
        more = f" {extra()}" if extra else ""
        print(f"{label} t={time.monotonic() - t0:6.1f}s pkts/s={p - last_p} bytes/s={b - last_b} "
              f"total_pkts={p}{more}", flush=True)
        last_p, last_b = p, b


async def _count_file_loop(counter: BinCounter, path: str, stop: asyncio.Event) -> None:
    """Keep ``path`` holding "packets bytes" (replaced atomically every 100 ms while it
    changes, and at the end): what a benchmark reads before and after a run. The
    application's own count: with UDP_GRO one socket read (one InDatagrams in the UDP
    MIB) carries up to 64 DCCP-UDP packets."""
    last: tuple[int, int] | None = None
    tmp = f"{path}.tmp"
    while True:
        now = (counter.packets, counter.bytes)
        if now != last:
            try:
                Path(tmp).write_text(f"{now[0]} {now[1]}\n")
                os.replace(tmp, path)
            except OSError as e:  # the count is a side channel: the server goes on
                print(f"vstack: warning: --count-file {path}: {e.strerror or e}; "
                      "no longer written", file=sys.stderr, flush=True)
                return
            last = now
        if stop.is_set():
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def _serve(start: Callable[[], Any], counter: BinCounter, label: str, seconds: float,
                 csv_path: str | None, extra_of: Callable[[Any], str] | None = None,
                 count_file: str | None = None) -> Any:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    server = await start()
    print(f"{label} ready", flush=True)
    extra = (lambda: extra_of(server)) if extra_of else None
    reporter = asyncio.create_task(_report_loop(counter, label, stop, extra))
    counting = (asyncio.create_task(_count_file_loop(counter, count_file, stop))
                if count_file else None)
    try:
        if seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)
        else:
            await stop.wait()
    finally:
        stop.set()
        await reporter
        if counting is not None:
            await counting
        server.close()
        if csv_path:
            counter.write_csv(csv_path)
        print(f"{label} done pkts={counter.packets} bytes={counter.bytes}", flush=True)
    return server


@serve_app.command("udp")
def serve_udp(
    port: int = typer.Option(..., "--port", "-p", min=1, max=65535, help="UDP port"),
    echo: bool = typer.Option(False, "--echo", help="echo each datagram instead of a sink"),
    bind: str | None = typer.Option(None, "--bind", help="local address (default: all)"),
    csv_path: str | None = typer.Option(None, "--csv", help="write packets per 10 ms here"),
    seconds: float = typer.Option(0.0, "--seconds", help="stop after N seconds (0: never)"),
) -> None:
    """UDP sink (packets per 10 ms) or echo."""
    counter = BinCounter()
    label = f"udp:{port}{' echo' if echo else ' sink'}"
    try:
        asyncio.run(_serve(lambda: start_udp_server(port, echo, bind, counter),
                           counter, label, seconds, csv_path))
    except OSError as e:
        print(f"vstack serve udp: {e}", file=sys.stderr)
        raise typer.Exit(2) from e


@serve_app.command("dccp")
def serve_dccp(
    port: int = typer.Option(..., "--port", "-p", min=1, max=65535, help="DCCP port"),
    echo: bool = typer.Option(False, "--echo", help="echo each datagram instead of a sink"),
    udp_encap: bool = typer.Option(False, "--udp-encap",
                                   help="DCCP-UDP (RFC 6773) instead of raw IP protocol 33"),
    udp_port: int | None = typer.Option(
        None, "--udp-port", min=1, max=65535,
        help="with --udp-encap: the UDP port to listen on (default: the DCCP port's number)"),
    bind: str | None = typer.Option(None, "--bind", help="local address (default: all)"),
    ipv6: bool = typer.Option(False, "--ipv6", help="IPv6 (implied by an IPv6 --bind)"),
    service: str = typer.Option("0x44434350", "--service", help="service code to accept"),
    csv_path: str | None = typer.Option(None, "--csv", help="write packets per 10 ms here"),
    seconds: float = typer.Option(0.0, "--seconds", help="stop after N seconds (0: never)"),
    count_file: str | None = typer.Option(
        None, "--count-file",
        help="keep 'packets bytes' received in this file (updated every 100 ms)"),
) -> None:
    """DCCP (CCID2) sink or echo on raw IP protocol 33, or DCCP-UDP with --udp-encap."""
    try:
        code = int(service, 0)
    except ValueError as e:
        print(f"vstack serve dccp: bad --service {service!r}", file=sys.stderr)
        raise typer.Exit(2) from e
    if udp_port is not None and not udp_encap:
        print("vstack serve dccp: --udp-port needs --udp-encap", file=sys.stderr)
        raise typer.Exit(2)
    from vstack.dccp.endpoint import DccpServer
    family = socket.AF_INET6 if (ipv6 or (bind and ":" in bind)) else socket.AF_INET
    counter = BinCounter()
    encap = f"/udp:{udp_port or port}" if udp_encap else ""
    label = f"dccp:{port}{encap}{' echo' if echo else ' sink'}"

    async def start() -> DccpServer:
        return await DccpServer.start(port=port, family=family, bind=bind,
                                      transport="udp" if udp_encap else "raw",
                                      service_code=code, echo=echo, counter=counter,
                                      udp_port=udp_port)

    def extra(server: DccpServer) -> str:
        more = f" port_reuse={server.port_reuse}" if udp_encap else ""
        return f"conns={len(server.connections)} accepted={server.accepted}{more}"

    try:
        asyncio.run(_serve(start, counter, label, seconds, csv_path, extra, count_file))
    except OSError as e:
        print(f"vstack serve dccp: {e}", file=sys.stderr)
        raise typer.Exit(2) from e

"""``vstack serve tcp|mptcp|udplite``: servers for the TCP-framed, MPTCP and UDP-Lite stacks
(the same sink/echo and per-10 ms counting as ``vstack serve udp``)."""

from __future__ import annotations

import asyncio
import sys

import typer

from vstack.cli.app import serve_app
from vstack.cli.serve import BinCounter, _serve
from vstack.servers import ServerError, start_framed_server, start_udplite_server

_PORT = typer.Option(..., "--port", "-p", min=1, max=65535, help="port")
_ECHO = typer.Option(False, "--echo", help="echo each datagram instead of a sink")
_BIND = typer.Option("::", "--bind", help="local address (default: all, v4 and v6)")
_CSV = typer.Option(None, "--csv", help="write packets per 10 ms here")
_SECONDS = typer.Option(0.0, "--seconds", help="stop after N seconds (0: never)")


def _run_framed(kind: str, port: int, echo: bool, bind: str, csv_path: str | None,
                seconds: float, prefix: int) -> None:
    counter = BinCounter()
    label = f"{kind}:{port}{' echo' if echo else ' sink'}"
    try:
        asyncio.run(_serve(
            lambda: start_framed_server(port, echo=echo, bind=bind, mptcp=kind == "mptcp",
                                        prefix=prefix, on_datagram=counter.add),
            counter, label, seconds, csv_path))
    except (OSError, ServerError) as e:
        print(f"vstack serve {kind}: {e}", file=sys.stderr)
        raise typer.Exit(2) from e


@serve_app.command("tcp")
def serve_tcp(port: int = _PORT, echo: bool = _ECHO, bind: str = _BIND,
              csv_path: str | None = _CSV, seconds: float = _SECONDS,
              prefix: int = typer.Option(2, "--prefix", help="length prefix bytes (2 or 4)"),
              ) -> None:
    """Length-prefixed datagrams over TCP (the "tcp" stack's peer): sink or echo."""
    _run_framed("tcp", port, echo, bind, csv_path, seconds, prefix)


@serve_app.command("mptcp")
def serve_mptcp(port: int = _PORT, echo: bool = _ECHO, bind: str = _BIND,
                csv_path: str | None = _CSV, seconds: float = _SECONDS,
                prefix: int = typer.Option(2, "--prefix", help="length prefix bytes (2 or 4)"),
                ) -> None:
    """Length-prefixed datagrams over MPTCP (the "mptcp" stack's peer): sink or echo."""
    _run_framed("mptcp", port, echo, bind, csv_path, seconds, prefix)


@serve_app.command("udplite")
def serve_udplite(port: int = _PORT, echo: bool = _ECHO, bind: str = _BIND,
                  csv_path: str | None = _CSV, seconds: float = _SECONDS,
                  recv_cscov: int = typer.Option(0, "--recv-cscov",
                                                 help="minimum checksum coverage accepted "
                                                 "(0: full)"),
                  ) -> None:
    """UDP-Lite (RFC 3828) sink or echo."""
    counter = BinCounter()
    label = f"udplite:{port}{' echo' if echo else ' sink'}"
    try:
        asyncio.run(_serve(
            lambda: start_udplite_server(port, echo=echo, bind=bind, recv_cscov=recv_cscov,
                                         on_datagram=counter.add),
            counter, label, seconds, csv_path))
    except (OSError, ServerError) as e:
        print(f"vstack serve udplite: {e}", file=sys.stderr)
        raise typer.Exit(2) from e

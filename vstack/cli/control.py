"""Commands that talk to a running daemon over the control socket (``vstack flows``,
``vstack why``, ``vstack switch``, ``vstack rules reload``, ``vstack stats``), and
``vstack mgmt send``, which signs and sends a management message the way the core
network would."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from vstack.analysis.flowkey import FlowKey
from vstack.cli.app import app, rules_app
from vstack.control import ControlClient, ControlError, DaemonNotRunning, default_socket_path
from vstack.management.auth import sign
from vstack.management.server import parse_listen

mgmt_app = typer.Typer(help="The management interface (core network side).",
                       no_args_is_help=True)
app.add_typer(mgmt_app, name="mgmt")

SocketOpt = Annotated[str | None, typer.Option(
    "--socket", help="control socket of the daemon [default: $VSTACK_CONTROL_SOCKET or "
    "/run/vstack/control.sock]", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the raw JSON result")]

EXIT_ERROR = 1
EXIT_NOT_RUNNING = 2


def _call(sock: str | None, method: str, **params: Any) -> Any:
    try:
        return ControlClient(sock or default_socket_path()).call(method, **params)
    except DaemonNotRunning as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_NOT_RUNNING) from None
    except ControlError as e:
        kind = "" if e.kind in ("ControlError", "") else f"{e.kind}: "
        typer.echo(f"error: {kind}{e}", err=True)
        raise typer.Exit(EXIT_ERROR) from None


def _flow_arg(text: str) -> str:
    try:
        return str(FlowKey.parse(text))
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_ERROR) from None


def _fmt_time(t: Any) -> str:
    if isinstance(t, int | float) and not isinstance(t, bool):
        try:
            return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S.%f")[:-3]
        except (OverflowError, OSError, ValueError):
            pass
    return str(t)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _fmt_facts(facts: Any) -> str:
    if isinstance(facts, Mapping):
        return " ".join(f"{k}={_fmt_value(v)}" for k, v in facts.items())
    return "" if facts is None else _fmt_value(facts)


def _console() -> Console:
    return Console(width=200 if not sys.stdout.isatty() else None)


@app.command("flows")
def flows_cmd(socket_path: SocketOpt = None, as_json: JsonOpt = False,
              limit: Annotated[int, typer.Option(
                  "--limit", min=0, help="at most this many flows (the daemon's default: "
                  "10000); the total is always given")] = 10_000) -> None:
    """Table of the daemon's flows: stack, interface, target, packets, deciding rule."""
    result = _call(socket_path, "flows", limit=limit)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    rows = result.get("flows", []) if isinstance(result, dict) else result or []
    nworkers = result.get("workers") if isinstance(result, dict) else None
    per = f" on {nworkers} workers" if isinstance(nworkers, int) and nworkers > 1 else ""
    table = Table(title=f"{len(rows)} flow{'s' if len(rows) != 1 else ''}{per}")
    cols = [("flow", "left"), ("stack", "left"), ("interface", "left"), ("target", "left"),
            ("pkts out", "right"), ("pkts in", "right"), ("rule", "left")]
    if per:
        cols.append(("worker", "right"))
    for col, just in cols:
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for f in rows:
        cells = [str(f.get("flow", f.get("key", "?"))), str(f.get("stack", "")),
                 str(f.get("interface", "") or "-"), str(f.get("target", "")),
                 str(f.get("packets_out", "")), str(f.get("packets_in", "")),
                 str(f.get("rule", "") or "-")]
        if per:
            cells.append(str(f.get("worker", "")))
        table.add_row(*cells)
    console = _console()
    console.print(table)
    if isinstance(result, dict):
        for wid, msg in (result.get("unavailable") or {}).items():
            typer.echo(f"warning: worker {wid}'s flows are missing: {msg}", err=True)
    if isinstance(result, dict) and result.get("truncated"):
        typer.echo(f"warning: {len(rows)} of {result.get('total', '?')} flows shown "
                   "(--limit)", err=True)
    if isinstance(result, dict) and result.get("log_dropped") is not None:
        console.print(f"decision log: {result['log_dropped']} records dropped by the writer")


@app.command("why")
def why_cmd(flow: Annotated[str, typer.Argument(help="flow key, e.g. "
                                                     "udp:10.0.0.1:5000->10.201.1.2:9000")],
            socket_path: SocketOpt = None, as_json: JsonOpt = False) -> None:
    """The decision history of FLOW: when, which rule, the stack it chose, the facts it saw."""
    result = _call(socket_path, "why", flow=_flow_arg(flow))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    entries = result.get("decisions", []) if isinstance(result, dict) else result or []
    if not entries:
        typer.echo(f"no decisions recorded for {flow}")
        return
    wid = result.get("worker") if isinstance(result, dict) else None
    on = f" (worker {wid})" if isinstance(wid, int) and not isinstance(wid, bool) else ""
    table = Table(title=f"decisions for {_flow_arg(flow)}{on}")
    extra = sorted({k for e in entries for k in e} - {"time", "rule", "stack", "facts"})
    for col in ("time (UTC)", "rule", "stack", *extra, "facts"):
        table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(_fmt_time(e.get("time")), str(e.get("rule", "") or "-"),
                      str(e.get("stack", "") or "-"),
                      *(_fmt_value(e.get(k, "")) for k in extra), _fmt_facts(e.get("facts")))
    _console().print(table)


@app.command("switch")
def switch_cmd(flow: Annotated[str, typer.Argument(help="flow key")],
               stack: Annotated[str, typer.Argument(help="stack name, e.g. udp, dccp")],
               socket_path: SocketOpt = None) -> None:
    """Switch a live flow to another stack (the daemon keeps the old one cached)."""
    key = _flow_arg(flow)
    result = _call(socket_path, "switch", flow=key, stack=stack)
    detail = f" ({_fmt_facts(result)})" if isinstance(result, Mapping) and result else ""
    typer.echo(f"{key}: switched to {stack}{detail}")


@rules_app.command("reload")
def rules_reload_cmd(socket_path: SocketOpt = None) -> None:
    """Ask the daemon to reload its rules file; a bad file leaves the old rules running."""
    result = _call(socket_path, "rules_reload")
    if isinstance(result, Mapping):
        typer.echo("rules reloaded: " + _fmt_facts(result))
    else:
        typer.echo(f"rules reloaded{': ' + str(result) if result is not None else ''}")


@app.command("stats")
def stats_cmd(socket_path: SocketOpt = None, as_json: JsonOpt = False) -> None:
    """The daemon's counters."""
    result = _call(socket_path, "stats")
    if as_json or not isinstance(result, Mapping):
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title="counters")
    table.add_column("counter")
    table.add_column("value", justify="right")

    def walk(prefix: str, obj: Mapping[str, Any]) -> None:
        for k, v in obj.items():
            if isinstance(v, Mapping):
                walk(f"{prefix}{k}.", v)
            else:
                table.add_row(f"{prefix}{k}", _fmt_value(v))

    walk("", result)
    _console().print(table)


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` (port 1..65535)."""
    host, port = parse_listen(text)
    if port == 0:
        raise ValueError(f"port 0 in {text!r}")
    return host, port


def parse_field(text: str) -> tuple[str, Any]:
    """``key=value``; the value is JSON if it parses as a JSON scalar, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected key=value, not {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        return key, raw
    if isinstance(value, dict | list):
        return key, raw
    return key, value


@mgmt_app.command("send")
def mgmt_send_cmd(
    msg_type: Annotated[str, typer.Argument(metavar="TYPE", help="e.g. congestion, switch")],
    fields: Annotated[list[str] | None, typer.Argument(
        metavar="KEY=VALUE...", help="fields; values parse as JSON scalars, else strings")
    ] = None,
    key: Annotated[str | None, typer.Option("--key", envvar="VSTACK_MGMT_KEY",
                                            help="shared key")] = None,
    key_file: Annotated[str | None, typer.Option("--key-file",
                                                 help="read the key from a file")] = None,
    to: Annotated[str, typer.Option("--to", help="HOST:PORT of the management port")] = "",
    show: Annotated[bool, typer.Option("--show", help="print the signed datagram")] = False,
) -> None:
    """Sign a management message with the shared key and send it over UDP, e.g.
    ``vstack mgmt send --key K --to 127.0.0.1:7400 switch flow=udp:... stack=dccp``."""
    try:
        if key_file:
            with open(key_file, encoding="utf-8") as fh:
                key = fh.read().strip()
        if not key:
            raise ValueError("no key: pass --key, --key-file or set VSTACK_MGMT_KEY")
        if not to:
            raise ValueError("no destination: pass --to HOST:PORT")
        host, port = parse_hostport(to)
        message: dict[str, Any] = {"type": msg_type}
        for f in fields or []:
            k, v = parse_field(f)
            message[k] = v
        data = sign(message, key, time.time())
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, stype, proto, _, addr = infos[0]
        with socket.socket(family, stype, proto) as s:
            s.sendto(data, addr)
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    if show:
        typer.echo(data.decode())
    typer.echo(f"sent mgmt.{msg_type} ({len(data)} bytes) to {to}")

"""The typer application objects. Each command module adds its commands to these."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="vstack",
    help="vstack: protocol stack virtualization at the edge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
bench_app = typer.Typer(help="Benchmarks (medians of alternating runs; ratios in one run).",
                        no_args_is_help=True)
rules_app = typer.Typer(help="Check and reload .rules files.", no_args_is_help=True)
serve_app = typer.Typer(help="The paper's test servers (sink or echo).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(rules_app, name="rules")
app.add_typer(serve_app, name="serve")

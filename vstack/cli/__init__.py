"""``vstack`` command line. Commands live in one module per area (see ``_MODULES``)."""

from __future__ import annotations

import importlib

from vstack.cli.app import app

# Each module registers its commands on import.
_MODULES = (
    "vstack.cli.daemon",  # run, demo
    "vstack.cli.bench_datapath",  # bench throughput
    "vstack.cli.bench_speed",  # bench flows (+ throughput --sender/--stack/--workers)
    "vstack.cli.serve",  # serve udp, serve dccp
    "vstack.cli.serve_stream",  # serve tcp, serve mptcp, serve udplite
    "vstack.cli.bench_dccp",  # bench switch
    "vstack.cli.rules",  # rules check
    "vstack.cli.bench_decide",  # bench decide
    "vstack.cli.control",  # flows, why, switch, rules reload
    "vstack.cli.replay",  # replay, learn
)
for _name in _MODULES:
    importlib.import_module(_name)


def main() -> None:
    app()

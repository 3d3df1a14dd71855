"""The stacks. Each module registers its stack class in ``base.STACKS`` on import;
``load_builtin()`` imports them all (the datapath calls it once at start)."""

from __future__ import annotations

import importlib

BUILTIN = ("udp", "raw", "dccp", "tcp", "mptcp", "udplite")


def load_builtin() -> None:
    for name in BUILTIN:
        importlib.import_module(f"vstack.execution.stacks.{name}")

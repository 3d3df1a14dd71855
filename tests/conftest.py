"""Shared test configuration.

Tests are split by privilege: ``tests/unit`` needs no root; tests marked ``root`` (in
``tests/net``) build network namespaces, veth pairs and TUN devices, and are skipped with
the reason when not run as root.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, TUN)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)

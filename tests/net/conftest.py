"""Fixtures of the netns tests: a testbed (edge + server namespaces) and a short temporary
folder (unix socket paths must stay under 108 bytes). A module names its namespaces with
``TESTBED_PREFIX``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.net._e2e import tmpdir_short


@pytest.fixture
def tb(request: pytest.FixtureRequest) -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    from vstack.testbed import Testbed

    with Testbed(prefix=getattr(request.module, "TESTBED_PREFIX", "vt")) as t:
        yield t


@pytest.fixture
def tmp() -> Iterator[Path]:
    d = tmpdir_short()
    yield d
    shutil.rmtree(d, ignore_errors=True)

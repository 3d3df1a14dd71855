"""``vstack demo`` end to end: the paper's scenario driven by rules/paper.rules, as the
README's first command runs it, and nothing left behind."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_demo_switches_by_paper_rules_and_loses_nothing() -> None:
    before = _netns()
    p = subprocess.run([sys.executable, "-m", "vstack", "demo", "--seconds", "7",
                        "--period", "2", "--rate", "200"],
                       capture_output=True, text=True, timeout=180)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "by the rule engine (paper.rules" in out
    switches = re.findall(r"switch: t=\s*[\d.]+s -> (udp|dccp) \((new|cached) stack\)", out)
    assert switches[:3] == [("dccp", "new"), ("udp", "cached"), ("dccp", "cached")], out
    m = re.search(r"demo: sent (\d+), received udp (\d+) \+ dccp (\d+), lost (\d+)", out)
    assert m is not None, out[-3000:]
    sent, udp, dccp, lost = map(int, m.groups())
    assert lost == 0 and udp + dccp == sent and udp > 0 and dccp > 0
    assert _netns() - before == set()

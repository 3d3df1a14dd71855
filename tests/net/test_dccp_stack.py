"""The DCCP stack through the VNIC, on the netns testbed: an unmodified UDP application's
flow carried over DCCP (``vstack run`` in the edge namespace) to ``vstack serve dccp`` in the
server namespace, replies back as UDP; and a live UDP <-> DCCP switch with nothing lost."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

APP = r"""
import socket, sys, time
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(5)
got = []
for i in range(n):
    s.sendto(b"app %d" % i, (dst, port))
    data, peer = s.recvfrom(2048)
    got.append((data, peer[0], peer[1]))
bad = [g for i, g in enumerate(got) if g != (b"app %d" % i, dst, port)]
print(f"app ok={n - len(bad)} bad={bad[:3]}", flush=True)
"""


@pytest.fixture
def testbed() -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from vstack.testbed import Testbed

    with Testbed(prefix="vt") as tb:
        yield tb


def _ready(p: subprocess.Popen[str], needle: str) -> None:
    assert p.stdout is not None
    lines = []
    for line in p.stdout:
        lines.append(line)
        if needle in line:
            return
    raise AssertionError(f"no {needle!r}: {''.join(lines)[-2000:]}")


@pytest.mark.parametrize("transport", ["raw", "udp"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_udp_app_over_dccp_echo(testbed: Any, tmp_path: Path, v6: bool, transport: str) -> None:
    """``transport="udp"``: DCCP-UDP (RFC 6773), the server's UDP port (7101) apart from its
    DCCP port (7001), which the NAT target names."""
    tb = testbed
    ln = tb.links[0]
    server = ln.server6 if v6 else ln.server4
    vdst_addr = "fd99::9" if v6 else "10.99.0.9"  # virtual: only the NAT knows it
    key = f"[{vdst_addr}]:9000" if v6 else f"{vdst_addr}:9000"
    target = f"[{server}]:7001" if v6 else f"{server}:7001"
    cfg = tmp_path / "vstack.toml"
    cfg.write_text(f'[vnic]\nname = "vt{secrets.token_hex(3)}"\n'
                   f'[execution]\ndefault_stack = "dccp"\n'
                   f'[nat."{key}"]\ndccp = "{target}"\n'
                   + ('[stacks.dccp]\ntransport = "udp"\nudp_port = 7101\n'
                      if transport == "udp" else ""))
    encap = ["--udp-encap", "--udp-port", "7101"] if transport == "udp" else []
    py = sys.executable
    srv = tb.popen(tb.server, [py, "-m", "vstack", "serve", "dccp", "--echo", "--port", "7001",
                               *encap, "--bind", server, "--seconds", "120"],
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _ready(srv, "ready")
    daemon = tb.popen(tb.edge, [py, "-m", "vstack", "run", "--config", str(cfg)],
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _ready(daemon, "vstack ready")
    try:
        r = tb.run(tb.edge, [py, "-c", APP, vdst_addr, "9000", "300"], timeout=120,
                   check=False)
        assert "app ok=300 bad=[]" in r.stdout, r.stdout + r.stderr
    finally:
        daemon.terminate()
        out, _ = daemon.communicate(timeout=15)
        srv.terminate()
        sout, _ = srv.communicate(timeout=15)
    assert "dccp to" in out and "open (CCID 2)" in out, out[-3000:]
    assert "pkts=300" in sout, sout[-1000:]


def test_switch_udp_dccp_loses_nothing(testbed: Any, tmp_path: Path) -> None:
    from vstack.dccp.experiment import analyse, run_switch_scenario

    run = run_switch_scenario(testbed, tmp_path, seconds=7.0, period=2.0, rate=300.0)
    figs = analyse(run, tmp_path)
    assert run.sent > 1500
    assert [s.to for s in run.switches] == ["dccp", "udp", "dccp"]
    assert figs.received_dccp > 0 and figs.received_udp > 0
    assert figs.lost == 0, (figs, run.daemon_log[-3000:])
    assert figs.received_udp + figs.received_dccp == run.sent
    with contextlib.suppress(Exception):
        (tmp_path / "daemon.log").write_text(run.daemon_log)

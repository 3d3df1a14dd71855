"""The decision side end to end (issue 4, item 8): a real ``vstack run`` in the edge
namespace of the netns testbed, with a rules file, the management port, the netlink
monitor and the control socket (``vstack.services``); applications in the edge namespace,
servers in the server namespace.

* an authenticated management command switches a live flow UDP -> DCCP; a forged one
  (wrong key) does not;
* a link taken down with pyroute2 moves the flow to the second veth (rule on ``link.down``)
  with no datagram lost beyond the client's in-flight window;
* ``rules/paper.rules`` (period shortened to 1 s) alternates the flow UDP <-> DCCP, seen
  at both servers;
* a bad ``vstack rules reload`` reports ``file:line:col`` and leaves the old rules deciding.

No timing assertions: everything is counted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.net._e2e import (
    ECHO,
    ONESHOT,
    PACED,
    PY,
    RULES_DIR,
    WCLIENT,
    Daemon,
    finish,
    start_echo_peers,
    stop_done,
    stop_json,
    wait_line,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

VDST = "10.99.0.9"  # a virtual destination: only the NAT knows where it goes


TESTBED_PREFIX = "vj"  # netns names of this module (tests/net/conftest.py)


def _send_mgmt(tb: Any, to: str, key: str, message: dict[str, Any]) -> None:
    """Sign ``message`` with ``key`` and send it from the server namespace (the core
    network side) to the daemon's management port."""
    code = ("import json, socket, sys, time\n"
            "from vstack.management.auth import sign\n"
            "host, port = sys.argv[1].rsplit(':', 1)\n"
            "d = sign(json.loads(sys.argv[3]), sys.argv[2], time.time())\n"
            "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(d, (host, int(port)))\n")
    tb.run(tb.server, [PY, "-c", code, to, key, json.dumps(message)])


def test_mgmt_command_switches_a_live_flow_and_a_forged_one_does_not(tb: Any, tmp: Path) -> None:
    l1 = tb.links[0]
    key = "k" * 8 + "e2e-shared-key-0123456789abcdef"
    mgmt = f"{l1.edge4}:7400"
    d = Daemon(tb, tmp, (
        f'[execution]\nmetrics_interval_s = 0.2\n'
        f'[decision]\nrules = "{RULES_DIR / "default.rules"}"\n'
        f'[management]\nlisten = "{mgmt}"\nkey = "{key}"\n'
        f'[nat."{VDST}:9000"]\nudp = "{l1.server4}:9000"\ndccp = "{l1.server4}:7001"\n'))
    echo, dccp = start_echo_peers(tb, l1.server4)
    d.start()
    try:
        sport, window = 41001, 16
        app = tb.popen(tb.edge, [PY, "-c", WCLIENT, VDST, "9000", "0", str(window), "250",
                                 str(sport)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       text=True)
        wait_line(app, "first")
        f = d.flow(sport)
        assert f["stack"] == "udp" and f["rule"] == "udp_default", f
        flow = f["flow"]

        # forged: signed with another key -> rejected, never acted on
        _send_mgmt(tb, mgmt, "not-the-key-" + key, {"type": "switch", "flow": flow,
                                                     "stack": "dccp"})
        deadline = time.monotonic() + 10
        while d.stats()["management"]["unauthenticated"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        st = d.stats()["management"]
        assert st["unauthenticated"] == 1 and st["accepted"] == 0, st
        assert d.flow(sport)["stack"] == "udp"
        assert "rejected: unauthenticated" in d.text()

        # authentic: the rule mgmt_switch (on mgmt.switch then use_stack(stack)) switches it
        _send_mgmt(tb, mgmt, key, {"type": "switch", "flow": flow, "stack": "dccp"})
        f = d.wait_flow(sport, lambda f: f["stack"] == "dccp")
        assert f["stack"] == "dccp" and f["rule"] == "mgmt_switch", (f, d.text()[-3000:])
        # what `vstack flows --json` shows, through the real CLI
        (f,) = [g for g in d.flows(cli=True) if g["flow"] == flow]
        assert f["stack"] == "dccp" and f["target"] == f"{l1.server4}:7001", f
        assert d.stats()["management"]["accepted"] == 1
        why = json.loads(d.cli("why", flow, "--json").stdout)
        assert [e["rule"] for e in why["decisions"]][:1] == ["udp_default"]
        assert any(e["rule"] == "mgmt_switch" and e["stack"] == "dccp"
                   and e["facts"].get("stack") == "dccp" for e in why["decisions"]), why

        # let the flow run on DCCP for a while
        out0 = f["packets_out"]
        d.wait_flow(sport, lambda f: f["packets_out"] >= out0 + 300)
        res = finish(app)
    finally:
        rc = d.stop()
        udp_seen = stop_json(echo)[f"{l1.server4}:9000"]
        dccp_pkts = stop_done(dccp)
    assert rc == 0, d.text()[-3000:]
    n = res["sent"]
    # both servers got part of the flow, and together all of it but at most one window
    assert len(udp_seen) > 0 and dccp_pkts >= 300, (len(udp_seen), dccp_pkts, d.text()[-3000:])
    assert n - window <= len(udp_seen) + dccp_pkts <= n, (len(udp_seen), dccp_pkts)
    # UDP got a prefix of the flow: the switch happened once, and stayed
    assert max(udp_seen) < len(udp_seen) + window, udp_seen[-10:]
    assert res["replies"] >= n - window


def test_link_down_moves_the_flow_to_the_second_veth(tb: Any, tmp: Path) -> None:
    from pyroute2 import NetNS

    l1, l2 = tb.links
    rules = tmp / "failover.rules"
    rules.write_text(
        f'param primary = "{l1.edge_if}"\nparam backup = "{l2.edge_if}"\n'
        f'rule pin: on flow.new if proto == "udp" then use_stack(udp), use_interface(primary)\n'
        f'rule failover: on link.down if ifname == primary\n'
        f'    then use_interface(backup), retarget({l2.server4}:9000)\n')
    d = Daemon(tb, tmp, (
        f'[execution]\nmetrics_interval_s = 0.2\n[decision]\nrules = "{rules}"\n'
        f'[monitor]\ninterfaces = ["{l1.edge_if}", "{l2.edge_if}"]\n'))
    echo = tb.popen(tb.server, [PY, "-c", ECHO, f"{l1.server4}:9000", f"{l2.server4}:9000"],
                    stdout=subprocess.PIPE, text=True)
    wait_line(echo, "ready")
    d.start()
    assert "netlink monitor:" in d.text()
    try:
        sport, window = 41002, 8
        app = tb.popen(tb.edge, [PY, "-c", WCLIENT, l1.server4, "9000", "0", str(window),
                                 "300", str(sport)], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
        wait_line(app, "first")
        f = d.flow(sport)
        assert f["interface"] == l1.edge_if and f["target"] == f"{l1.server4}:9000", f
        # let a part of the flow through link 1, then take link 1 down
        d.wait_flow(sport, lambda f: f["packets_out"] >= 300)
        with NetNS(tb.edge) as ns:
            ns.link("set", index=ns.link_lookup(ifname=l1.edge_if)[0], state="down")
        f = d.wait_flow(sport, lambda f: f["interface"] == l2.edge_if)
        assert f["interface"] == l2.edge_if and f["target"] == f"{l2.server4}:9000", \
            (f, d.text()[-3000:])
        assert f["rule"] == "failover"
        out0 = f["packets_out"]
        d.wait_flow(sport, lambda f: f["packets_out"] >= out0 + 300)
        res = finish(app)
        st = d.stats()
    finally:
        rc = d.stop()
        seen = stop_json(echo)
    assert rc == 0, d.text()[-3000:]
    assert st["monitor"]["events"] >= 1 and st["engine"].get("fired:failover") == 1, st
    on1, on2 = seen[f"{l1.server4}:9000"], seen[f"{l2.server4}:9000"]
    n = res["sent"]
    assert len(on1) >= 300 and len(on2) >= 300, (len(on1), len(on2))
    assert len(set(on1) | set(on2)) == len(on1) + len(on2)  # nothing twice
    # link 1 carried the start of the flow, link 2 the rest; what is missing is at most the
    # datagrams in flight when the link went down (one client window)
    assert max(on1) < min(on2)
    lost = n - len(on1) - len(on2)
    assert 0 <= lost <= window, (lost, res)


def _paper_rules(tmp: Path, period: str) -> Path:
    text = (RULES_DIR / "paper.rules").read_text()
    new, k = re.subn(r"(?m)^param period = .*$", f"param period = {period}", text)
    assert k == 1
    p = tmp / "paper.rules"
    p.write_text(new)
    return p


def _runs(udp_csv: Path, dccp_csv: Path, min_packets: int = 10) -> list[str]:
    """Which server received, in arrival order (10 ms bins), collapsed into runs:
    ["udp", "dccp", ...]. At a switch the last datagrams of the old stack and the first of
    the new one may arrive interleaved (two paths); runs of fewer than ``min_packets``
    datagrams are such stragglers and are merged away."""
    from vstack.cli.serve import read_bins_csv

    u, dc = read_bins_csv(udp_csv), read_bins_csv(dccp_csv)
    runs: list[list[Any]] = []  # [name, packets]
    for k in sorted(set(u) | set(dc)):
        for name, bins in (("udp", u), ("dccp", dc)):
            if bins.get(k, 0):
                if runs and runs[-1][0] == name:
                    runs[-1][1] += bins[k]
                else:
                    runs.append([name, bins[k]])
    out: list[str] = []
    for name, packets in runs:
        if packets >= min_packets and (not out or out[-1] != name):
            out.append(name)
    return out


def test_paper_rules_alternate_udp_and_dccp(tb: Any, tmp: Path) -> None:
    l1 = tb.links[0]
    rules = _paper_rules(tmp, "1s")
    d = Daemon(tb, tmp, (
        f'[execution]\nmetrics_interval_s = 0.5\n[decision]\nrules = "{rules}"\n'
        f'[nat."{VDST}:9000"]\nudp = "{l1.server4}:7000"\ndccp = "{l1.server4}:7001"\n'))
    udp_csv, dccp_csv = tmp / "udp.csv", tmp / "dccp.csv"
    udp = tb.popen(tb.server, [PY, "-m", "vstack", "serve", "udp", "--port", "7000", "--bind",
                               l1.server4, "--csv", str(udp_csv), "--seconds", "170"],
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dccp = tb.popen(tb.server, [PY, "-m", "vstack", "serve", "dccp", "--port", "7001", "--bind",
                                l1.server4, "--csv", str(dccp_csv), "--seconds", "170"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_line(udp, "ready")
    wait_line(dccp, "ready")
    d.start()
    try:
        n, rate = 900, 200  # 4.5 s: the timer fires 4 times
        app = tb.popen(tb.edge, [PY, "-c", PACED, VDST, "9000", str(n), str(rate), "41003"],
                       stdout=subprocess.PIPE, text=True)
        assert app.stdout is not None
        app.wait(120)
        assert f"sent {n}" in app.stdout.read()
        time.sleep(0.5)  # the tail reaches the servers
        flows = d.flows()
    finally:
        rc = d.stop()
        got_udp, got_dccp = stop_done(udp), stop_done(dccp)
    assert rc == 0, d.text()[-3000:]
    log = d.text()
    switches = re.findall(r"switched (\w+) -> (\w+) .*rule (flip_to_\w+)", log)
    assert len(switches) >= 2, log[-3000:]
    assert switches[0] == ("udp", "dccp", "flip_to_dccp")
    assert all(a != b for a, b, _ in switches)
    runs = _runs(udp_csv, dccp_csv)
    # the servers saw the flow alternate, starting on UDP, once per switch
    assert runs[:4] == ["udp", "dccp", "udp", "dccp"], runs
    assert 4 <= len(runs) <= len(switches) + 1, (runs, switches)
    assert got_udp > 0 and got_dccp > 0
    assert got_udp + got_dccp == n, (got_udp, got_dccp)  # stacks are cached: nothing lost
    assert len(flows) == 1 and flows[0]["rule"].startswith("flip_to_")


def _oneshot(tb: Any, host: str, sport: int) -> None:
    r = tb.run(tb.edge, [PY, "-c", ONESHOT, host, "9000", str(sport)], check=False, timeout=30)
    assert r.stdout.strip() == "one", r.stdout + r.stderr


def test_bad_reload_keeps_the_old_rules(tb: Any, tmp: Path) -> None:
    l1 = tb.links[0]
    rules = tmp / "live.rules"
    rules.write_text('rule old_rule: on flow.new if proto == "udp" then use_stack(udp)\n')
    d = Daemon(tb, tmp, f'[execution]\nmetrics_interval_s = 0.5\n[decision]\nrules = "{rules}"\n')
    echo = tb.popen(tb.server, [PY, "-c", ECHO, f"{l1.server4}:9000"],
                    stdout=subprocess.PIPE, text=True)
    wait_line(echo, "ready")
    d.start()
    try:
        _oneshot(tb, l1.server4, 42001)
        assert d.flow(42001)["rule"] == "old_rule"
        v_old = d.stats()["engine"]["rules_version"]

        # a broken file: line 2 does not parse
        rules.write_text('rule new_rule: on flow.new if proto == "udp" then use_stack(udp)\n'
                         'rule broken: on flow.new if dport == then drop()\n')
        r = d.cli("rules", "reload", check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert re.search(rf"{re.escape(str(rules))}:2:\d+:", r.stderr), r.stderr
        assert f"kept rules version {v_old}" in r.stderr
        st = d.stats()["engine"]
        assert st["rules_version"] == v_old and st["reload_errors"] == 1, st
        # the next new flow is still decided by the old rules
        _oneshot(tb, l1.server4, 42002)
        assert d.flow(42002)["rule"] == "old_rule"

        # and a good file is taken (so the check above could have failed)
        rules.write_text('rule new_rule: on flow.new if proto == "udp" then use_stack(udp)\n')
        r = d.cli("rules", "reload")
        assert "rules reloaded" in r.stdout and f"previous={v_old}" in r.stdout, r.stdout
        _oneshot(tb, l1.server4, 42003)
        assert d.flow(42003)["rule"] == "new_rule"
        assert d.flow(42001)["rule"] == "old_rule"  # live flows keep their decision
    finally:
        rc = d.stop()
        echo.terminate()
    assert rc == 0, d.text()[-3000:]
    assert "rules reload failed" in d.text()
    assert not Path(d.socket).exists()  # the control socket goes with the daemon


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))

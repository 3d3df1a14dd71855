"""The learning loop of issue 5 end to end: run -> log -> learn -> check -> replay-compare.

A live ``vstack run`` in the edge namespace with ε-exploration (``[decision]
exploration``), the decision log (``[log] db``) and a trace (``[log] record``). The
application opens 64 UDP flows in two classes, by destination port; the NAT sends each
class to a good server on one stack and a worse one (a sink, which sends nothing back: half
the goodput) on the other:

=========  ==========================  ==========================
 class      stack udp                   stack dccp
=========  ==========================  ==========================
 :9001      UDP echo (better)           DCCP sink
 :9002      UDP sink                    DCCP echo (better)
=========  ==========================  ==========================

The current rules put every flow on UDP (exploration sends some to DCCP, logging the
propensity). ``vstack learn fit`` (utility = goodput, ``--lambda 0``) must write rules that
``vstack rules check`` accepts, that send :9001 to UDP and :9002 to DCCP, and that
``vstack replay TRACE --rules learned --compare RUN`` estimates better than the logged run.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.net._e2e import PY, Daemon, stop_done, wait_line

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

VDST = "10.99.0.9"
FLOWS = 64
ROUNDS = 30  # datagrams per flow, one every 50 ms: 1.5 s

# FLOWS flows from ports 43000.. to VDST, even ones to :9001, odd ones to :9002; ROUNDS
# datagrams each, every 50 ms; replies are read and counted.
MULTI = r"""
import select, socket, sys, time
dst, flows, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for i in range(flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 43000 + i))
    s.setblocking(False)
    socks.append((s, 9001 if i % 2 == 0 else 9002))
replies = 0
t0 = time.monotonic()
for r in range(rounds):
    for s, port in socks:
        s.sendto(r.to_bytes(4, "big") + b"L" * 196, (dst, port))
    while True:
        left = t0 + (r + 1) * 0.05 - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([s for s, _ in socks], [], [], left)
        for s in ready:
            try:
                while True:
                    s.recv(2048)
                    replies += 1
            except BlockingIOError:
                pass
print(f"sent {flows * rounds} replies {replies}", flush=True)
"""

CURRENT = """\
# current policy: every UDP flow on UDP; DCCP only on a management command
rule udp_default: on flow.new if proto == "udp" then use_stack(udp)
rule mgmt_dccp: on mgmt.switch if stack == "dccp" then use_stack(dccp)
"""


TESTBED_PREFIX = "vl"  # netns names of this module (tests/net/conftest.py)


def _vstack(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "vstack", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _serve(tb: Any, kind: str, port: int, echo: bool, bind: str) -> subprocess.Popen[str]:
    p = tb.popen(tb.server, [PY, "-m", "vstack", "serve", kind, "--port", str(port), "--bind",
                             bind, "--seconds", "200", *(["--echo"] if echo else [])],
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return p


def test_learned_rules_choose_the_better_stack(tb: Any, tmp: Path) -> None:
    l1 = tb.links[0]
    s = l1.server4
    db, trace = tmp / "log.sqlite", tmp / "run.jsonl"
    current = tmp / "current.rules"
    current.write_text(CURRENT)
    d = Daemon(tb, tmp, (
        f'[execution]\nmetrics_interval_s = 0.2\nidle_timeout_s = 60\n'
        f'[decision]\nrules = "{current}"\nexploration = 0.8\n'
        f'[log]\ndb = "{db}"\nrecord = "{trace}"\n'
        f'[nat."{VDST}:9001"]\nudp = "{s}:9001"\ndccp = "{s}:7002"\n'
        f'[nat."{VDST}:9002"]\nudp = "{s}:9002"\ndccp = "{s}:7001"\n'))
    # one worker: the run's whole log is one database and one trace, which the replay
    # below compares (with N workers each writes <db>-w<k>; tests/net/test_workers_control.py)
    d.cfg.write_text(d.cfg.read_text().replace(f'name = "{d.name}"\n',
                                               f'name = "{d.name}"\nqueues = 1\n', 1))
    servers = [_serve(tb, "udp", 9001, True, s), _serve(tb, "udp", 9002, False, s),
               _serve(tb, "dccp", 7001, True, s), _serve(tb, "dccp", 7002, False, s)]
    for p in servers:
        wait_line(p, "ready")
    d.start()
    try:
        app = tb.run(tb.edge, [PY, "-c", MULTI, VDST, str(FLOWS), str(ROUNDS)], timeout=120)
        assert f"sent {FLOWS * ROUNDS}" in app.stdout
        # the application's flows (a reply that arrives after it closed a socket makes the
        # kernel send an ICMP port unreachable into the TUN: a raw flow of its own)
        flows = [f for f in d.flows() if f["flow"].startswith("udp:")]
        st = d.stats()
        run_id = st["log"]["run_id"]
        # the last metrics interval of every flow is logged before the daemon stops
        d.wait_log("counters")
    finally:
        rc = d.stop()
        got = [stop_done(p) for p in servers]
    assert rc == 0, d.text()[-3000:]
    assert len(flows) == FLOWS
    stacks = {f["stack"] for f in flows}
    assert stacks == {"udp", "dccp"}, flows  # exploration sent flows to both stacks
    assert all(n > 0 for n in got), got  # every server saw traffic
    assert st["engine"]["explored"] > 0

    with sqlite3.connect(db) as c:
        explored, decisions = c.execute(
            "select sum(explored), count(*) from decisions where run_id = ? and rule is not "
            "null", (run_id,)).fetchone()
        outcomes = c.execute("select count(distinct flow) from outcomes where run_id = ?",
                             (run_id,)).fetchone()[0]
    assert explored > 0 and decisions >= FLOWS
    assert outcomes == FLOWS

    # learn: utility = goodput (λ = 0): the servers differ by what they send back
    learned = tmp / "learned.rules"
    r = _vstack("learn", "fit", "--db", str(db), "--run", str(run_id), "--out", str(learned),
                "--lambda", "0", "--min-leaf", "6", "--max-depth", "2", "--current",
                str(current), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert set(report["stacks"]) == {"udp", "dccp"}, report
    text = learned.read_text()
    assert "use_stack(udp)" in text and "use_stack(dccp)" in text, text

    r = _vstack("rules", "check", str(learned))
    assert r.returncode == 0, r.stdout + r.stderr  # no errors, no warnings

    # the learned rules send each class to its better stack
    from vstack.decision.engine import RulesFile
    from vstack.decision.events import Event

    eng = RulesFile(str(learned)).engine(backend="reference")
    base = {"proto": "udp", "family": 4, "src": "198.18.0.1", "sport": 43000, "dst": VDST,
            "dscp": 0, "length": 228, "payload_len": 200, "tcp_flags": "", "iface": "",
            "stack": ""}
    chosen = {port: eng.decide(Event("flow.new", 0.0, {**base, "dport": port}), 0.0).stack
              for port in (9001, 9002)}
    assert chosen == {9001: "udp", 9002: "dccp"}, (chosen, text)

    # shadow evaluation: replay the live run's trace with the learned rules
    r = _vstack("replay", str(trace), "--rules", str(learned), "--db", str(db), "--compare",
                str(run_id), "--lambda", "0", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    cmp = doc["compare"]
    assert cmp["flows"] == FLOWS and cmp["changed"] > 0, cmp
    util = cmp["utility"]
    assert util["better"] == "new" and util["new"] > util["old"], util
    # in the replay every :9001 flow is on UDP and every :9002 flow on DCCP
    for diff in cmp["diffs"]:
        port = int(re.findall(r":(\d+)$", diff["flow"])[0])
        assert diff["new_stack"] == {9001: "udp", 9002: "dccp"}[port], diff

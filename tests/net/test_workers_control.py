"""The control plane over two workers (issue 6, "every core"): a real ``vstack run`` with
``[vnic] queues = 2`` in the edge namespace, 16 flows spread by the kernel over both TUN
queues.

* ``vstack flows`` lists every flow once, with the worker that owns it, and the owner never
  changes; ``vstack stats`` has per-worker counters and their totals;
* ``vstack switch`` of a flow on worker 1 takes effect on the wire (its datagrams reach the
  DCCP server); ``why`` answers from worker 1; a management ``switch`` (no rule engine)
  reaches the owning worker; a killed worker is reported, the rest still answers;
* with rules, one management ``congestion`` message reaches both workers' engines (every
  flow on both moves to DCCP); a bad ``rules reload`` keeps the old rules on both workers,
  a good one reaches both.

No timing assertions: everything is counted.
"""

from __future__ import annotations

import collections
import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.net._e2e import (
    ECHO,
    PY,
    Daemon,
    start_echo_peers,
    stop_done,
    stop_json,
    wait_line,
)
from tests.net.test_e2e_decision import _send_mgmt

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

TESTBED_PREFIX = "vq"
VDST = "10.99.0.9"  # a virtual destination: only the NAT knows where it goes
KEY = "workers-test-shared-key-0123456789abcdef"
NFLOWS = 16  # two workers both get flows but with probability 2 * 17 / 2^16

# NFLOWS UDP flows from ports BASE.., RATE datagrams/s each; COUNT per flow, then the
# replies (COUNT = 0: until a line on stdin). Prints "first" once every flow has had a
# reply, then {"sent": n, "replies": {port: n}}.
MULTI = r"""
import json, select, socket, sys, time
host, port, base, nflows, rate, count = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                         int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]))
socks = []
for i in range(nflows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", base + i))
    s.setblocking(False)
    socks.append(s)
replies = {base + i: 0 for i in range(nflows)}
sent, first, nxt = 0, False, time.monotonic()
deadline = None
while True:
    if count == 0 and select.select([sys.stdin], [], [], 0)[0]:
        break
    if count and sent >= count:
        deadline = deadline or time.monotonic() + 5
        if all(v >= count for v in replies.values()) or time.monotonic() > deadline:
            break
    elif time.monotonic() >= nxt:
        for s in socks:
            s.sendto(sent.to_bytes(4, "big") + b"m" * 96, (host, port))
        sent += 1
        nxt += 1.0 / rate
    r, _, _ = select.select(socks, [], [], 0.005)
    for s in r:
        while True:
            try:
                s.recv(2048)
            except BlockingIOError:
                break
            replies[s.getsockname()[1]] += 1
    if not first and all(replies.values()):
        first = True
        print("first", flush=True)
print(json.dumps({"sent": sent, "replies": replies}), flush=True)
"""


def _two_workers(d: Daemon) -> None:
    text = d.cfg.read_text()
    d.cfg.write_text(text.replace(f'name = "{d.name}"\n', f'name = "{d.name}"\nqueues = 2\n', 1))


def _start(d: Daemon) -> Daemon:
    _two_workers(d)
    d.start()
    d.wait_log("worker 1 ready")
    return d


def _multi(tb: Any, base: int, count: int, rate: float = 40) -> subprocess.Popen[str]:
    return tb.popen(tb.edge, [PY, "-c", MULTI, VDST, "9000", str(base), str(NFLOWS), str(rate),
                              str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    text=True)


def _finish(app: subprocess.Popen[str]) -> dict[str, Any]:
    assert app.stdin is not None
    out, _ = app.communicate("stop\n", timeout=30)
    return json.loads(out.strip().splitlines()[-1])


def _flows_from(d: Daemon, base: int, pred: Any = None, timeout: float = 30) -> dict[str, Any]:
    """The daemon's flows from ports base..base+NFLOWS-1, once there are all of them (and
    ``pred`` holds for each), by flow key."""
    deadline = time.monotonic() + timeout
    mine: dict[str, Any] = {}
    while time.monotonic() < deadline:
        mine = {f["flow"]: f for f in d.flows()
                if base <= int(re.findall(r":(\d+)->", f["flow"])[0]) < base + NFLOWS}
        if len(mine) == NFLOWS and (pred is None or all(pred(f) for f in mine.values())):
            return mine
        time.sleep(0.1)
    raise AssertionError(f"flows from {base}: {mine}\n{d.text()[-3000:]}")


def _per_worker(flows: dict[str, Any]) -> collections.Counter[int]:
    return collections.Counter(f["worker"] for f in flows.values())


def test_control_and_management_reach_every_worker(tb: Any, tmp: Path) -> None:
    l1 = tb.links[0]
    mgmt = f"{l1.edge4}:7400"
    d = Daemon(tb, tmp, (
        "[execution]\nmetrics_interval_s = 0.5\nidle_timeout_s = 60\n"
        f'[management]\nlisten = "{mgmt}"\nkey = "{KEY}"\n'
        f'[nat."{VDST}:9000"]\nudp = "{l1.server4}:9000"\ndccp = "{l1.server4}:7001"\n'))
    echo, dccp = start_echo_peers(tb, l1.server4)
    _start(d)
    killed = False
    try:
        app = _multi(tb, 43000, 0)
        wait_line(app, "first")
        flows = _flows_from(d, 43000)
        res = d.call("flows")
        assert res["workers"] == 2 and "unavailable" not in res
        assert len(res["flows"]) == NFLOWS  # every flow once
        owner = {k: f["worker"] for k, f in flows.items()}
        per = _per_worker(flows)
        assert set(per) == {0, 1}, per
        w0 = sorted(k for k, w in owner.items() if w == 0)
        w1 = sorted(k for k, w in owner.items() if w == 1)
        assert len(w1) >= 2, owner
        table = d.cli("flows").stdout
        assert f"{NFLOWS} flows on 2 workers" in table and "worker" in table, table

        # per-worker counters and their totals
        st = d.stats()
        assert st["datapath"]["flows"] == NFLOWS
        assert {w: st["workers"][str(w)]["datapath"]["flows"] for w in (0, 1)} == per
        assert st["datapath"]["rx_packets"] == sum(
            st["workers"][w]["datapath"]["rx_packets"] for w in ("0", "1"))

        # switch a flow of worker 1: it moves to DCCP, on the wire
        r = d.cli("switch", w1[0], "dccp")
        assert "switched to dccp" in r.stdout and "worker=1" in r.stdout, r.stdout
        f = _flows_from(d, 43000, lambda f: f["flow"] != w1[0] or f["stack"] == "dccp")[w1[0]]
        assert f["rule"] == "cli" and f["worker"] == 1, f
        out0 = f["packets_out"]
        _flows_from(d, 43000, lambda f: f["flow"] != w1[0] or f["packets_out"] >= out0 + 40)
        why = json.loads(d.cli("why", w1[0], "--json").stdout)
        assert why["worker"] == 1 and why["live"], why
        assert any(e["rule"] == "cli" and e["stack"] == "dccp" for e in why["decisions"]), why

        # a management switch (no rule engine) reaches the worker that owns the flow
        _send_mgmt(tb, mgmt, KEY, {"type": "switch", "flow": w1[1], "stack": "dccp"})
        f = _flows_from(d, 43000, lambda f: f["flow"] != w1[1] or f["stack"] == "dccp")[w1[1]]
        assert f["rule"] == "mgmt" and f["worker"] == 1, f
        mg = d.stats()["management"]
        assert mg["accepted"] == 1 and mg["handler_applied"] == 1, mg
        # nothing else moved, and no flow changed worker
        flows = _flows_from(d, 43000)
        assert {k: f["worker"] for k, f in flows.items()} == owner
        assert {k for k, f in flows.items() if f["stack"] == "dccp"} == {w1[0], w1[1]}

        # a flow nobody has
        r = d.cli("switch", "udp:198.18.0.1:1->10.99.0.9:9000", "dccp", check=False)
        assert r.returncode == 1 and "no flow" in r.stderr, r.stderr
        res_app = _finish(app)
        assert all(n > 0 for n in res_app["replies"].values()), res_app

        # a worker that died: reported, the parent still answers with its own flows
        pid = int(re.findall(r"2 workers: pids (\d+)", d.text())[0])
        tb.run(tb.edge, ["kill", "-KILL", str(pid)])
        killed = True
        d.wait_log(f"worker pid {pid} killed by signal 9")  # noticed and reaped, unasked
        deadline = time.monotonic() + 10
        while "worker 1" not in json.dumps(d.call("flows").get("unavailable", {})):
            assert time.monotonic() < deadline, d.call("flows")
            time.sleep(0.1)
        r = d.cli("flows")
        assert "worker 1's flows are missing" in r.stderr, r.stderr
        assert all(k in r.stdout for k in w0[:1])
        assert "1" in d.stats()["unavailable"]
    finally:
        rc = d.stop()
        stop_json(echo)
        dccp_pkts = stop_done(dccp)
    assert killed and rc == 0, d.text()[-3000:]
    assert dccp_pkts >= 40  # the switched flows' datagrams went out on DCCP
    # a flow stays on one worker: each created exactly once
    created = re.findall(r" w(\d) vstack\.flow: flow (udp:\S+:430\d\d->\S+) created", d.text())
    assert collections.Counter(flow for _w, flow in created) == collections.Counter(
        {k: 1 for k in owner})
    assert {flow: int(w) for w, flow in created} == owner


def test_rules_reload_and_management_events_reach_both_engines(tb: Any, tmp: Path) -> None:
    l1 = tb.links[0]
    mgmt = f"{l1.edge4}:7400"
    rules = tmp / "live.rules"
    congested = ("rule congested priority 10: on mgmt.congestion\n"
                 '    if proto == "udp" and stack == "udp" and level > 0.7 then use_stack(dccp)\n')
    congested += "rule m: on mgmt.switch then use_stack(stack)\n"
    rules.write_text('rule old_rule: on flow.new if proto == "udp" then use_stack(udp)\n'
                     + congested)
    d = Daemon(tb, tmp, (
        "[execution]\nmetrics_interval_s = 0.5\nidle_timeout_s = 60\n"
        f'[decision]\nrules = "{rules}"\n'
        f'[management]\nlisten = "{mgmt}"\nkey = "{KEY}"\n'
        f'[nat."{VDST}:9000"]\nudp = "{l1.server4}:9000"\ndccp = "{l1.server4}:7001"\n'))
    echo, dccp = start_echo_peers(tb, l1.server4)
    _start(d)
    try:
        app = _multi(tb, 44000, 0)
        wait_line(app, "first")
        flows = _flows_from(d, 44000)
        assert set(_per_worker(flows)) == {0, 1}
        assert {f["rule"] for f in flows.values()} == {"old_rule"}
        versions = {w: s["engine"]["rules_version"] for w, s in d.stats()["workers"].items()}
        assert set(versions) == {"0", "1"} and len(set(versions.values())) == 1
        v_old = versions["0"]

        # one management message: every engine sees it, every flow on both workers moves
        _send_mgmt(tb, mgmt, KEY, {"type": "congestion", "link": "veth0", "level": 0.9})
        flows = _flows_from(d, 44000, lambda f: f["stack"] == "dccp")
        assert {f["rule"] for f in flows.values()} == {"congested"}
        assert set(_per_worker(flows)) == {0, 1}
        # a management switch naming a flow of worker 1: its rules run there only (before:
        # on every engine, a phantom flow and a failed action on worker 0)
        on1 = next(k for k, f in flows.items() if f["worker"] == 1)
        _send_mgmt(tb, mgmt, KEY, {"type": "switch", "flow": on1, "stack": "udp"})
        deadline = time.monotonic() + 30
        while not any(f["flow"] == on1 and f["rule"] == "m" for f in d.flows()):
            assert time.monotonic() < deadline, d.flows()
            time.sleep(0.1)
        st = d.stats()
        assert [s["engine"].get("action_errors", 0) for s in st["workers"].values()] == [0, 0]
        assert st["forwarding"].get("to_owner") == 1, st["forwarding"]
        _finish(app)

        # a broken file: refused with its position, the old rules stay on both workers
        rules.write_text('rule new_rule: on flow.new if proto == "udp" then use_stack(udp)\n'
                         'rule broken: on flow.new if dport == then drop()\n')
        r = d.cli("rules", "reload", check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert re.search(rf"{re.escape(str(rules))}:2:\d+:", r.stderr), r.stderr
        st = d.stats()
        assert {s["engine"]["rules_version"] for s in st["workers"].values()} == {v_old}
        assert st["engine"]["reload_errors"] == 1  # tried once, in the parent only
        app = _multi(tb, 44100, 3)
        flows = _flows_from(d, 44100)
        assert set(_per_worker(flows)) == {0, 1}
        assert {f["rule"] for f in flows.values()} == {"old_rule"}, flows
        app.communicate(timeout=30)

        # a good one reaches both
        rules.write_text('rule new_rule: on flow.new if proto == "udp" then use_stack(udp)\n'
                         + congested)
        r = d.cli("rules", "reload")
        assert f"previous={v_old}" in r.stdout, r.stdout
        versions = {w: s["engine"]["rules_version"] for w, s in d.stats()["workers"].items()}
        assert len(set(versions.values())) == 1 and v_old not in versions.values(), versions
        app = _multi(tb, 44200, 3)
        flows = _flows_from(d, 44200)
        assert set(_per_worker(flows)) == {0, 1}
        assert {f["rule"] for f in flows.values()} == {"new_rule"}, flows
        app.communicate(timeout=30)
    finally:
        rc = d.stop()
        stop_json(echo)
        dccp_pkts = stop_done(dccp)
    assert rc == 0, d.text()[-3000:]
    assert dccp_pkts > 0
    assert d.proc is not None and d.proc.returncode != -signal.SIGKILL


def test_one_worker_is_the_plain_daemon(tb: Any, tmp: Path) -> None:
    """``queues = 1`` (``--workers 1``): no fork, no link, the control socket answers from
    the one process (no ``worker`` tags)."""
    l1 = tb.links[0]
    d = Daemon(tb, tmp, (
        "[execution]\nmetrics_interval_s = 0.5\n"
        f'[nat."{VDST}:9000"]\nudp = "{l1.server4}:9000"\n'))
    d.cfg.write_text(d.cfg.read_text().replace(f'name = "{d.name}"\n',
                                               f'name = "{d.name}"\nqueues = 1\n', 1))
    echo = tb.popen(tb.server, [PY, "-c", ECHO, f"{l1.server4}:9000"],
                    stdout=subprocess.PIPE, text=True)
    wait_line(echo, "ready")
    d.start()
    try:
        app = _multi(tb, 45000, 3)
        flows = _flows_from(d, 45000)
        assert all("worker" not in f for f in flows.values())
        assert "workers" not in d.call("flows") and "workers" not in d.stats()
        app.communicate(timeout=30)
        key = sorted(flows)[0]
        assert d.call("switch", flow=key, stack="udp") == {"flow": key, "stack": "udp"}
    finally:
        rc = d.stop()
        stop_json(echo)
    assert rc == 0, d.text()[-3000:]
    assert "workers: pids" not in d.text() and " w0 " not in d.text()


def test_every_worker_logs_and_one_that_cannot_start_fails_the_daemon(tb: Any,
                                                                      tmp: Path) -> None:
    """``[log] db``: worker 1 writes ``<db>-w1`` (its flows' decisions), ``vstack learn``'s
    reader finds both files; a worker whose log cannot open stops the daemon (exit 1)."""
    import sqlite3

    from vstack.workers import worker_db, worker_dbs

    l1 = tb.links[0]
    db = tmp / "log.sqlite"
    d = Daemon(tb, tmp, (
        "[execution]\nmetrics_interval_s = 0.5\n"
        f'[log]\ndb = "{db}"\n'
        f'[nat."{VDST}:9000"]\nudp = "{l1.server4}:9000"\n'))
    echo = tb.popen(tb.server, [PY, "-c", ECHO, f"{l1.server4}:9000"],
                    stdout=subprocess.PIPE, text=True)
    wait_line(echo, "ready")
    _start(d)
    try:
        app = _multi(tb, 46000, 3)
        flows = _flows_from(d, 46000)
        app.communicate(timeout=30)
        per = _per_worker(flows)
        assert set(per) == {0, 1}, per
    finally:
        assert d.stop() == 0, d.text()[-3000:]
    w1 = Path(worker_db(str(db), 1))
    assert worker_dbs(f"sqlite:///{db}") == [f"sqlite:///{db}", f"sqlite:///{w1}"]
    for path, wid in ((db, 0), (w1, 1)):
        with sqlite3.connect(path) as c:
            logged = {r[0] for r in c.execute("select distinct flow from decisions "
                                              "where flow is not null")
                      if re.search(r":460\d\d->", r[0])}
        assert logged == {k for k, f in flows.items() if f["worker"] == wid}, (wid, logged)

    # worker 1's log cannot open (a directory in its place): the daemon fails, says why
    w1.unlink()
    w1.mkdir()
    p = tb.run(tb.edge, [PY, "-m", "vstack", "run", "--config", str(d.cfg)], check=False,
               timeout=60)
    stop_json(echo)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "worker 1" in p.stderr and "did not start" in p.stderr, p.stderr[-3000:]
    assert "vstack ready" not in p.stderr

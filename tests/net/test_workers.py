"""Multi-queue workers (issue 6): ``[vnic] queues = 2`` runs two worker processes, one per
TUN queue. Many flows through them: every reply arrives, every flow is created by exactly
one worker (a flow never moves: it would be created again on the other worker), both
workers carry flows, and SIGTERM / SIGKILL of the parent leave nothing behind.
"""

from __future__ import annotations

import collections
import json
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.net.test_datapath import ECHO, Daemon, _leftovers
from vstack.testbed import Testbed
from vstack.workers import worker_db

pytestmark = [pytest.mark.root, pytest.mark.timeout(150)]

FLOWS = r"""
import json, socket, sys
host, port, flows, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
socks = []
for f in range(flows):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.settimeout(5)
    s.connect((host, port))
    socks.append(s)
ok = bad = 0
ports = []
for f, s in enumerate(socks):
    ports.append(s.getsockname()[1])
    for i in range(n):  # a window of n datagrams per flow, then the replies
        s.send(f.to_bytes(4, "big") + i.to_bytes(4, "big") + bytes(100 + i))
    for i in range(n):
        try:
            data = s.recv(65535)
        except socket.timeout:
            break
        if data == f.to_bytes(4, "big") + i.to_bytes(4, "big") + bytes(100 + i):
            ok += 1
        else:
            bad += 1
print(json.dumps({"ok": ok, "bad": bad, "ports": ports}), flush=True)
"""


def _config(name: str) -> str:
    return (f'[vnic]\nname = "{name}"\nqueues = 2\n[execution]\nmetrics_interval_s = 0.2\n'
            "idle_timeout_s = 30\n")


def test_flows_stay_on_one_worker_and_all_are_forwarded(tmp_path) -> None:
    with Testbed(prefix="vw") as tb:
        d = Daemon(tb, tmp_path, _config("vstk0")).start()
        d.wait_log("worker 1 ready")
        l1 = tb.links[0]
        echo = tb.popen(tb.server, [sys.executable, "-c", ECHO, f"{l1.server4}:9000",
                                    f"[{l1.server6}]:9000"], stdout=subprocess.PIPE, text=True)
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        results = []
        for host in (l1.server4, l1.server6):
            p = tb.run(tb.edge, [sys.executable, "-c", FLOWS, host, "9000", "24", "40"],
                       timeout=90)
            results.append(json.loads(p.stdout.strip().splitlines()[-1]))
        for r in results:
            assert (r["ok"], r["bad"]) == (24 * 40, 0)
        # every flow created exactly once, by one worker; both workers got flows
        created = re.findall(r" w(\d) vstack\.flow: flow (udp:\S+) created", d.text())
        per_flow = collections.Counter(flow for _w, flow in created)
        assert len(per_flow) == 48
        assert set(per_flow.values()) == {1}
        workers = collections.Counter(w for w, _flow in created)
        assert set(workers) == {"0", "1"}
        # SIGHUP reaches the workers; --workers / queues is not a [vnic] change
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log("configuration reloaded")
        time.sleep(0.5)
        assert "need a restart" not in d.text()
        assert d.stop() == 0
        # the worker's own counters: it forwarded exactly its flows' datagrams
        final = re.findall(r" w1 vstack\.workers: final counters (.*)", d.text())
        assert final
        c = dict(kv.split("=") for kv in final[-1].split())
        assert int(c["fast_packets"]) + int(c["slow_packets"]) == workers["1"] * 40
        assert int(c["flows_created"]) == workers["1"]
        assert _leftovers(tb, "vstk0") == []


def test_sigkill_of_the_parent_takes_the_workers_down(tmp_path) -> None:
    with Testbed(prefix="vw") as tb:
        d = Daemon(tb, tmp_path, _config("vstk0")).start()
        d.wait_log("worker 1 ready")
        pids = re.findall(r"2 workers: pids (\d+)", d.text())
        assert pids
        d.stop(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if tb.run(tb.edge, ["kill", "-0", pids[0]], check=False).returncode != 0:
                break
            time.sleep(0.1)
        assert tb.run(tb.edge, ["kill", "-0", pids[0]], check=False).returncode != 0
        # the TUN vanished with its last queue; a restart recovers the rest
        assert "vstk0" not in tb.run(tb.edge, ["ip", "link"]).stdout
        d2 = Daemon(tb, tmp_path, _config("vstk0"), name="vstk0b")
        d2.cfg.write_text(_config("vstk0"))
        d2.start()
        assert d2.stop() == 0
        assert _leftovers(tb, "vstk0") == []


def test_worker_db_names() -> None:
    assert worker_db("sqlite:////tmp/x.db", 0) == "sqlite:////tmp/x.db"
    assert worker_db("sqlite:////tmp/x.db", 2) == "sqlite:////tmp/x-w2.db"
    assert worker_db("", 3) == ""

"""The switching experiment's analysis on synthetic server CSVs (no root, no testbed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vstack.cli.serve import BinCounter
from vstack.dccp.experiment import Switch, SwitchRun, analyse, plot, summary_lines

T0 = 1000.0  # CLOCK_MONOTONIC seconds, any value


def _write(path: Path, bins: dict[int, int]) -> str:
    c = BinCounter()
    for k, n in bins.items():
        for i in range(n):  # one packet per millisecond within the bin
            c.add(100, (T0 / 0.01 + k) * 0.01 + i * 0.001 + 0.0005)
    c.write_csv(path)
    return str(path)


def _run(tmp: Path, udp: dict[int, int], dccp: dict[int, int], sent: int) -> SwitchRun:
    return SwitchRun(sent=sent, t0=T0, t1=T0 + 3.0, rate=1000.0,
                     switches=[Switch(T0 + 1.0, "dccp", False), Switch(T0 + 2.0, "udp", True)],
                     udp_csv=_write(tmp / "u.csv", udp), dccp_csv=_write(tmp / "d.csv", dccp))


def test_gaps_loss_and_ratio(tmp_path: Path) -> None:
    # 10 packets per 10 ms bin; UDP for 1 s, DCCP after a 50 ms handshake hole, UDP again
    udp = {k: 10 for k in range(0, 100)} | {k: 10 for k in range(200, 300)}
    dccp = {k: 10 for k in range(105, 200)}
    run = _run(tmp_path, udp, dccp, sent=3000)
    run.daemon_log = "INFO vstack.dccp: dccp to 10.0.0.2:7001 open (CCID 2) after 6.5 ms, 3 queued"
    f = analyse(run, tmp_path)
    assert f.handshake_ms == 6.5
    assert f.received_udp == 2000 and f.received_dccp == 950
    assert f.lost == 50
    assert f.first_switch_gap_ms == pytest.approx(50.0, abs=0.2)
    assert f.cached_switch_gap_ms == 0.0
    assert f.empty_bins == 5
    assert f.dccp_udp_ratio == 1.0
    assert json.loads(f.to_json())["lost"] == 50
    assert any("lost 50" in line for line in summary_lines(f))
    png = plot(f, run, tmp_path / "s.png")
    assert Path(png).stat().st_size > 1000


def test_gap_from_bins_without_arrival_times(tmp_path: Path) -> None:
    """CSVs without first/last columns: the gap is counted in empty 10 ms bins."""
    udp = {k: 10 for k in range(0, 100)} | {k: 10 for k in range(200, 300)}
    dccp = {k: 10 for k in range(105, 200)}
    run = _run(tmp_path, udp, dccp, sent=3000)
    for path in (run.udp_csv, run.dccp_csv):
        lines = Path(path).read_text().splitlines()
        Path(path).write_text("\n".join(",".join(ln.split(",")[:3]) for ln in lines) + "\n")
    f = analyse(run, tmp_path)
    assert f.first_switch_gap_ms == 50.0 and f.cached_switch_gap_ms == 0.0


def test_slower_dccp_gives_lower_ratio(tmp_path: Path) -> None:
    udp = {k: 10 for k in range(0, 100)} | {k: 10 for k in range(200, 300)}
    dccp = {k: 5 for k in range(100, 200)}
    f = analyse(_run(tmp_path, udp, dccp, sent=3000), tmp_path)
    assert f.dccp_udp_ratio == 0.5
    assert f.first_switch_gap_ms == 0.0
    assert f.lost == 500

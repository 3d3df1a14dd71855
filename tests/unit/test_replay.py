"""Replay: deterministic decisions from pcap/pcapng/JSONL traces through the real classifier
and DecisionEngine; corrupt or truncated input reported with its position, skipped, counted."""

from __future__ import annotations

import base64
import json
import sqlite3
import struct
from pathlib import Path

import dpkt
import pytest
from typer.testing import CliRunner

import db
from vstack.analysis.flowkey import FlowKey
from vstack.analysis.packet import build_icmp_echo, build_tcp, build_udp
from vstack.cli import app
from vstack.decision.events import Event
from vstack.decision.parser import parse_rules
from vstack.log.recorder import TraceRecorder
from vstack.log.writer import LogWriter, RunInfo
from vstack.replay import (
    TraceProblem,
    TraceReader,
    choices_from_db,
    choices_from_result,
    compare,
    engine_factory,
    replay,
)

RULES = """\
param big = 600
rule bulk priority 10: on flow.new if proto == "udp" and payload_len > big then use_stack(tcp)
rule web priority 5: on flow.new if proto == "tcp" then use_stack(tcp)
rule small: on flow.new then use_stack(udp), start_timer(tick, 1.5s, repeat=true)
rule lossy priority 10: on flow.metrics if stack == "udp" and loss > 0.1 then use_stack(dccp)
rule tick: on timer.tick if stack == "dccp" then use_stack(udp)
"""


def _packets() -> list[tuple[float, bytes]]:
    """Twelve flows (UDP v4/v6 of several sizes, TCP, ICMP echo) with replies."""
    out: list[tuple[float, bytes]] = []
    t = 1000.0
    for i in range(8):
        out.append((t, build_udp("10.0.0.1", "10.201.1.2", 5000 + i, 9000, b"x" * (i * 180))))
        out.append((t + 0.1, build_udp("10.201.1.2", "10.0.0.1", 9000, 5000 + i, b"r")))
        out.append((t + 0.2, build_udp("10.0.0.1", "10.201.1.2", 5000 + i, 9000, b"y")))
        t += 0.5
    out.append((t, build_udp("fd00::1", "fd01::2", 4000, 9000, b"z" * 1000)))
    out.append((t + 0.1, build_tcp("10.0.0.1", "10.201.1.3", 40000, 443, flags="S")))
    out.append((t + 0.2, build_tcp("10.201.1.3", "10.0.0.1", 443, 40000, flags="SA")))
    out.append((t + 0.3, build_icmp_echo("10.0.0.1", "10.201.1.4", 77, 1, b"ping")))
    out.append((t + 0.35, build_icmp_echo("10.201.1.4", "10.0.0.1", 77, 1, b"ping",
                                          reply=True)))
    out.append((t + 0.4, build_icmp_echo("10.0.0.1", "10.201.1.4", 77, 2, b"ping")))
    out.append((t + 5.0, build_udp("10.0.0.9", "10.201.1.2", 6000, 9000, b"late")))
    return out


N_FLOWS = 12


def _write_pcap(path: Path, frames: list[tuple[float, bytes]], linktype: int) -> None:
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, snaplen=65535, linktype=linktype)
        for ts, frame in frames:
            w.writepkt(frame, ts=ts)


def _eth(ip: bytes, vlan: bool = False) -> bytes:
    etype = b"\x86\xdd" if ip[0] >> 4 == 6 else b"\x08\x00"
    tag = b"\x81\x00\x00\x05" if vlan else b""
    return b"\x02" * 6 + b"\x04" * 6 + tag + etype


def _frames(link: str) -> list[tuple[float, bytes]]:
    out = []
    for i, (ts, ip) in enumerate(_packets()):
        etype = b"\x86\xdd" if ip[0] >> 4 == 6 else b"\x08\x00"
        if link == "eth":
            out.append((ts, _eth(ip, vlan=bool(i % 2)) + ip))
        elif link == "sll":
            out.append((ts, b"\x00\x00\x00\x01\x00\x06" + b"\x02" * 6 + b"\x00\x00" + etype + ip))
        elif link == "sll2":
            out.append((ts, etype + b"\x00\x00" + b"\x00\x00\x00\x02\x00\x01\x00\x06"
                        + b"\x02" * 6 + b"\x00\x00" + ip))
        elif link == "null":
            fam = 30 if ip[0] >> 4 == 6 else 2
            out.append((ts, struct.pack("<I", fam) + ip))
        else:
            out.append((ts, ip))
    return out


LINKS = {"raw": 101, "raw12": 12, "eth": 1, "sll": 113, "sll2": 276, "null": 0}


@pytest.fixture(scope="module")
def ruleset():
    return parse_rules(RULES, "test.rules")


def _run(trace, rs, **kw):
    problems: list[TraceProblem] = []
    res = replay(trace, engine_factory(rs, **kw), on_problem=problems.append)
    return res, problems


def test_same_trace_same_rules_identical_decisions(tmp_path: Path, ruleset) -> None:
    p = tmp_path / "a.pcap"
    _write_pcap(p, _frames("raw"), 101)
    runs = [_run(p, ruleset, exploration=0.5, seed=7)[0] for _ in range(3)]
    sums = [[d.summary() for d in r.decisions] for r in runs]
    assert sums[0] == sums[1] == sums[2]
    assert runs[0].stats.flows == N_FLOWS
    assert runs[0].stats.packets_in == 10  # 8 UDP replies, the SYN-ACK, the echo reply
    # the decisions themselves: big UDP flows -> tcp, small -> udp, TCP -> tcp
    res = _run(p, ruleset, backend="reference")[0]
    first = res.first_decisions()
    assert first["udp:10.0.0.1:5000->10.201.1.2:9000"].decision.stack == "udp"
    assert first["udp:10.0.0.1:5007->10.201.1.2:9000"].decision.stack == "tcp"
    assert first["tcp:10.0.0.1:40000->10.201.1.3:443"].decision.rule == "web"
    assert first["udp:[fd00::1]:4000->[fd01::2]:9000"].decision.stack == "tcp"
    # the durable backend decides the same as the reference one
    assert [d.summary() for d in _run(p, ruleset)[0].decisions] == \
        [d.summary() for d in res.decisions]
    # exploration with another seed draws differently (and logs propensities)
    other = _run(p, ruleset, exploration=0.5, seed=8)[0]
    assert [d.summary() for d in other.decisions] != sums[0]
    assert all(0 < d.decision.propensity <= 1 for d in other.decisions)


@pytest.mark.parametrize("link", sorted(LINKS))
def test_link_types_give_the_same_decisions(tmp_path: Path, ruleset, link: str) -> None:
    ref = tmp_path / "ref.pcap"
    _write_pcap(ref, _frames("raw"), 101)
    p = tmp_path / f"{link}.pcap"
    _write_pcap(p, _frames(link.removesuffix("12")), LINKS[link])
    a, pa = _run(ref, ruleset, backend="reference")
    b, pb = _run(p, ruleset, backend="reference")
    assert pa == pb == []
    assert [d.summary() for d in a.decisions] == [d.summary() for d in b.decisions]
    assert b.stats.flows == N_FLOWS


def test_pcapng_and_non_ip_frames(tmp_path: Path, ruleset) -> None:
    p = tmp_path / "a.pcapng"
    frames = _frames("eth")
    arp = b"\xff" * 6 + b"\x04" * 6 + b"\x08\x06" + b"\x00" * 28
    with open(p, "wb") as f:
        w = dpkt.pcapng.Writer(f, snaplen=65535, linktype=1)
        for ts, fr in frames[:5]:
            w.writepkt(fr, ts=ts)
        w.writepkt(arp, ts=frames[5][0])
        for ts, fr in frames[5:]:
            w.writepkt(fr, ts=ts)
    ref = tmp_path / "ref.pcap"
    _write_pcap(ref, _frames("raw"), 101)
    a = _run(ref, ruleset, backend="reference")[0]
    b, probs = _run(p, ruleset, backend="reference")
    assert probs == []
    assert b.stats.non_ip == 1
    assert [d.summary() for d in a.decisions] == [d.summary() for d in b.decisions]


def test_timers_fire_at_trace_times(tmp_path: Path, ruleset) -> None:
    """flow.metrics (JSONL) moves a lossy flow to DCCP; the repeating 1.5 s timer, armed at
    the first flow (t=1000), brings it back at its first tick after that: t=1004.5."""
    k = FlowKey(17, "10.0.0.1", 5000, "10.201.1.2", 9000)
    p = tmp_path / "t.jsonl"
    with TraceRecorder(p) as rec:
        rec.packet(build_udp(k.src, k.dst, k.sport, k.dport, b"a"), 1000.0, "app->net")
        rec.event(Event("flow.new", 1000.0, {}, k))  # regenerated by replay, not resubmitted
        rec.event(Event("flow.metrics", 1003.2, {"loss": 0.3, "stack": "udp",
                                                 "rate_bps": 1e6, "interval_s": 1.0}, k))
        rec.packet(build_udp(k.src, k.dst, k.sport, k.dport, b"b"), 1005.0, "app->net")
    res, probs = _run(p, ruleset)
    assert probs == []
    assert res.stats.events_regenerated == 1 and res.stats.events == 1
    got = [(d.time, d.cause, d.decision.stack, d.decision.rule) for d in res.decisions]
    assert got == [(1000.0, "flow.new", "udp", "small"),
                   (1003.2, "flow.metrics", "dccp", "lossy"),
                   (1004.5, "timer", "udp", "tick")]
    assert res.stats.timers == 3  # 1001.5, 1003.0, 1004.5 (due by the last item at 1005.0)
    assert choices_from_result(res)[str(k)].final == "udp"


def test_corrupt_and_truncated_pcap_reported_and_skipped(tmp_path: Path, ruleset) -> None:
    good = tmp_path / "good.pcap"
    _write_pcap(good, _frames("raw"), 101)
    data = bytearray(good.read_bytes())
    # record 4's header: captured length absurd
    offs = []
    pos = 24
    while pos < len(data):
        offs.append(pos)
        pos += 16 + struct.unpack_from("<I", data, pos + 8)[0]
    struct.pack_into("<I", data, offs[3] + 8, 0x7FFFFFFF)
    cut = bytes(data[: offs[-1] + 20])  # and the last record truncated
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(cut)
    res, probs = _run(bad, ruleset, backend="reference")
    assert len(probs) == 2 and res.stats.problems == 2
    assert probs[0].position == f"packet 4 at byte {offs[3]}"
    assert "corrupt record header" in probs[0].message
    assert probs[1].position == f"packet {len(offs)} at byte {offs[-1]}"
    assert "truncated record" in probs[1].message
    # record 4 (flow 5001's second packet) and the last one (flow 10.0.0.9) are lost; the
    # reader resynchronised at record 5: the rest replays
    assert res.stats.flows == N_FLOWS - 1
    assert res.stats.packets + res.stats.packets_in == len(offs) - 2


def test_snapped_pcap_is_padded(tmp_path: Path, ruleset) -> None:
    ip = build_udp("10.0.0.1", "10.201.1.2", 5000, 9000, b"x" * 1200)
    p = tmp_path / "snap.pcap"
    with open(p, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 96, 101))
        f.write(struct.pack("<IIII", 1000, 0, 96, len(ip)) + ip[:96])
    res, probs = _run(p, ruleset, backend="reference")
    assert probs == [] and res.stats.malformed == 0
    assert res.decisions[0].decision.stack == "tcp"  # payload_len 1200 > 600, as captured


def test_corrupt_pcapng_block_skipped(tmp_path: Path, ruleset) -> None:
    p = tmp_path / "a.pcapng"
    with open(p, "wb") as f:
        w = dpkt.pcapng.Writer(f, snaplen=65535, linktype=101)
        for ts, ip in _packets():
            w.writepkt(ip, ts=ts)
    data = bytearray(p.read_bytes())
    # find the 3rd EPB and break its trailing length
    pos, epbs = 0, []
    while pos < len(data):
        btype, blen = struct.unpack_from("<II", data, pos)
        if btype == 6:
            epbs.append((pos, blen))
        pos += blen
    at, blen = epbs[2]
    struct.pack_into("<I", data, at + 4, blen + 1000)
    p.write_bytes(bytes(data))
    res, probs = _run(p, ruleset, backend="reference")
    assert len(probs) == 1 and f"at byte {at}" in probs[0].position
    assert "corrupt block" in probs[0].message
    assert res.stats.packets + res.stats.packets_in == len(_packets()) - 1


def test_bad_jsonl_lines_reported_with_line_numbers(tmp_path: Path, ruleset) -> None:
    ip = build_udp("10.0.0.1", "10.201.1.2", 5000, 9000, b"x")
    ip2 = build_udp("10.0.0.2", "10.201.1.2", 5001, 9000, b"x" * 700)
    b64 = base64.b64encode(ip).decode()
    lines = [
        json.dumps({"kind": "header", "format": "vstack-trace", "version": 1}),
        json.dumps({"kind": "packet", "t": 1.0, "dir": "app->net", "len": len(ip), "data": b64}),
        "{not json",
        json.dumps({"kind": "packet", "t": 2.0, "data": "!!!notbase64"}),
        json.dumps({"kind": "teleport", "t": 2.0}),
        json.dumps({"kind": "event", "t": 2.5, "type": "flow.metrics", "flow": "bogus"}),
        json.dumps({"kind": "packet", "t": "soon", "data": b64}),
        json.dumps({"kind": "packet", "t": 3.0, "dir": "app->net",
                    "data": base64.b64encode(ip2[:128]).decode(), "len": len(ip2)}),
        json.dumps([1, 2]),
        '{"kind": "packet", "t": 4.0, "da',  # truncated last line
    ]
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines))
    res, probs = _run(p, ruleset, backend="reference")
    assert [pr.position for pr in probs] == ["line 3", "line 4", "line 5", "line 6", "line 7",
                                             "line 9", "line 10"]
    assert "not JSON" in probs[0].message and "truncated" in probs[-1].message
    assert "unknown record kind" in probs[2].message
    assert "not a flow key" in probs[3].message
    assert res.stats.problems == 7
    assert res.stats.flows == 2  # line 2 and line 8 (a snapped 700-byte packet)
    assert res.first_decisions()["udp:10.0.0.2:5001->10.201.1.2:9000"].decision.stack == "tcp"


def test_malformed_ip_counted(tmp_path: Path, ruleset) -> None:
    p = tmp_path / "m.pcap"
    _write_pcap(p, [(1.0, b"\x45\x00\x00"), (2.0, b"\x70" * 40),
                    (3.0, build_udp("10.0.0.1", "10.0.0.2", 1, 2))], 101)
    res, probs = _run(p, ruleset, backend="reference")
    assert probs == [] and res.stats.malformed == 2 and res.stats.flows == 1


def test_replay_writes_a_run_and_compares(tmp_path: Path, ruleset) -> None:
    trace = tmp_path / "a.pcap"
    _write_pcap(trace, _frames("raw"), 101)
    url = str(tmp_path / "d.sqlite")
    w = LogWriter(url, RunInfo(kind="replay", source=str(trace)), block=True)
    res = replay(trace, engine_factory(ruleset), sink=w)
    w.close()
    con = sqlite3.connect(url)
    assert con.execute("SELECT count(*) FROM flows").fetchone()[0] == N_FLOWS
    assert con.execute("SELECT count(*) FROM decisions").fetchone()[0] == len(res.decisions)
    assert con.execute("SELECT count(*) FROM events WHERE type='flow.new'").fetchone()[0] \
        == N_FLOWS
    con.close()
    engine = db.open_db(url)
    old = choices_from_db(engine, w.run_id)
    with pytest.raises(LookupError):
        choices_from_db(engine, 999)
    engine.dispose()
    assert old == choices_from_result(res)
    rs2 = parse_rules(RULES.replace("param big = 600", "param big = 100"), "b.rules")
    res2 = replay(trace, engine_factory(rs2))
    cmp = compare(old, choices_from_result(res2), w.run_id)
    changed = {d.flow: (d.old.stack, d.new.stack) for d in cmp.changed}
    assert changed == {f"udp:10.0.0.1:{5000 + i}->10.201.1.2:9000": ("udp", "tcp")
                       for i in (1, 2, 3)}
    assert cmp.transitions() == {"udp -> tcp": 3}


def test_cli_replay_json_and_compare(tmp_path: Path) -> None:
    trace = tmp_path / "a.pcap"
    _write_pcap(trace, _frames("raw"), 101)
    rules = tmp_path / "a.rules"
    rules.write_text(RULES)
    url = str(tmp_path / "d.sqlite")
    runner = CliRunner()
    r1 = runner.invoke(app, ["replay", str(trace), "--rules", str(rules), "--db", url, "--json"])
    assert r1.exit_code == 0, r1.output
    doc = json.loads(r1.stdout)
    assert doc["stats"]["flows"] == N_FLOWS and doc["run_id"] == 1
    rules.write_text(RULES.replace("param big = 600", "param big = 100"))
    r2 = runner.invoke(app, ["replay", str(trace), "--rules", str(rules), "--db", url,
                             "--compare", "1", "--json"])
    assert r2.exit_code == 0, r2.output
    cmp = json.loads(r2.stdout)["compare"]
    assert (cmp["old_run"], cmp["new_run"], cmp["changed"]) == (1, 2, 3)
    r3 = runner.invoke(app, ["replay", str(trace), "--rules", str(rules), "--db", url,
                             "--compare", "42"])
    assert r3.exit_code == 1 and "run 42 is not in the database" in r3.output
    r4 = runner.invoke(app, ["replay", str(trace), "--rules", str(rules),
                             "--db", "postgresql://x:y@127.0.0.1:1/z"])
    assert r4.exit_code == 1 and "error:" in r4.output
    rules.write_text("rule broken on flow.new")
    r5 = runner.invoke(app, ["replay", str(trace), "--rules", str(rules), "--no-db"])
    assert r5.exit_code == 2 and "a.rules:1:" in r5.output
    r6 = runner.invoke(app, ["db", "upgrade", "--db", url])
    assert r6.exit_code == 0 and "already at" in r6.output


def test_trace_reader_detects_formats(tmp_path: Path) -> None:
    a = tmp_path / "a.pcap"
    _write_pcap(a, _frames("raw")[:2], 101)
    b = tmp_path / "b.jsonl"
    b.write_text("")
    assert TraceReader(a).format == "pcap"
    assert TraceReader(b).format == "jsonl"
    assert list(TraceReader(b)) == []


def test_recorded_live_run_replays_to_the_same_decisions(tmp_path: Path, ruleset) -> None:
    """A datapath-like loop with the daemon's sink (LogWriter + recorder via open_sink):
    the replay of its recording decides exactly what the live run logged."""
    from vstack.analysis.classifier import Direction, classify, flow_new_event
    from vstack.decision.engine import DecisionEngine
    from vstack.log.recorder import RecordingSink, open_sink

    url = str(tmp_path / "live.sqlite")
    trace = tmp_path / "live.jsonl"
    sink = open_sink(url, RunInfo(kind="live"), record=str(trace))
    assert isinstance(sink, RecordingSink)
    writer = sink.inner
    assert isinstance(writer, LogWriter)
    eng = DecisionEngine(ruleset, None, sink, backend="reference")
    seen: set[FlowKey] = set()
    for ts, ip in _packets():
        c = classify(ip, Direction.APP_TO_NET)
        back = classify(ip, Direction.NET_TO_APP).key
        direction = "net->app" if back in seen else "app->net"
        sink.recorder.packet(ip, ts, direction)
        if direction == "app->net" and c.key not in seen:
            seen.add(c.key)
            ev = flow_new_event(c, ts)
            sink.event(ev)  # as the datapath does ...
            sink.flow_seen(c.key, ev.fields, ts)
            d = eng.decide(ev, ts)  # ... and the engine logs it too
            sink.decision(c.key, d, ts)
    k = FlowKey(17, "10.0.0.1", 5000, "10.201.1.2", 9000)
    m = Event("flow.metrics", 1003.9, {"loss": 0.5, "stack": "udp", "rate_bps": 1e5,
                                       "interval_s": 1.0}, k)
    sink.event(m)
    sink.outcome(k, "udp", m.time, m.fields)
    eng.submit(m, m.time)
    assert sink.dropped == 0 and sink.stats()["record"]["packets"] == len(_packets())
    sink.close()
    assert sink.recorder.events == N_FLOWS + 1  # each flow.new once, plus the metrics
    engine = db.open_db(url)
    live = choices_from_db(engine, writer.run_id)
    engine.dispose()
    res, probs = _run(trace, ruleset, backend="reference")
    assert probs == []
    assert choices_from_result(res) == live
    assert live[str(k)].final == "dccp"
    assert _count_rows(url, "events WHERE type='flow.new'") == N_FLOWS
    assert _count_rows(url, "outcomes") == 1


def _count_rows(url: str, what: str) -> int:
    con = sqlite3.connect(url)
    try:
        return int(con.execute(f"SELECT count(*) FROM {what}").fetchone()[0])
    finally:
        con.close()


# -- properties ---------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_HS = settings(max_examples=40, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


@_HS
@given(pkts=st.lists(st.tuples(st.floats(0, 1e9, allow_nan=False), st.integers(0, 1400),
                               st.integers(1, 65535), st.booleans(), st.booleans()),
                     max_size=8),
       evs=st.lists(st.tuples(st.floats(0, 1e9, allow_nan=False),
                              st.sampled_from(["flow.metrics", "link.down", "mgmt.congestion"]),
                              st.dictionaries(st.text(min_size=1, max_size=8),
                                              st.integers() | st.text(max_size=8)
                                              | st.floats(allow_nan=False,
                                                          allow_infinity=False),
                                              max_size=4)),
                    max_size=8))
def test_jsonl_round_trip(tmp_path_factory: pytest.TempPathFactory, pkts, evs) -> None:
    """What the recorder writes, the reader gives back: events exactly, packets as their
    first 128 bytes padded to their length (so they classify the same)."""
    from vstack.analysis.classifier import classify
    from vstack.replay import TraceEvent, TracePacket

    p = tmp_path_factory.mktemp("rt") / "t.jsonl"
    origs = []
    with TraceRecorder(p) as rec:
        for t, size, port, v6, reply in pkts:
            src, dst = ("fd00::1", "fd01::2") if v6 else ("10.0.0.1", "10.0.0.2")
            ip = build_udp(src, dst, port, 9000, b"\xab" * size)
            origs.append(ip)
            rec.packet(ip, t, "net->app" if reply else "app->net")
        for t, typ, fields in evs:
            rec.event(Event(typ, t, fields, _KEY))
    problems: list[TraceProblem] = []
    items = list(TraceReader(p, problems.append))
    assert problems == []
    got_p = [i for i in items if isinstance(i, TracePacket)]
    got_e = [i.event for i in items if isinstance(i, TraceEvent)]
    assert len(got_p) == len(pkts)
    for item, ip, (t, _s, _p, _v, reply) in zip(got_p, origs, pkts, strict=True):
        assert item.time == t and len(item.data) == len(ip)
        assert item.data[:128] == ip[:128]
        assert item.direction == ("net->app" if reply else "app->net")
        assert classify(item.data).fields() == classify(ip).fields()
    assert got_e == [Event(typ, t, fields, _KEY) for t, typ, fields in evs]


_KEY = FlowKey(17, "10.0.0.1", 5000, "10.0.0.2", 9000)


@_HS
@given(junk=st.binary(max_size=400), cut=st.integers(0, 2000))
def test_any_bytes_after_a_pcap_header_never_crash(tmp_path_factory: pytest.TempPathFactory,
                                                  junk: bytes, cut: int) -> None:
    """A valid pcap cut anywhere (header included) and followed by junk: the reader reports
    problems, never raises, and yields no more packets than records could fit."""
    p = tmp_path_factory.mktemp("fz") / "f.pcap"
    with open(p, "wb") as f:
        w = dpkt.pcap.Writer(f, snaplen=65535, linktype=101)
        for ts, ip in _packets()[:4]:
            w.writepkt(ip, ts=ts)
    good = p.read_bytes()
    data = good[: max(cut, 4)] + junk
    p.write_bytes(data)
    reader = TraceReader(p)
    items = list(reader)
    assert reader.format == "pcap"
    assert len(items) <= max(len(data) - 24, 0) // 16


@_HS
@given(text=st.text(max_size=300))
def test_any_text_as_jsonl_never_crashes(tmp_path_factory: pytest.TempPathFactory,
                                         text: str, ruleset) -> None:
    p = tmp_path_factory.mktemp("fz") / "f.jsonl"
    p.write_text(text)
    res, probs = _run(p, ruleset, backend="reference")
    assert res.stats.problems == len(probs)


def test_idle_timeout_reopens_flows(tmp_path: Path, ruleset) -> None:
    """With --idle-timeout, a 5-tuple that comes back after being idle is a new flow."""
    p = tmp_path / "idle.pcap"
    ip = build_udp("10.0.0.1", "10.201.1.2", 5000, 9000, b"a")
    _write_pcap(p, [(1000.0, ip), (1010.0, ip), (1100.0, ip)], 101)
    never, _ = _run(p, ruleset, backend="reference")
    assert never.stats.flows == 1 and never.stats.expired == 0
    problems: list[TraceProblem] = []
    res = replay(p, engine_factory(ruleset, backend="reference"), on_problem=problems.append,
                 idle_timeout=30.0)
    assert res.stats.flows == 2 and res.stats.expired == 1
    assert [d.time for d in res.decisions if d.cause == "flow.new"] == [1000.0, 1100.0]

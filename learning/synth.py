"""Synthetic decision logs with a planted policy (for tests, demos and the walkthrough).

Flows arrive with random classifier fields; the live ``DecisionEngine`` decides on them
with the *current* rules (``CURRENT_RULES``: TCP for port 443, UDP otherwise) and
ε-exploration, logging through a real ``LogWriter``. The outcome of each flow is then drawn
from the planted truth: large flows (``payload_len > threshold``) do better on TCP, small
ones on UDP, whatever the port::

    goodput (Mbit/s)   small   large          loss    small   large
    udp                  10      4            udp     0.01    0.05
    tcp                   6      8            tcp     0.01    0.01

plus Gaussian noise (``noise`` Mbit/s). Learning should recover ``payload_len <= threshold
-> udp, else tcp``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vstack.analysis.flowkey import FlowKey
from vstack.decision.events import Event

CURRENT_RULES = """\
# The "current" policy of the synthetic log: TCP for web ports, UDP for the rest.
rule web priority 10: on flow.new if dport == 443 then use_stack(tcp)
rule rest: on flow.new then use_stack(udp)
"""

TRUTH = {("udp", False): (10.0, 0.01), ("udp", True): (4.0, 0.05),
         ("tcp", False): (6.0, 0.01), ("tcp", True): (8.0, 0.01)}


@dataclass(frozen=True, slots=True)
class SynthReport:
    run_id: int
    flows: int
    explored: int
    threshold: int


def synthesize(url: str, *, flows: int = 2000, seed: int = 0, threshold: int = 600,
               exploration: float = 0.3, intervals: int = 3, noise: float = 1.0,
               start: float = 1_764_000_000.0, rules_text: str = CURRENT_RULES,
               trace: str | None = None) -> SynthReport:
    """Write one synthetic live run to ``url``; returns its run id and counts. ``trace``:
    also record the run as a JSONL trace (each flow's first packet and its metrics)."""
    from vstack.analysis.packet import build_udp
    from vstack.decision.engine import DecisionEngine
    from vstack.decision.parser import parse_rules
    from vstack.log.recorder import TraceRecorder
    from vstack.log.writer import LogWriter, RunInfo

    rng = random.Random(seed)
    rs = parse_rules(rules_text, "current.rules")
    writer = LogWriter(url, RunInfo(config={"synthetic": True, "threshold": threshold,
                                            "exploration": exploration, "seed": seed},
                                    rules_version=rs.source_hash[:12], host="synthetic",
                                    started=start), block=True)
    engine = DecisionEngine(rs, None, writer, backend="reference", exploration=exploration,
                            seed=seed)
    rec = TraceRecorder(trace, started=start, meta={"synthetic": True}) if trace else None
    explored = 0
    now = start
    for i in range(flows):
        now += rng.expovariate(20.0)
        payload = rng.randint(0, 1400)
        dport = rng.choice((53, 443, 5004, 9000))
        key = FlowKey(17, f"10.0.{i // 250}.{i % 250 + 1}", rng.randint(1024, 65535),
                      "10.201.1.2", dport)
        dscp = rng.choice((0, 0, 0, 46))
        fields: dict[str, object] = {"flow": str(key), "proto": "udp", "family": 4, "src": key.src,
                  "dst": key.dst, "sport": key.sport, "dport": dport,
                  "dscp": dscp, "tcp_flags": "",
                  "length": payload + 28, "payload_len": payload, "iface": "", "stack": ""}
        writer.flow_seen(key, fields, now)
        if rec is not None:
            rec.packet(build_udp(key.src, key.dst, key.sport, dport, bytes(payload),
                                 dscp=dscp), now, "app->net")
        d = engine.decide(Event("flow.new", now, fields, key), now)
        explored += d.explored
        stack = d.stack or "udp"
        good, loss = TRUTH.get((stack, payload > threshold), (1.0, 0.2))
        t = now
        for _ in range(intervals):
            t += 1.0
            g = max(good + rng.gauss(0.0, noise), 0.0)
            lo = min(max(loss + rng.gauss(0.0, loss / 4), 0.0), 1.0)
            pk = 100
            metrics = {"packets": pk, "bytes": int(g * 1e6 / 8), "rate_bps": g * 1e6,
                       "pps": float(pk), "loss": lo, "rtt_ms": -1.0, "drops": 0,
                       "interval_s": 1.0}
            ev = Event("flow.metrics", t, {**fields, **metrics, "stack": stack}, key)
            writer.event(ev)
            if rec is not None:
                rec.event(ev)
            writer.outcome(key, stack, t, metrics)
        writer.flow_seen(key, {}, t)
    engine.close()
    writer.close()
    if rec is not None:
        rec.close()
    return SynthReport(writer.run_id, flows, explored, threshold)


__all__ = ["CURRENT_RULES", "TRUTH", "SynthReport", "synthesize"]

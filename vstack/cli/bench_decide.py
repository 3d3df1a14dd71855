"""``vstack bench decide``: how fast the decision engine decides, and what reloads cost.

* latency: a flow's first packet (raw IPv4/UDP bytes) -> the classifier -> ``flow.new``
  event -> ``DecisionEngine.decide`` -> ``Decision``, per packet, for each backend:
  ``median_us``, ``p99_us``; ``decide_median_us`` is the engine alone.
* ``events_per_s``: events through the engine per second: ``flow.new`` decisions and
  ``flow.metrics`` submissions alternating, on the same flows.
* reloads: RSS before and after ``--reloads`` reloads of the rule file through
  ``RulesFile.reload`` (parse, check, compile, swap, free the old durable ruleset).

No timed assertions anywhere: this prints figures (the goal is median < 100 us).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import struct
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from vstack.cli.app import bench_app
from vstack.decision.engine import RulesFile
from vstack.decision.events import Event

DEFAULT_RULES = Path(__file__).resolve().parents[2] / "rules" / "default.rules"


def _csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp_packet(i: int, payload: bytes = b"x" * 160) -> bytes:
    """An IPv4/UDP packet of flow number ``i`` (distinct source ports and destinations)."""
    src = bytes((10, 0, 0, 1))
    dst = bytes((10, 201, (i >> 8) & 0xFF, i & 0xFF))
    sport = 10000 + (i % 50000)
    udp = struct.pack("!HHHH", sport, 9000, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xFFFF, 0, 64, 17, 0,
                      src, dst)
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + udp


def _rss_kb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024
    except OSError:  # pragma: no cover - not Linux
        import resource
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def bench_latency(rules_path: str, backend: str, n: int) -> dict[str, Any]:
    from vstack.analysis.classifier import classify, flow_new_event

    engine = RulesFile(rules_path).engine(None, None, backend=backend)
    packets = [udp_packet(i) for i in range(n)]
    warm = min(200, n)
    for p in packets[:warm]:  # warm up (lark/durable caches, allocator)
        c = classify(p)
        engine.decide(flow_new_event(c, 0.0), 0.0)
        engine.forget(c.key)
    full: list[int] = []
    only: list[int] = []
    now = 1.0
    gc.disable()
    try:
        for p in packets:
            t0 = time.perf_counter_ns()
            c = classify(p)
            ev = flow_new_event(c, now)
            t1 = time.perf_counter_ns()
            engine.decide(ev, now)
            t2 = time.perf_counter_ns()
            full.append(t2 - t0)
            only.append(t2 - t1)
        # events/s: decisions and metric reports alternate over the same flows
        keys = [classify(p).key for p in packets]
        for k in keys:
            engine.forget(k)
        t0 = time.perf_counter_ns()
        for i, p in enumerate(packets):
            c = classify(p)
            engine.decide(flow_new_event(c, now), now)
            engine.submit(Event("flow.metrics", now, {"loss": (i % 7) / 100.0,
                                                      "rate_bps": 1e6, "rtt_ms": 10.0},
                                keys[i]), now + 0.001 * i)
        elapsed = (time.perf_counter_ns() - t0) / 1e9
    finally:
        gc.enable()
    engine.close()
    full.sort()
    only.sort()
    return {
        "backend": backend,
        "n": n,
        "median_us": round(statistics.median(full) / 1000, 2),
        "p99_us": round(full[min(len(full) - 1, int(len(full) * 0.99))] / 1000, 2),
        "decide_median_us": round(statistics.median(only) / 1000, 2),
        "events_per_s": round(2 * n / elapsed, 1),
        "errors": engine.stats["errors"] + engine.stats["action_errors"],
    }


def bench_reloads(rules_path: str, reloads: int, *, free: bool = True) -> dict[str, Any]:
    rf = RulesFile(rules_path)
    engine = rf.engine(None, None, backend="durable")
    for _ in range(10):  # warm up caches before the first reading
        rf.reload(engine)
    gc.collect()
    before = _rss_kb()
    t0 = time.perf_counter()
    for _ in range(reloads):
        if not free:  # what reloads cost without delete_ruleset (for comparison only)
            engine._c.backend._handle = None
        if not rf.reload(engine):
            raise RuntimeError(rf.last_error or "reload failed")
    elapsed = time.perf_counter() - t0
    gc.collect()
    after = _rss_kb()
    engine.close()
    return {
        "reloads": reloads,
        "freed": free,
        "rss_before_mb": round(before / 1024, 2),
        "rss_after_mb": round(after / 1024, 2),
        "rss_growth_mb": round((after - before) / 1024, 2),
        "growth_kb_per_reload": round((after - before) / max(reloads, 1), 2),
        "reload_ms": round(1000 * elapsed / max(reloads, 1), 3),
    }


@bench_app.command("decide")
def bench_decide(
    n: Annotated[int, typer.Option("--n", help="flows (first packets) per backend")] = 5000,
    reloads: Annotated[int, typer.Option("--reloads", help="reloads for the RSS figure "
                                         "(0: skip)")] = 1000,
    rules: Annotated[str, typer.Option("--rules", help="rules file")] = str(DEFAULT_RULES),
    backend: Annotated[str, typer.Option("--backend", help="durable, reference or both")
                       ] = "both",
    leak_compare: Annotated[bool, typer.Option(
        "--leak-compare", help="also measure reloads that do not free the old ruleset")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Latency from a flow's first packet to its Decision; events/s; reload RSS."""
    if n < 1:
        raise typer.BadParameter("--n must be >= 1")
    if backend not in ("both", "durable", "reference"):
        raise typer.BadParameter("--backend is durable, reference or both")
    backends = ["durable", "reference"] if backend == "both" else [backend]
    results: dict[str, Any] = {"rules": rules, "goal_median_us": 100}
    for b in backends:
        results[b] = bench_latency(rules, b, n)
    first = results[backends[0]]
    for k in ("median_us", "p99_us", "events_per_s"):
        results[k] = first[k]  # the headline figures are the first backend's (durable)
    results["backend"] = backends[0]
    if reloads > 0:
        results["reload"] = bench_reloads(rules, reloads)
        if leak_compare:
            results["reload_unfreed"] = bench_reloads(rules, reloads, free=False)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    print(f"rules: {rules}")
    for b in backends:
        r = results[b]
        print(f"{b:>9}: first packet -> Decision median {r['median_us']:.1f} us, "
              f"p99 {r['p99_us']:.1f} us (engine alone median {r['decide_median_us']:.1f} us); "
              f"{r['events_per_s']:.0f} events/s  [n={r['n']}, errors={r['errors']}]")
    for key in ("reload", "reload_unfreed"):
        if key in results:
            r = results[key]
            print(f"{'reloads' if r['freed'] else 'unfreed':>9}: {r['reloads']} reloads, RSS "
                  f"{r['rss_before_mb']:.1f} -> {r['rss_after_mb']:.1f} MB "
                  f"({r['growth_kb_per_reload']:.1f} KB/reload, {r['reload_ms']:.2f} ms each)")

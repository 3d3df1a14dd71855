"""The durable-rules backend and the reference evaluator pick the same rules and actions.

Random well-typed rule sets (``vstack.decision.strategies``) and random events: both
backends must return the same matching rules in the same order, and the same effective
actions. Prefix membership goes to durable as precomputed boolean facts (see
``vstack.decision.durable``), so this also checks that precomputation.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vstack.decision import ast as A
from vstack.decision.checker import check
from vstack.decision.durable import DurableBackend, compile_ruleset
from vstack.decision.evaluator import ReferenceBackend, RuleIndex, effective, fire
from vstack.decision.parser import parse_rules
from vstack.decision.strategies import EVENTS, event_facts, rulesets


def both(index: RuleIndex, event: str, raw: dict[str, Any]) -> tuple[list[str], list[str],
                                                                      list[Any], list[Any]]:
    facts = index.prepare(event, raw)
    ref = ReferenceBackend(index).match(event, facts)
    dur_be = DurableBackend(index)
    try:
        dur = dur_be.match(event, facts)
        assert dur_be.stored_facts() == 0  # every asserted fact was retracted
    finally:
        dur_be.close()
    return ([r.name for r in ref], [r.name for r in dur],
            effective(fire(index, ref, facts)), effective(fire(index, dur, facts)))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rs=rulesets(), data=st.data())
def test_same_rules_and_actions(rs: A.RuleSet, data: st.DataObject) -> None:
    assert not [d for d in check(rs) if d.severity == "error"], [str(d) for d in check(rs)]
    index = RuleIndex(rs)
    backend = DurableBackend(index)
    try:
        for _ in range(4):
            event = data.draw(st.sampled_from(EVENTS))
            raw = data.draw(event_facts(event))
            facts = index.prepare(event, raw)
            ref = ReferenceBackend(index).match(event, facts)
            dur = backend.match(event, facts)
            assert [r.name for r in dur] == [r.name for r in ref], (event, facts)
            assert effective(fire(index, dur, facts)) == effective(fire(index, ref, facts))
        assert backend.stored_facts() == 0
    finally:
        backend.close()


SRC = """
param lim = 0.02
set core = {10.0.0.0/8, fd00::/8}
rule a priority 5: on flow.new if dst in core and not (dport in {53, 123}) then use_stack(dccp)
rule b priority 5: on flow.new if dst not in core or proto != "udp" then use_stack(tcp)
rule c: on flow.new if sport > dport then use_stack(udp), log("c")
rule d: on flow.metrics if not (loss <= lim) and rtt_ms != -1 then use_stack(dccp)
rule e: on flow.new if 1 < 2 and false then use_stack(raw)
"""


@pytest.mark.parametrize(("event", "raw", "expect"), [
    ("flow.new", {"dst": "10.1.2.3", "dport": 9000, "sport": 1, "proto": "udp"}, ["a"]),
    ("flow.new", {"dst": "fd00::7", "dport": 53, "sport": 60000, "proto": "udp"}, ["c"]),
    ("flow.new", {"dst": "192.0.2.1", "dport": 1, "sport": 2, "proto": "udp"}, ["b", "c"]),
    ("flow.new", {"dst": "", "proto": "udp"}, ["b"]),  # missing facts take defaults
    ("flow.metrics", {"loss": 0.5, "rtt_ms": 3.0}, ["d"]),
    ("flow.metrics", {"loss": 0.5}, []),  # rtt_ms defaults to -1
])
def test_known_cases(event: str, raw: dict[str, Any], expect: list[str]) -> None:
    index = RuleIndex(parse_rules(SRC, "k.rules"))
    ref, dur, ref_eff, dur_eff = both(index, event, raw)
    assert ref == expect
    assert dur == expect
    assert ref_eff == dur_eff


def test_constant_false_rules_are_not_compiled_and_prefixes_are_derived_facts() -> None:
    index = RuleIndex(parse_rules(SRC, "k.rules"))
    definition, names = compile_ruleset(index)
    assert "e" not in {r.name for r in names.values()}
    text = str(definition)
    assert "'p0': True" in text  # dst in core
    assert "'p0': False" in text  # dst not in core
    assert "$neq" in text and "$or" in text


@pytest.mark.parametrize("value", ["é", "a\nb", "tab\there", "back\\slash", 'q"q', "\u2603",
                                   "x\x01y"])
def test_strings_beyond_ascii_and_escapes(value: str) -> None:
    rs = A.RuleSet((
        A.Rule("eq", "mgmt.x", A.Compare("==", A.Name("who"), A.Literal("str", value)),
               (A.Action("log", (A.Literal("str", "eq"),)),), index=0),
        A.Rule("ne", "mgmt.x", A.Compare("!=", A.Name("who"), A.Literal("str", value)),
               (A.Action("log", (A.Literal("str", "ne"),)),), index=1),
    ))
    index = RuleIndex(rs)
    for who, expect in ((value, ["eq"]), (value + "!", ["ne"])):
        ref, dur, _, _ = both(index, "mgmt.x", {"who": who})
        assert ref == expect
        assert dur == expect


@pytest.mark.parametrize(("raw", "expect"), [
    ({"loss": 2e-05, "rate_bps": 1e21}, ["tiny", "huge"]),
    ({"loss": 1e-06, "rate_bps": 1e19}, []),
    ({"loss": float("nan"), "rate_bps": float("inf")}, ["huge"]),  # nan -> 0.0, inf -> max
    ({"loss": "garbage", "rate_bps": 5}, []),
])
def test_floats_durable_cannot_read_from_json_dumps(raw: dict[str, Any],
                                                    expect: list[str]) -> None:
    src = ("rule tiny: on flow.metrics if loss > 1e-05 then use_stack(dccp)\n"
           "rule huge: on flow.metrics if rate_bps >= 1e20 then use_stack(tcp)\n")
    index = RuleIndex(parse_rules(src, "f.rules"))
    ref, dur, ref_eff, dur_eff = both(index, "flow.metrics", raw)
    assert ref == expect
    assert dur == expect
    assert ref_eff == dur_eff

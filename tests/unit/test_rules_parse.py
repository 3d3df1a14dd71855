"""The .rules language: parsing, positions, syntax errors, and printer round trips."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vstack.decision import ast as A
from vstack.decision.parser import RulesSyntaxError, parse_duration, parse_rules, parse_rules_file
from vstack.decision.printer import format_ruleset
from vstack.decision.strategies import rulesets

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"


def one_rule(text: str) -> A.Rule:
    rs = parse_rules(text, "t.rules")
    assert len(rs.rules) == 1
    return rs.rules[0]


def test_full_rule_shape() -> None:
    r = one_rule('rule lossy priority 10: on flow.metrics if loss > 0.02 for 2s '
                 'then use_stack(dccp, ccid=2), log("x") at most once per 5s')
    assert r.name == "lossy"
    assert r.priority == 10
    assert r.event == "flow.metrics"
    assert r.cond == A.Compare(">", A.Name("loss"), A.Literal("float", 0.02))
    assert r.hold == 2.0
    assert r.once_per == 5.0
    assert [a.name for a in r.actions] == ["use_stack", "log"]
    assert r.actions[0].args == (A.Name("dccp"),)
    assert r.actions[0].kwargs == (("ccid", A.Literal("int", 2)),)


def test_defaults() -> None:
    r = one_rule("rule a: on flow.new then drop()")
    assert (r.priority, r.cond, r.hold, r.once_per) == (0, None, None, None)
    assert r.actions == (A.Action("drop"),)


def test_positions_are_one_based_line_and_column() -> None:
    rs = parse_rules("\n# c\n  rule a: on flow.new\n     if dport == 53 then drop()\n", "p.rules")
    r = rs.rules[0]
    assert (r.line, r.col) == (3, 3)
    assert (r.event_line, r.event_col) == (3, 14)
    assert isinstance(r.cond, A.Compare)
    assert (r.cond.line, r.cond.col) == (4, 9)
    assert isinstance(r.cond.right, A.Literal)
    assert (r.cond.right.line, r.cond.right.col) == (4, 18)
    assert (r.actions[0].line, r.actions[0].col) == (4, 26)


def test_precedence_not_and_or() -> None:
    r = one_rule("rule a: on flow.new if not a == 1 and b == 2 or c == 3 then drop()")
    c = r.cond
    assert isinstance(c, A.Or)
    assert isinstance(c.items[0], A.And)
    assert isinstance(c.items[0].items[0], A.Not)
    assert c.items[1] == A.Compare("==", A.Name("c"), A.Literal("int", 3))


def test_sets_prefixes_and_not_in() -> None:
    rs = parse_rules("set core = {10.0.0.0/8, fd00::/8, 192.0.2.1}\n"
                     "rule a: on flow.new if dst in core and dst not in {fd00::1} "
                     'and dport in {53, 123} and proto in {"udp"} then drop()', "s.rules")
    items = rs.sets[0].items.items
    assert [i.kind for i in items if isinstance(i, A.Literal)] == ["prefix", "prefix", "addr"]
    assert items[1] == A.Literal("prefix", ipaddress.ip_network("fd00::/8"))
    c = rs.rules[0].cond
    assert isinstance(c, A.And)
    assert c.items[0] == A.InSet(A.Name("dst"), A.SetName("core"), False)
    assert c.items[1] == A.InSet(A.Name("dst"), A.SetLit((A.Literal("addr", "fd00::1"),)), True)


def test_literals() -> None:
    r = one_rule('rule a: on flow.new if x == -3 and y == 1.5e3 and z == "q\\"\\n" '
                 "and w == true and v == 2001:DB8::1 then retarget([2001:db8::2]:80), "
                 "retarget(10.0.0.1:9000), start_timer(t, 500ms, repeat=true)")
    assert isinstance(r.cond, A.And)
    vals = [t.right for t in r.cond.items if isinstance(t, A.Compare)]
    assert vals[0] == A.Literal("int", -3)
    assert vals[1] == A.Literal("float", 1500.0)
    assert vals[2] == A.Literal("str", 'q"\n')
    assert vals[3] == A.Literal("bool", True)
    assert vals[4] == A.Literal("addr", "2001:db8::1")  # canonical form
    assert r.actions[0].args[0] == A.Literal("addrport", ("2001:db8::2", 80))
    assert r.actions[1].args[0] == A.Literal("addrport", ("10.0.0.1", 9000))
    assert r.actions[2].args[1] == A.Literal("duration", 0.5)
    assert r.actions[2].kwargs == (("repeat", A.Literal("bool", True)),)


@pytest.mark.parametrize(("text", "seconds"), [("2s", 2.0), ("500ms", 0.5), ("1.5s", 1.5),
                                                ("2m", 120.0), ("1h", 3600.0)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    r = one_rule(f"rule a: on flow.metrics if loss > 0.1 for {text} then drop()")
    assert r.hold == seconds


def test_durations_named_by_params() -> None:
    rs = parse_rules("rule a: on flow.metrics if loss > 0.1 for h then drop() "
                     "at most once per g\nparam h = 500ms\nparam g = 3", "d.rules")
    r = rs.rules[0]
    assert (r.hold, r.hold_param, r.once_per, r.once_param) == (0.5, "h", 3.0, "g")


def test_rule_name_that_looks_hex_is_not_an_address() -> None:
    r = one_rule("rule dead: on flow.new then drop()")
    assert r.name == "dead"


@pytest.mark.parametrize(("text", "line", "col", "fragment"), [
    ("rule a: on flow.new then", 1, 25, "end of file"),
    ("rule a on flow.new then drop()", 1, 8, "'on'"),
    ("rule a: on flow.new if x = 1 then drop()", 1, 26, "'='"),
    ("rule a: on flow.new if x == then drop()", 1, 29, "unexpected 'then'"),
    ("rule then: on flow.new then drop()", 1, 6, "expected a name"),
    ("\n\nrule a: on flow.new then drop() @", 3, 33, "'@'"),
    ("param x = 10.0.0.1:99999", 1, 11, "port"),
    ("rule a: on flow.new then use_stack(dccp, ccid=2, 3)", 1, 50, "positional"),
    ("rule a: on flow.new then f(a=1, a=2)", 1, 26, "duplicate"),
    ("rule a: on flow.new if 10.0.0.0/33 == x then drop()", 1, 24, "bad literal"),
])
def test_syntax_errors_are_positioned(text: str, line: int, col: int, fragment: str) -> None:
    with pytest.raises(RulesSyntaxError) as ei:
        parse_rules(text, "bad.rules")
    e = ei.value
    assert (e.filename, e.line, e.col) == ("bad.rules", line, col), str(e)
    assert str(e).startswith(f"bad.rules:{line}:{col}: ")
    assert fragment in e.message


def test_unreadable_file_is_a_positioned_error(tmp_path: Path) -> None:
    with pytest.raises(RulesSyntaxError) as ei:
        parse_rules_file(str(tmp_path / "missing.rules"))
    assert str(ei.value).startswith(f"{tmp_path / 'missing.rules'}:1:1: cannot read")


def test_version_hash_follows_the_text() -> None:
    a = parse_rules("rule a: on flow.new then drop()")
    b = parse_rules("rule a: on flow.new then drop()  # changed")
    assert len(a.source_hash) == 64
    assert a.source_hash != b.source_hash


@pytest.mark.parametrize("name", ["paper.rules", "default.rules", "examples.rules"])
def test_shipped_rules_round_trip(name: str) -> None:
    rs = parse_rules_file(str(RULES_DIR / name))
    assert rs.rules
    again = parse_rules(format_ruleset(rs), name)
    assert again.rules == rs.rules
    assert again.params == rs.params
    assert again.sets == rs.sets


@settings(max_examples=60, deadline=None)
@given(rulesets())
def test_print_then_parse_is_identity(rs: A.RuleSet) -> None:
    text = format_ruleset(rs)
    again = parse_rules(text, "gen.rules")
    assert again.rules == rs.rules, text
    assert again.params == rs.params
    assert again.sets == rs.sets


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("rule on if then ()=<>!{},.:\"#\n 0123456789abs")),
               max_size=60))
def test_garbage_gives_a_positioned_error_or_a_ruleset(text: str) -> None:
    try:
        rs = parse_rules(text, "g.rules")
    except RulesSyntaxError as e:
        assert e.line >= 1 and e.col >= 1
        assert str(e).startswith(f"g.rules:{e.line}:{e.col}: ")
    else:
        assert isinstance(rs, A.RuleSet)

"""``vstack rules check``: diagnostics, their positions, errors vs warnings, exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from vstack.cli.app import rules_app
from vstack.cli.rules import check_files
from vstack.decision.checker import RulesCheckError, check, check_or_raise, exit_code
from vstack.decision.parser import parse_rules

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"


def diags(text: str) -> list[str]:
    return [str(d) for d in check(parse_rules(text, "c.rules"))]


def only(text: str) -> str:
    ds = diags(text)
    assert len(ds) == 1, ds
    return ds[0]


@pytest.mark.parametrize(("text", "expected"), [
    ("rule a: on flow.nw then drop()",
     "c.rules:1:12: error: unknown event 'flow.nw'"),
    ("rule a: on flow.new if lss > 0.1 then drop()",
     "c.rules:1:24: error: unknown field or param 'lss' for event 'flow.new'"),
    ("rule a: on flow.new if loss > 0.1 then drop()",  # metrics are not known at flow.new
     "c.rules:1:24: error: unknown field or param 'loss' for event 'flow.new'"),
    ("rule a: on flow.new then frob(1)",
     "c.rules:1:26: error: unknown action 'frob'"),
    ("rule a: on flow.new then use_stack(quic)",
     "c.rules:1:36: error: unknown stack 'quic'"),
    ('rule a: on flow.new then use_stack("quic")',
     "c.rules:1:36: error: unknown stack 'quic'"),
    ('rule a: on flow.new if dport == "53" then drop()',
     'c.rules:1:24: error: type error: compares num dport with str "53"'),
    ("rule a: on flow.new if dst == 53 then drop()",
     "c.rules:1:24: error: type error: compares addr dst with num 53"),
    ('rule a: on flow.new if proto < "udp" then drop()',
     "c.rules:1:24: error: type error: '<' needs numbers, not str"),
    ("rule a: on flow.new if dport in {10.0.0.0/8} then drop()",
     "c.rules:1:24: error: type error: num dport tested against a set of addr"),
    ("rule a: on flow.new if dst in nowhere then drop()",
     "c.rules:1:31: error: unknown set 'nowhere'"),
    ("rule a: on flow.new if dport > limit then drop()",
     "c.rules:1:32: error: unknown field or param 'limit' for event 'flow.new'"),
    ('param s = "quic"\nrule a: on flow.new then use_stack(s)',
     "c.rules:2:36: error: unknown stack 'quic'"),
    ("rule a: on flow.new then use_stack()",
     "c.rules:1:26: error: use_stack() takes 1 argument(s), got 0"),
    ("rule a: on flow.new then set_dscp(64)",
     "c.rules:1:35: error: set_dscp: DSCP must be an integer 0..63"),
    ("rule a: on flow.new then start_timer(t, 0s)",
     "c.rules:1:41: error: start_timer: the period is a positive duration"),
    ("rule a: on flow.new then start_timer(t, 1s, every=true)",
     "c.rules:1:51: error: start_timer() has no option 'every'"),
    ("rule a: on flow.new then retarget(53)",
     "c.rules:1:35: error: retarget: expected ADDR[:PORT], not int"),
    ("rule a: on flow.new then drop()\nrule a: on flow.new then drop()",
     "c.rules:2:1: error: duplicate rule name 'a' (first at line 1)"),
    ("param x = 1\nparam x = 2",
     "c.rules:2:1: error: duplicate definition of 'x'"),
])
def test_errors(text: str, expected: str) -> None:
    got = only(text)
    assert got.startswith(expected), got


def test_field_types_follow_the_event_schema() -> None:
    # metrics, link and management fields are known where they exist
    assert diags('rule a: on flow.metrics if loss > 0.1 and rtt_ms < 5 and proto == "udp" '
                 "then use_stack(dccp)") == []
    assert diags('rule a: on link.down if ifname == "veth0" and iface == ifname '
                 'then use_interface("veth1")') == []
    assert diags("rule a: on mgmt.congestion if level > 0.7 then use_stack(dccp)") == []
    assert diags('rule a: on mgmt.whatever if anything == "x" then log("free-form")') == []
    assert diags('rule a: on timer.flip if name == "flip" then log(name)') == []
    assert diags("rule a: on mgmt.switch then use_stack(stack)") == []  # field as the stack


def test_params_are_typed() -> None:
    assert diags("param lim = 0.5\nrule a: on flow.metrics if loss > lim then drop()") == []
    got = only('param lim = "x"\nrule a: on flow.metrics if loss > lim then drop()')
    assert got.startswith("c.rules:2:28: error: type error: compares num loss with str lim")


def test_shadowed_rule_is_a_warning_at_the_lower_rule() -> None:
    text = ('rule hi priority 5: on flow.new if proto == "udp" then use_stack(udp)\n'
            'rule lo: on flow.new if proto == "udp" and dport == 53 then use_stack(dccp)\n')
    got = only(text)
    assert got.startswith("c.rules:2:1: warning: rule 'lo' is shadowed by higher-priority "
                          "rule 'hi' (line 1)")


@pytest.mark.parametrize("text", [
    # the higher rule is narrower: no shadowing
    'rule hi priority 5: on flow.new if proto == "udp" and dport == 53 then use_stack(udp)\n'
    'rule lo: on flow.new if proto == "udp" then use_stack(dccp)\n',
    # a different event
    "rule hi priority 5: on flow.new then use_stack(udp)\n"
    "rule lo: on flow.metrics then use_stack(dccp)\n",
    # the higher rule may not fire (anti-flapping)
    "rule hi priority 5: on flow.metrics then use_stack(udp) at most once per 5s\n"
    "rule lo: on flow.metrics then use_stack(dccp)\n",
    # the lower rule only logs: it still runs
    "rule hi priority 5: on flow.new then use_stack(udp)\n"
    'rule lo: on flow.new then log("x")\n',
])
def test_no_false_shadowing(text: str) -> None:
    assert diags(text) == []


def test_durations_may_be_params() -> None:
    assert diags("param h = 2s\nparam g = 5\nrule a: on flow.metrics if loss > 0.1 for h "
                 "then use_stack(dccp) at most once per g") == []
    got = diags('param s = "x"\nrule a: on flow.metrics for nope then drop() '
                "at most once per s")
    assert got == ["c.rules:2:1: error: 'for nope': unknown param 'nope'",
                   "c.rules:2:1: error: 'at most once per s': param 's' is str, "
                   "not a duration"]


def test_for_on_flow_new_is_a_warning() -> None:
    got = only("rule a: on flow.new if dport == 53 for 2s then use_stack(udp)")
    assert got.startswith("c.rules:1:1: warning: rule 'a' never fires: 'for'")


def test_conflict_at_equal_priority_is_a_warning() -> None:
    text = ('rule a priority 3: on flow.new if dport > 1000 then use_stack(udp)\n'
            'rule b priority 3: on flow.new if dport < 2000 then use_stack(dccp)\n')
    got = only(text)
    assert got.startswith("c.rules:2:1: warning: conflicting actions: rules 'a' (line 1) and "
                          "'b' have the same event and priority 3")


@pytest.mark.parametrize("text", [
    'rule a: on flow.new if proto == "udp" then use_stack(udp)\n'
    'rule b: on flow.new if proto == "tcp" then use_stack(tcp)\n',
    "rule a: on flow.new if dport > 1000 then use_stack(udp)\n"
    "rule b: on flow.new if dport <= 1000 then use_stack(dccp)\n",
    "set core = {10.0.0.0/8}\n"
    "rule a: on flow.new if dst in core then use_stack(udp)\n"
    "rule b: on flow.new if dst not in core then use_stack(dccp)\n",
    'rule a: on timer.flip if stack == "udp" then use_stack(dccp)\n'
    'rule b: on timer.flip if stack == "dccp" then use_stack(udp)\n',
    "rule a: on flow.new if dport in {1, 2} then use_stack(udp)\n"
    "rule b: on flow.new if dport == 3 then use_stack(dccp)\n",
])
def test_disjoint_conditions_do_not_conflict(text: str) -> None:
    assert diags(text) == []


def test_exit_codes_and_ordering() -> None:
    text = ("rule hi priority 5: on flow.new then use_stack(udp)\n"
            "rule lo: on flow.new then use_stack(dccp)\n"
            "rule bad: on flow.metrics then use_stack(nope)\n")
    ds = check(parse_rules(text, "c.rules"))
    assert [d.severity for d in ds] == ["warning", "error"]
    assert [d.line for d in ds] == [2, 3]
    assert exit_code(ds) == 2
    assert exit_code([d for d in ds if d.severity == "warning"]) == 1
    assert exit_code([]) == 0
    with pytest.raises(RulesCheckError) as ei:
        check_or_raise(parse_rules(text, "c.rules"))
    assert [d.severity for d in ei.value.diagnostics] == ["error"]


@pytest.mark.parametrize("name", ["paper.rules", "default.rules", "examples.rules"])
def test_shipped_rules_are_clean(name: str) -> None:
    ds, code = check_files([str(RULES_DIR / name)])
    assert ds == []
    assert code == 0


def test_cli_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    clean = tmp_path / "clean.rules"
    clean.write_text("rule a: on flow.new then use_stack(udp)\n")
    warn = tmp_path / "warn.rules"
    warn.write_text("rule a priority 1: on flow.new then use_stack(udp)\n"
                    "rule b: on flow.new then use_stack(dccp)\n")
    bad = tmp_path / "bad.rules"
    bad.write_text("rule a: on flow.new then use_stack(udp\n")
    typed = tmp_path / "typed.rules"
    typed.write_text('rule a: on flow.new if dport == "x" then use_stack(udp)\n')

    r = runner.invoke(rules_app, ["check", str(clean)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(rules_app, ["check", str(warn)])
    assert r.exit_code == 1
    assert f"{warn}:2:1: warning: rule 'b' is shadowed" in r.output
    r = runner.invoke(rules_app, ["check", str(bad)])
    assert r.exit_code == 2
    assert f"{bad}:1:39: error: unexpected end of file" in r.output
    r = runner.invoke(rules_app, ["check", str(typed)])
    assert r.exit_code == 2
    assert f"{typed}:1:24: error: type error" in r.output
    r = runner.invoke(rules_app, ["check", str(clean), str(warn), str(bad)])
    assert r.exit_code == 2
    r = runner.invoke(rules_app, ["check", str(RULES_DIR / "paper.rules"),
                                  str(RULES_DIR / "default.rules"),
                                  str(RULES_DIR / "examples.rules")])
    assert r.exit_code == 0, r.output

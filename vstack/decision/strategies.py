"""Hypothesis strategies for well-typed ``.rules`` ASTs and matching events.

Used by the tests (printer/parser round trip, reference vs durable-rules equivalence);
every rule set they generate passes ``vstack rules check`` without errors.
"""

from __future__ import annotations

import ipaddress
from functools import cache
from typing import Any

from hypothesis import strategies as st

from vstack.decision import ast as A

STR_VALUES = ["udp", "tcp", "dccp", "", "veth0", 'a"b', "é\n", "tab\there", "back\\slash"]
ADDR_VALUES = ["10.0.0.1", "10.1.2.3", "192.0.2.7", "fd00::1", "2001:db8::5", "fe80::9"]
PREFIXES = ["10.0.0.0/8", "10.1.0.0/16", "fd00::/8", "2001:db8::/32", "192.0.2.7/32",
            "0.0.0.0/0"]
STACK_NAMES = ["udp", "dccp", "tcp", "raw"]

# Fields by type, per event; all events here also see the flow facts.
NUM_FIELDS = {"flow.new": ["dport", "sport", "dscp", "length", "payload_len"],
              "flow.metrics": ["dport", "loss", "rtt_ms", "rate_bps", "packets"],
              "link.down": ["index", "dport", "loss"],
              "timer.t": ["dport", "rtt_ms"]}
STR_FIELDS = {"flow.new": ["proto", "stack", "iface"],
              "flow.metrics": ["proto", "stack"],
              "link.down": ["ifname", "iface", "stack"],
              "timer.t": ["name", "stack", "proto"]}
ADDR_FIELDS = {"flow.new": ["src", "dst"], "flow.metrics": ["dst"], "link.down": ["dst"],
               "timer.t": ["src"]}
EVENTS = list(NUM_FIELDS)

PARAMS = (A.Param("p_num", A.Literal("float", 0.5)), A.Param("p_int", A.Literal("int", 53)),
          A.Param("p_str", A.Literal("str", "udp")),
          A.Param("p_dur", A.Literal("duration", 1.5)))
SETS = (A.SetDef("core", A.SetLit((A.Literal("prefix", ipaddress.ip_network("10.0.0.0/8")),
                                   A.Literal("prefix", ipaddress.ip_network("fd00::/8")),
                                   A.Literal("addr", "192.0.2.7")))),
        A.SetDef("ports", A.SetLit((A.Literal("int", 53), A.Literal("int", 123)))))

num_lit = st.one_of(
    st.integers(-5, 70000).map(lambda v: A.Literal("int", v)),
    st.sampled_from([0, 53, 123, 1500, -1]).map(lambda v: A.Literal("int", v)),
    st.sampled_from([0.0, 0.25, 0.5, -1.0, 53.0, 1e-3, 2.5, 1e-05, -2e-07, 1e20, 1.5e16]).map(
        lambda v: A.Literal("float", v)),
    st.sampled_from([0.5, 2.0]).map(lambda v: A.Literal("duration", v)),
)
str_lit = st.sampled_from(STR_VALUES).map(lambda v: A.Literal("str", v))
addr_lit = st.sampled_from(ADDR_VALUES).map(lambda v: A.Literal("addr", v))
prefix_lit = st.sampled_from(PREFIXES).map(
    lambda v: A.Literal("prefix", ipaddress.ip_network(v)))
OPS_ALL = ["==", "!=", "<", "<=", ">", ">="]
OPS_EQ = ["==", "!="]


@cache
def _leaf(event: str) -> st.SearchStrategy[A.Cond]:
    nf = [A.Name(n) for n in NUM_FIELDS[event]]
    sf = [A.Name(n) for n in STR_FIELDS[event]]
    af = [A.Name(n) for n in ADDR_FIELDS[event]]
    num_v = st.one_of(st.sampled_from(nf), num_lit,
                      st.sampled_from([A.Name("p_num"), A.Name("p_int"), A.Name("p_dur")]))
    str_v = st.one_of(st.sampled_from(sf), str_lit, st.just(A.Name("p_str")))
    addr_v = st.one_of(st.sampled_from(af), addr_lit)

    def cmp(vals: st.SearchStrategy[A.Value], ops: list[str]) -> st.SearchStrategy[A.Cond]:
        return st.builds(A.Compare, st.sampled_from(ops), vals, vals)

    value_set_num = st.lists(st.sampled_from([0, 53, 123, 1500, -1, 9000]).map(
        lambda v: A.Literal("int", v)), max_size=3).map(
        lambda xs: A.SetLit(tuple(xs)))
    value_set_str = st.lists(str_lit, max_size=3).map(lambda xs: A.SetLit(tuple(xs)))
    prefix_set = st.one_of(
        st.tuples(prefix_lit, st.lists(st.one_of(prefix_lit, addr_lit), max_size=2)).map(
            lambda t: A.SetLit((t[0], *t[1]))),
        st.just(A.SetName("core")))
    addr_value_set = st.lists(addr_lit, max_size=3).map(lambda xs: A.SetLit(tuple(xs)))
    return st.one_of(
        cmp(num_v, OPS_ALL),
        cmp(str_v, OPS_EQ),
        cmp(addr_v, OPS_EQ),
        st.builds(A.InSet, st.sampled_from(nf), st.one_of(value_set_num,
                                                           st.just(A.SetName("ports"))),
                  st.booleans()),
        st.builds(A.InSet, st.sampled_from(sf), value_set_str, st.booleans()),
        st.builds(A.InSet, st.sampled_from(af), st.one_of(prefix_set, addr_value_set),
                  st.booleans()),
        st.builds(A.BoolCond, st.booleans()),
    )


@cache
def conditions(event: str) -> st.SearchStrategy[A.Cond]:
    return st.recursive(
        _leaf(event),
        lambda inner: st.one_of(
            st.lists(inner, min_size=2, max_size=3).map(lambda xs: A.And(tuple(xs))),
            st.lists(inner, min_size=2, max_size=3).map(lambda xs: A.Or(tuple(xs))),
            inner.map(A.Not),
        ),
        max_leaves=6,
    )


@st.composite
def _rule(draw: st.DrawFn, index: int) -> A.Rule:
    event = draw(st.sampled_from(EVENTS))
    cond = draw(st.one_of(st.none(), conditions(event)))
    actions = [A.Action("use_stack", (A.Name(draw(st.sampled_from(STACK_NAMES))),))]
    if draw(st.booleans()):
        actions.append(A.Action("log", (A.Literal("str", f"rule {index}"),)))
    if draw(st.booleans()):
        actions.append(A.Action("set_dscp", (A.Literal("int", draw(st.integers(0, 63))),)))
    hold = draw(st.one_of(st.none(), st.sampled_from([0.5, 2.0, "p_dur"])))
    once = draw(st.one_of(st.none(), st.sampled_from([1.0, 5.0, "p_dur"])))
    hold_p = hold if isinstance(hold, str) else None
    once_p = once if isinstance(once, str) else None
    return A.Rule(f"r{index}", event, cond, tuple(actions), draw(st.integers(0, 3)),
                  1.5 if hold_p else hold, 1.5 if once_p else once,  # type: ignore[arg-type]
                  index, hold_param=hold_p, once_param=once_p)


@st.composite
def rulesets(draw: st.DrawFn, max_rules: int = 6) -> A.RuleSet:
    n = draw(st.integers(1, max_rules))
    rules = tuple(draw(_rule(i)) for i in range(n))
    num = draw(st.sampled_from([0.0, 0.5, 0.02, 53.0]))
    params = (A.Param("p_num", A.Literal("float", num)), *PARAMS[1:])
    return A.RuleSet(rules, params, SETS, "gen.rules", f"{draw(st.integers(0, 2**32)):064x}")


def _value_for(name: str, event: str) -> st.SearchStrategy[Any]:
    if name in NUM_FIELDS[event]:
        return st.one_of(st.integers(-5, 70000), st.sampled_from([0, 53, 123, 1500, -1]),
                         st.sampled_from([0.0, 0.25, 0.5, -1.0, 53.0, 1e-3, 2.5, 1e-05, 3e-07,
                                          1e20, 1.5e16, float("nan"), float("inf")]))
    if name in ADDR_FIELDS[event]:
        return st.sampled_from([*ADDR_VALUES, "10.200.0.1", "fd00::abcd", ""])
    return st.sampled_from(STR_VALUES)


@st.composite
def event_facts(draw: st.DrawFn, event: str) -> dict[str, Any]:
    """Raw facts for ``event``: every generated field, some left out (-> defaults)."""
    out: dict[str, Any] = {}
    for name in [*NUM_FIELDS[event], *STR_FIELDS[event], *ADDR_FIELDS[event]]:
        if draw(st.integers(0, 9)) == 0:
            continue
        out[name] = draw(_value_for(name, event))
    return out

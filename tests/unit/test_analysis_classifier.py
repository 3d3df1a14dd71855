"""Classifier and ID extractor: fields match the decision schema, keys, directions, events."""

from __future__ import annotations

import pytest

from vstack.analysis.classifier import (
    Classification,
    Direction,
    classify,
    flow_key,
    flow_new_event,
    reverse,
    wire_key,
)
from vstack.analysis.flowkey import FlowKey
from vstack.analysis.packet import ParseError, build_icmp_echo, build_ipv4, build_tcp, build_udp
from vstack.decision.events import EVENT_SCHEMA, FLOW_FIELDS

_PY_TYPES = {"str": str, "int": int, "addr": str, "bool": bool, "float": float}


def _check_schema(c: Classification) -> dict[str, object]:
    f = c.fields()
    assert set(f) == set(FLOW_FIELDS)
    for name, typ in FLOW_FIELDS.items():
        assert isinstance(f[name], _PY_TYPES[typ]), name
    return f


def test_udp_classification() -> None:
    pkt = build_udp("10.0.0.1", "10.201.1.2", 5000, 9000, b"x" * 100, dscp=46)
    c = classify(pkt)
    assert c.key == FlowKey(17, "10.0.0.1", 5000, "10.201.1.2", 9000)
    assert (c.proto_name, c.family, c.tcp_flags, c.length, c.payload_len, c.dscp) == (
        "udp", 4, "", 128, 100, 46)
    assert c.direction is Direction.APP_TO_NET and not c.fragment and c.payload_offset == 28
    f = _check_schema(c)
    assert f["flow"] == "udp:10.0.0.1:5000->10.201.1.2:9000"
    assert (f["iface"], f["stack"]) == ("", "")
    assert FlowKey.parse(str(f["flow"])) == c.key


def test_tcp_and_icmp6_classification() -> None:
    c = classify(build_tcp("fd00::1", "fd01::2", 40000, 80, flags="SA"))
    assert (c.proto_name, c.family, c.tcp_flags, c.sport, c.dport) == ("tcp", 6, "SA", 40000, 80)
    _check_schema(c)
    e = classify(build_icmp_echo("fd00::1", "fd01::2", 4242, 1, b"p"))
    assert e.key == FlowKey(58, "fd00::1", 4242, "fd01::2", 0)
    assert (e.proto_name, e.sport, e.dport, e.tcp_flags) == ("icmp6", 4242, 0, "")
    assert str(e.key) == "icmp6:[fd00::1]:4242->[fd01::2]:0"


def test_fragment_and_unknown_protocol() -> None:
    frag = build_ipv4("10.0.0.1", "10.0.0.2", 17, b"\0" * 16, frag_offset=8)
    c = classify(frag)
    assert c.fragment and (c.sport, c.dport) == (0, 0) and c.key.proto == 17
    assert wire_key(frag) is None
    gre = classify(build_ipv4("10.0.0.1", "10.0.0.2", 47, b"\0" * 4))
    assert gre.proto_name == "47" and gre.fields()["proto"] == "47"


def test_direction() -> None:
    reply = build_udp("10.201.1.2", "10.0.0.1", 9000, 5000, b"r")
    k = flow_key(reply, Direction.NET_TO_APP)
    assert k == FlowKey(17, "10.0.0.1", 5000, "10.201.1.2", 9000)
    c = classify(reply, Direction.NET_TO_APP)
    assert (c.sport, c.dport, c.direction) == (5000, 9000, Direction.NET_TO_APP)
    assert reverse(k) == FlowKey(17, "10.201.1.2", 9000, "10.0.0.1", 5000)
    assert Direction.APP_TO_NET.reversed() is Direction.NET_TO_APP
    assert Direction.NET_TO_APP.reversed() is Direction.APP_TO_NET


def test_flow_new_event() -> None:
    c = classify(build_udp("10.0.0.1", "10.0.0.2", 1, 2))
    ev = flow_new_event(c, 12.5, iface="veth0", stack="udp")
    assert ev.type == "flow.new" and ev.time == 12.5 and ev.flow == c.key
    assert set(ev.fields) == set(EVENT_SCHEMA["flow.new"])
    assert ev.fields["iface"] == "veth0" and ev.fields["stack"] == "udp"


def test_accepts_bytearray_and_memoryview() -> None:
    pkt = build_udp("fd00::1", "fd00::2", 1, 2, b"abc")
    for buf in (bytearray(pkt), memoryview(pkt), memoryview(bytearray(pkt))):
        assert classify(buf).key == classify(pkt).key
        assert wire_key(buf) == wire_key(pkt)


def test_bad_input_raises_parse_error() -> None:
    for raw in (b"", b"\x45", b"garbage" * 3):
        with pytest.raises(ParseError):
            classify(raw)
        with pytest.raises(ValueError):  # ParseError is a ValueError
            flow_key(raw)

"""The sans-IO half of the netlink monitor: rtnetlink bytes in, decision events out."""

from __future__ import annotations

import itertools
import socket
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink import NLM_F_DUMP, NLM_F_MULTI, NLMSG_DONE, nlmsg
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import IFF_LOWER_UP, IFF_UP, ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from vstack.monitor.netlink import NetlinkTranslator, dump_request, link_is_up

UP = IFF_UP | IFF_LOWER_UP


def _enc(msg: Any, mtype: int, seq: int = 0, pid: int = 0, nlflags: int = 0) -> bytes:
    msg["header"] = {"type": mtype, "flags": nlflags, "sequence_number": seq, "pid": pid}
    msg.encode()
    return bytes(msg.data)


def link(index: int, name: str, flags: int, oper: str | None = None,
         mtype: int = RTM_NEWLINK, **kw: Any) -> bytes:
    m = ifinfmsg()
    m["index"], m["flags"] = index, flags
    m["attrs"] = [("IFLA_IFNAME", name)] + ([("IFLA_OPERSTATE", oper)] if oper else [])
    return _enc(m, mtype, **kw)


def addr(index: int, address: str, plen: int, mtype: int = RTM_NEWADDR, **kw: Any) -> bytes:
    m = ifaddrmsg()
    m["family"] = socket.AF_INET6 if ":" in address else socket.AF_INET
    m["index"], m["prefixlen"] = index, plen
    m["attrs"] = [("IFA_ADDRESS", address)]
    return _enc(m, mtype, **kw)


def route(dst: str | None, plen: int, oif: int, gw: str | None = None, table: int = 254,
          mtype: int = RTM_NEWROUTE, rflags: int = 0) -> bytes:
    m = rtmsg()
    m["family"] = socket.AF_INET
    m["dst_len"], m["table"], m["type"], m["flags"] = plen, table, 1, rflags
    attrs: list[tuple[str, Any]] = [("RTA_OIF", oif), ("RTA_TABLE", table)]
    if dst:
        attrs.append(("RTA_DST", dst))
    if gw:
        attrs.append(("RTA_GATEWAY", gw))
    m["attrs"] = attrs
    return _enc(m, mtype)


def kinds(t: NetlinkTranslator, data: bytes) -> list[tuple[str, str]]:
    return [(e.type, e.fields.get("ifname", "")) for e in t.feed(data, 5.0).events]


def test_link_is_up() -> None:
    assert link_is_up(UP, "UP") and link_is_up(UP, "UNKNOWN") and link_is_up(UP, None)
    assert not link_is_up(IFF_UP, "UP")  # no carrier
    assert not link_is_up(UP, "LOWERLAYERDOWN") and not link_is_up(IFF_LOWER_UP, "UP")


def test_link_transitions_only() -> None:
    t = NetlinkTranslator()
    assert kinds(t, link(3, "eth0", 0, "DOWN")) == []  # first seen, down: not news
    assert kinds(t, link(3, "eth0", UP, "UP")) == [("link.up", "eth0")]
    assert kinds(t, link(3, "eth0", UP, "UP")) == []  # a repeat
    assert kinds(t, link(3, "eth0", IFF_UP, "LOWERLAYERDOWN")) == [("link.down", "eth0")]
    assert kinds(t, link(3, "eth0", 0, "DOWN")) == []  # still down
    assert kinds(t, link(3, "eth0", UP, "UP")) == [("link.up", "eth0")]
    assert kinds(t, link(3, "eth0", UP, "UP", mtype=RTM_DELLINK)) == [("link.down", "eth0")]
    assert kinds(t, link(4, "new0", UP, "UNKNOWN")) == [("link.up", "new0")]
    ev = t.feed(link(4, "new0", 0), 7.5).events[0]
    assert ev.type == "link.down" and ev.time == 7.5 and ev.fields == {"ifname": "new0",
                                                                        "index": 4}


def test_seeding_dump_is_quiet_but_others_with_the_same_seq_are_not() -> None:
    t = NetlinkTranslator()
    t.portid, seq = 4242, 77
    t.quiet_seqs.add(seq)
    feed = t.feed(link(3, "eth0", UP, "UP", seq=seq, pid=4242, nlflags=NLM_F_MULTI), 1.0)
    assert feed.events == [] and t.links[3].up
    done = nlmsg()
    assert t.feed(_enc(done, NLMSG_DONE, seq=seq, pid=4242, nlflags=NLM_F_MULTI), 1.0).done == [seq]
    # Another process's request that happens to use the same seq: reported.
    assert kinds(t, link(3, "eth0", 0, "DOWN", seq=seq, pid=999)) == [("link.down", "eth0")]


def test_addresses_deduplicated_and_named_from_the_link() -> None:
    t = NetlinkTranslator()
    t.feed(link(3, "eth0", UP, "UP"), 0.0)
    ev = t.feed(addr(3, "fd00::1", 64), 1.0).events
    assert [(e.type, dict(e.fields)) for e in ev] == [
        ("addr.add", {"ifname": "eth0", "address": "fd00::1", "prefixlen": 64, "family": 6})]
    assert kinds(t, addr(3, "fd00::1", 64)) == []  # DAD / flag update
    assert kinds(t, addr(3, "10.0.0.1", 24)) == [("addr.add", "eth0")]
    assert kinds(t, addr(3, "fd00::1", 64, mtype=RTM_DELADDR)) == [("addr.del", "eth0")]
    assert kinds(t, addr(3, "fd00::1", 64)) == [("addr.add", "eth0")]  # back again


def test_interface_filter() -> None:
    t = NetlinkTranslator(ifnames={"eth1"})
    t.feed(link(2, "eth0", 0), 0.0)
    assert kinds(t, link(2, "eth0", UP, "UP")) == []
    assert kinds(t, link(3, "eth1", UP, "UP")) == [("link.up", "eth1")]
    assert kinds(t, addr(2, "10.0.0.1", 24)) == []
    assert kinds(t, route("10.1.0.0", 16, 2)) == []
    assert kinds(t, route("10.1.0.0", 16, 3)) == [("route.change", "eth1")]
    assert t.links[2].up  # state is still tracked for filtered interfaces


def test_routes() -> None:
    t = NetlinkTranslator()
    t.feed(link(3, "eth0", UP, "UP"), 0.0)
    (ev,) = t.feed(route(None, 0, 3, gw="10.0.0.254"), 1.0).events
    assert ev.type == "route.change"
    assert {k: ev.fields[k] for k in ("action", "dst", "gateway", "ifname")} == {
        "action": "add", "dst": "default", "gateway": "10.0.0.254", "ifname": "eth0"}
    (ev,) = t.feed(route("10.1.0.0", 16, 3, mtype=RTM_DELROUTE), 1.0).events
    assert ev.fields["action"] == "del" and ev.fields["dst"] == "10.1.0.0/16"
    assert kinds(t, route("10.0.0.1", 32, 3, table=255)) == []  # local table
    assert kinds(t, route("10.0.0.9", 32, 3, rflags=0x200)) == []  # cloned cache entry


def test_dump_request_round_trip() -> None:
    (m,) = MarshalRtnl().parse(dump_request("link", 12345))
    assert m["header"]["type"] == RTM_GETLINK and m["header"]["flags"] & NLM_F_DUMP
    assert m["header"]["sequence_number"] == 12345


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_raises(data: bytes) -> None:
    t = NetlinkTranslator()
    out = t.feed(data, 0.0)
    assert isinstance(out.events, list)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, IFF_UP, UP]),
                          st.sampled_from(["UP", "DOWN", "UNKNOWN", "LOWERLAYERDOWN"])),
                max_size=20))
def test_link_events_alternate(states: list[tuple[int, str]]) -> None:
    """Whatever the kernel repeats, reported link events alternate and match the state."""
    t = NetlinkTranslator()
    seen: list[str] = []
    for flags, oper in states:
        seen += [e.type for e in t.feed(link(3, "eth0", flags, oper), 0.0).events]
    assert all(x != y for x, y in itertools.pairwise(seen))
    if seen:
        assert (seen[-1] == "link.up") == t.links[3].up
        assert seen[0] == "link.up"

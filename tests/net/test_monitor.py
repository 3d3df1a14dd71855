"""The netlink monitor against the real kernel, inside a throwaway netns with a veth pair."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator

import pytest

from vstack.decision.events import Event
from vstack.monitor.netlink import NetlinkMonitor

pytestmark = pytest.mark.root


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns_veth() -> Iterator[tuple[str, str, str]]:
    suffix = f"{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
    ns, a, b = f"vsmon{suffix}", f"vma{suffix}", f"vmb{suffix}"  # <= 15 chars
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "add", a, "type", "veth", "peer", "name", b)
        yield ns, a, b
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


async def _until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(1000):  # a safety net against hanging, not a timing assertion
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def test_monitor_reports_link_addr_route_changes(netns_veth: tuple[str, str, str]) -> None:
    ns, a, b = netns_veth
    events: list[Event] = []

    def of(etype: str, **fields: object) -> list[Event]:
        return [e for e in events if e.type == etype
                and all(e.fields.get(k) == v for k, v in fields.items())]

    async def step(what: str, cond: Callable[[], bool], *ip_args: str) -> None:
        await asyncio.to_thread(_ip, "-n", ns, *ip_args)
        await _until(cond, what)

    async def main() -> dict[str, int]:
        loop = asyncio.get_running_loop()
        mon = NetlinkMonitor(loop, events.append, ifnames={a}, netns=ns)
        mon.start()
        try:
            await asyncio.wait_for(mon.ready, 30)
            assert events == []  # seeding reports nothing: both ends exist and are down
            # Peer up first: a stays down (admin down), so no event yet.
            await asyncio.to_thread(_ip, "-n", ns, "link", "set", b, "up")
            await step("a up", lambda: len(of("link.up")) == 1, "link", "set", a, "up")
            # Carrier loss through the peer: oper state changes, a stays admin up.
            await step("a down (peer)", lambda: len(of("link.down")) == 1,
                       "link", "set", b, "down")
            await step("a up (peer)", lambda: len(of("link.up")) == 2, "link", "set", b, "up")
            await step("a down (admin)", lambda: len(of("link.down")) == 2,
                       "link", "set", a, "down")
            await step("a up (admin)", lambda: len(of("link.up")) == 3, "link", "set", a, "up")

            await step("v4 addr", lambda: bool(of("addr.add", address="10.99.0.1")),
                       "addr", "add", "10.99.0.1/24", "dev", a)
            await step("v6 addr", lambda: bool(of("addr.add", address="fd99::1")),
                       "addr", "add", "fd99::1/64", "dev", a, "nodad")
            await step("route add", lambda: bool(of("route.change", action="add",
                                                    dst="10.98.0.0/24")),
                       "route", "add", "10.98.0.0/24", "via", "10.99.0.2", "dev", a)
            await step("route del", lambda: bool(of("route.change", action="del",
                                                    dst="10.98.0.0/24")),
                       "route", "del", "10.98.0.0/24", "via", "10.99.0.2", "dev", a)
            await step("v4 addr del", lambda: bool(of("addr.del", address="10.99.0.1")),
                       "addr", "del", "10.99.0.1/24", "dev", a)
            # Deleting an up link is a link.down (the veth pair goes with it).
            await step("link deleted", lambda: len(of("link.down")) == 3, "link", "del", a)
            return mon.counters
        finally:
            mon.close()

    counters = asyncio.run(main())

    link = [(e.type, e.fields["ifname"]) for e in events if e.type.startswith("link.")]
    assert link == [("link.up", a), ("link.down", a), ("link.up", a), ("link.down", a),
                    ("link.up", a), ("link.down", a)]  # transitions only, no repeats
    assert all(e.fields.get("ifname") in (a, "") for e in events)  # b is filtered out
    assert all(e.fields.get("ifname") == a for e in events if not e.type.startswith("route"))
    (v4,) = of("addr.add", address="10.99.0.1")
    assert v4.fields == {"ifname": a, "address": "10.99.0.1", "prefixlen": 24, "family": 4}
    (v6,) = of("addr.add", address="fd99::1")  # DAD/flag repeats are not reported again
    assert v6.fields["family"] == 6 and v6.fields["prefixlen"] == 64
    (radd,) = of("route.change", action="add", dst="10.98.0.0/24")
    assert radd.fields["gateway"] == "10.99.0.2" and radd.fields["ifname"] == a
    # The connected route the kernel adds with the address is reported; the local table is not.
    assert of("route.change", action="add", dst="10.99.0.0/24")
    assert not [e for e in events if e.type == "route.change" and e.fields.get("table") == 255]
    assert counters["malformed"] == 0 and counters["overruns"] == 0


def test_monitor_without_filter_sees_both_ends_and_new_links(
        netns_veth: tuple[str, str, str]) -> None:
    ns, a, b = netns_veth
    events: list[Event] = []

    async def main() -> None:
        mon = NetlinkMonitor(asyncio.get_running_loop(), events.append, netns=ns)
        mon.start()
        try:
            await asyncio.wait_for(mon.ready, 30)
            await asyncio.to_thread(_ip, "-n", ns, "link", "set", a, "up")
            await asyncio.to_thread(_ip, "-n", ns, "link", "set", b, "up")
            await _until(lambda: {e.fields["ifname"] for e in events if e.type == "link.up"}
                         == {a, b}, "both ends up")
            # lo was down when the monitor seeded its state; bringing it up is news.
            await asyncio.to_thread(_ip, "-n", ns, "link", "set", "lo", "up")
            await _until(lambda: any(e.fields.get("ifname") == "lo" for e in events
                                     if e.type == "link.up"), "lo up")
        finally:
            mon.close()

    asyncio.run(main())
    ups = [e.fields["ifname"] for e in events if e.type == "link.up"]
    assert sorted(ups) == sorted([a, b, "lo"])


def test_monitor_in_missing_netns_fails_cleanly() -> None:
    async def main() -> None:
        mon = NetlinkMonitor(asyncio.get_running_loop(), lambda e: None,
                             netns=f"vsnone{secrets.token_hex(3)}")
        mon.start()

    with pytest.raises(OSError):
        asyncio.run(main())

"""Netlink monitor: link, address and route changes as decision events.

Two halves, kept apart:

* ``NetlinkTranslator`` (sans-IO) takes rtnetlink datagrams (bytes) or messages parsed by
  pyroute2 and returns ``Event``s: ``link.up`` / ``link.down`` on *transitions* of the
  link state (a link is up when it is administratively up, has carrier
  (``IFF_UP`` and ``IFF_LOWER_UP``) and its operstate is ``UP`` or ``UNKNOWN``;
  RFC 2863 section 3.1.14 operStatus, as the kernel reports it in ``IFLA_OPERSTATE``),
  ``addr.add`` / ``addr.del`` (repeats of a known address, such as IPv6 DAD flag
  updates, are not reported again), and ``route.change`` for the main and other
  non-local tables (the kernel's local table and cloned cache entries are skipped).
  It keeps the last known state per interface; messages of a *seeding* dump only record
  state, so the first real change is the first event.
* ``NetlinkMonitor`` is the asyncio adapter: a non-blocking ``NETLINK_ROUTE`` socket,
  bound to the link, IPv4/IPv6 address and IPv4/IPv6 route multicast groups, read with
  ``loop.add_reader`` (no threads). On start it dumps links and addresses to seed the
  translator; after a receive-buffer overrun (``ENOBUFS``, events were lost) it dumps
  again and reports what changed. With ``netns=NAME`` the socket is opened inside that
  network namespace (pyroute2 forks a short-lived helper to do so).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import random
import socket
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import IFF_LOWER_UP, IFF_UP, ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from vstack.decision.events import Event

log = logging.getLogger("vstack.monitor")

GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE
          | RTMGRP_IPV6_ROUTE)
RT_TABLE_LOCAL = 255
RTM_F_CLONED = 0x200
UP_OPERSTATES = frozenset({"UP", "UNKNOWN"})
_FAMILY: dict[int, int] = {int(socket.AF_INET): 4, int(socket.AF_INET6): 6}


@dataclass(slots=True)
class _Link:
    name: str
    up: bool


def link_is_up(flags: int, operstate: str | None) -> bool:
    """Up = admin up, carrier, and an operstate that is not a down state."""
    if not (flags & IFF_UP and flags & IFF_LOWER_UP):
        return False
    return operstate is None or operstate in UP_OPERSTATES


def dump_request(kind: str, seq: int, family: int = socket.AF_UNSPEC) -> bytes:
    """An RTM_GETLINK (``kind="link"``) or RTM_GETADDR (``"addr"``) dump request."""
    msg: Any
    if kind == "link":
        msg, mtype = ifinfmsg(), RTM_GETLINK
    elif kind == "addr":
        msg, mtype = ifaddrmsg(), RTM_GETADDR
    else:
        raise ValueError(f"unknown dump kind {kind!r}")
    msg["family"] = family
    msg["header"]["type"] = mtype
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 0
    msg.encode()
    return bytes(msg.data)


@dataclass(frozen=True, slots=True)
class Feed:
    """What one datagram produced: events, and the dump sequence numbers it finished
    (``NLMSG_DONE`` or an error for that request), for requests from ``portid``."""

    events: list[Event]
    done: list[int]


class NetlinkTranslator:
    """Sans-IO: rtnetlink messages in, ``Event``s out. ``ifnames``: only these interfaces
    (None = all). ``quiet_seqs``: sequence numbers of dumps whose messages only seed
    state."""

    def __init__(self, ifnames: Collection[str] | None = None) -> None:
        self.ifnames: frozenset[str] | None = frozenset(ifnames) if ifnames is not None else None
        self.links: dict[int, _Link] = {}
        self.addrs: set[tuple[int, str, int]] = set()
        self.quiet_seqs: set[int] = set()
        self.portid = 0  # our socket's netlink port id: dump replies are addressed to it
        self._marshal = MarshalRtnl()
        self.counters: dict[str, int] = {"messages": 0, "events": 0, "malformed": 0,
                                         "errors": 0}

    # -- bytes in -------------------------------------------------------------------
    def feed(self, data: bytes, now: float) -> Feed:
        events: list[Event] = []
        done: list[int] = []
        try:
            msgs = list(self._marshal.parse(data))
        except Exception as e:  # pyroute2 raises assorted types on truncated input
            self.counters["malformed"] += 1
            log.warning("netlink: undecodable datagram (%d bytes): %s", len(data), e)
            return Feed(events, done)
        for msg in msgs:
            header = msg.get("header") or {}
            mtype, seq = header.get("type"), header.get("sequence_number", 0)
            # Notifications caused by another process's request carry *its* seq and pid,
            # so a reply to our own dump is recognised by both.
            ours = bool(seq) and header.get("pid") == self.portid
            if ours and mtype in (NLMSG_DONE, NLMSG_ERROR):
                if header.get("error") is not None:
                    self.counters["errors"] += 1
                    log.warning("netlink: request %d failed: %s", seq, header["error"])
                done.append(seq)
                continue
            ev = self.translate(msg, now, emit=not (ours and seq in self.quiet_seqs))
            if ev is not None:
                events.append(ev)
        return Feed(events, done)

    # -- one parsed message in ----------------------------------------------------------
    def translate(self, msg: Any, now: float, emit: bool = True) -> Event | None:
        """One pyroute2 message -> an event, or None (no change, filtered, or not ours).
        With ``emit=False`` the state is recorded and nothing is reported."""
        self.counters["messages"] += 1
        try:
            mtype = msg["header"]["type"]
            if mtype in (RTM_NEWLINK, RTM_DELLINK):
                ev = self._link(msg, mtype, now)
            elif mtype in (RTM_NEWADDR, RTM_DELADDR):
                ev = self._addr(msg, mtype, now)
            elif mtype in (RTM_NEWROUTE, RTM_DELROUTE):
                ev = self._route(msg, mtype, now)
            else:
                return None
        except (KeyError, TypeError, ValueError) as e:
            self.counters["malformed"] += 1
            log.warning("netlink: bad message: %s", e)
            return None
        if ev is None or not emit:
            return None
        self.counters["events"] += 1
        return ev

    def _wanted(self, ifname: str) -> bool:
        return self.ifnames is None or ifname in self.ifnames

    def _name(self, index: int) -> str:
        link = self.links.get(index)
        return link.name if link is not None else ""

    def _link(self, msg: Any, mtype: int, now: float) -> Event | None:
        index = int(msg["index"])
        old = self.links.get(index)
        name = msg.get_attr("IFLA_IFNAME") or (old.name if old else "")
        if mtype == RTM_DELLINK:
            self.links.pop(index, None)
            self.addrs = {a for a in self.addrs if a[0] != index}
            was_up = old is not None and old.up
            if was_up and self._wanted(name):
                return Event("link.down", now, {"ifname": name, "index": index})
            return None
        up = link_is_up(int(msg["flags"]), msg.get_attr("IFLA_OPERSTATE"))
        self.links[index] = _Link(name, up)
        # A new interface that comes up is news; one that appears down is not.
        changed = up if old is None else old.up != up
        if changed and self._wanted(name):
            return Event("link.up" if up else "link.down", now, {"ifname": name, "index": index})
        return None

    def _addr(self, msg: Any, mtype: int, now: float) -> Event | None:
        index = int(msg["index"])
        family = _FAMILY.get(int(msg["family"]))
        if family is None:
            return None
        address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if not address:
            return None
        prefixlen = int(msg["prefixlen"])
        ifname = self._name(index) or msg.get_attr("IFA_LABEL") or ""
        key = (index, address, prefixlen)
        if mtype == RTM_NEWADDR:
            if key in self.addrs:
                return None  # a repeat (flags, lifetimes, DAD): not a new address
            self.addrs.add(key)
            etype = "addr.add"
        else:
            self.addrs.discard(key)
            etype = "addr.del"
        if not self._wanted(ifname):
            return None
        return Event(etype, now, {"ifname": ifname, "address": address,
                                  "prefixlen": prefixlen, "family": family})

    def _route(self, msg: Any, mtype: int, now: float) -> Event | None:
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        if table == RT_TABLE_LOCAL or int(msg["flags"]) & RTM_F_CLONED:
            return None
        family = int(msg["family"])
        if family not in _FAMILY:
            return None
        dst_len = int(msg["dst_len"])
        dst_addr = msg.get_attr("RTA_DST")
        dst = "default" if dst_len == 0 else f"{dst_addr}/{dst_len}"
        gateway = msg.get_attr("RTA_GATEWAY") or ""
        oifs: list[int] = []
        oif = msg.get_attr("RTA_OIF")
        if oif is not None:
            oifs.append(int(oif))
        for hop in msg.get_attr("RTA_MULTIPATH") or ():
            oifs.append(int(hop["oif"]))
            gateway = gateway or hop.get_attr("RTA_GATEWAY") or ""
        names = [self._name(i) for i in oifs]
        if self.ifnames is not None and not any(n in self.ifnames for n in names):
            return None
        return Event("route.change", now, {
            "action": "add" if mtype == RTM_NEWROUTE else "del",
            "dst": dst, "gateway": gateway, "ifname": names[0] if names else "",
            "family": _FAMILY[family], "table": int(table)})


class NetlinkMonitor:
    """``NetlinkMonitor(loop, engine_submit, ifnames={"eth0", "wlan0"})``; ``start()``;
    ``await monitor.ready`` (seeded: later changes are reported); ``close()``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, submit: Callable[[Event], None], *,
                 ifnames: Iterable[str] | None = None, netns: str | None = None,
                 groups: int = GROUPS, clock: Callable[[], float] = time.time,
                 rcvbuf: int = 1 << 20) -> None:
        self.loop = loop
        self.submit = submit
        self.netns = netns
        self.groups = groups
        self.clock = clock
        self.rcvbuf = rcvbuf
        self.translator = NetlinkTranslator(set(ifnames) if ifnames is not None else None)
        self.ready: asyncio.Future[None] = loop.create_future()
        self.overruns = 0
        self.submit_errors = 0
        self._sock: socket.socket | None = None
        self._seq = itertools.count(random.randrange(1 << 20, 1 << 30))
        self._pending: list[tuple[str, bool]] = []  # dumps still to send: (kind, quiet)
        self._inflight: int | None = None

    @property
    def counters(self) -> dict[str, int]:
        return {**self.translator.counters, "overruns": self.overruns,
                "submit_errors": self.submit_errors}

    def start(self) -> None:
        if self.netns is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        else:
            from pyroute2 import netns as _netns

            # flags=0: do not create the namespace if it does not exist.
            sock = _netns.create_socket(self.netns, socket.AF_NETLINK, socket.SOCK_RAW,
                                        socket.NETLINK_ROUTE, flags=0)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.bind((0, self.groups))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.translator.portid = sock.getsockname()[0]
        self.loop.add_reader(sock.fileno(), self._on_readable)
        self._dump(quiet=True)
        log.info("netlink monitor started%s", f" in netns {self.netns}" if self.netns else "")

    def close(self) -> None:
        if self._sock is not None:
            self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if not self.ready.done():
            self.ready.cancel()

    def _dump(self, quiet: bool) -> None:
        """Queue a link dump then an address dump (the kernel runs one dump at a time per
        socket)."""
        self._pending.extend([("link", quiet), ("addr", quiet)])
        if self._inflight is None:
            self._next_dump()

    def _next_dump(self) -> None:
        if self._inflight is not None and self._inflight in self.translator.quiet_seqs:
            self.translator.quiet_seqs.discard(self._inflight)
        self._inflight = None
        if not self._pending:
            if not self.ready.done():
                self.ready.set_result(None)
            return
        kind, quiet = self._pending.pop(0)
        seq = next(self._seq)
        if quiet:
            self.translator.quiet_seqs.add(seq)
        self._inflight = seq
        assert self._sock is not None
        try:
            self._sock.send(dump_request(kind, seq))
        except OSError as e:
            log.warning("netlink: %s dump request failed: %s", kind, e)
            self._next_dump()

    def _on_readable(self) -> None:
        sock = self._sock
        for _ in range(64):  # then yield to the loop; the reader fires again
            if sock is None or self._sock is not sock:
                return
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.overruns += 1
                    log.warning("netlink: receive buffer overrun, events lost; resyncing")
                    self._dump(quiet=False)
                    continue
                log.error("netlink: recv failed: %s", e)
                return
            feed = self.translator.feed(data, self.clock())
            for ev in feed.events:
                try:
                    self.submit(ev)
                except Exception:
                    self.submit_errors += 1
                    log.exception("netlink event %s: submit failed", ev.type)
            if self._inflight is not None and self._inflight in feed.done:
                self._next_dump()

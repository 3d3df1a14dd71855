"""Configure the VNIC and the host around it, and take it all down again.

The routing design (see ``docs/datapath.md``):

* the configured destination prefixes (``all`` = ``0.0.0.0/0`` and ``::/0``) are routed
  through the TUN in a routing table of vstack's own (``[vnic] table``, default 22100);
* policy rules, IPv4 and IPv6: at ``rule_priority`` (100) ``fwmark 0x5654 lookup main``,
  at ``rule_priority + 1`` ``iif lo lookup 22100`` (packets this host originates) and
  ``iif <tun> lookup 22100`` (so the reverse-path check of packets vstack writes into the
  TUN finds the TUN). vstack's own sockets carry ``SO_MARK 0x5654``, hit the first rule and
  leave by the main table: they never loop back into the TUN;
* an nftables table ``inet vstack_<tun>``: traffic on the TUN is not tracked (the app's
  copy must not create a conntrack entry, or the raw stack's re-injected copy, with the
  same tuple, would not be NATed), and marked packets whose source is the TUN's address are
  masqueraded on the way out (the raw stack), so replies are de-NATed back to the app.

Everything added is recorded in a state file (``/run/vstack/<tun>.<netns>.state``) before
it is added, so ``teardown`` — on exit, on a signal, or at the next start after a crash —
removes exactly what is ours: the device by name, rules by priority+table, routes by table,
the nft table by name.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vstack.config import ConfigError, Target, VnicConfig, parse_endpoint
from vstack.vnic.tun import Tun, TunError, open_tun

log = logging.getLogger("vstack.vnic")

RUN_DIR = Path(os.environ.get("VSTACK_RUN_DIR", "/run/vstack"))
IFA_F_NODAD = 0x02
MAIN_TABLE = 254
TUN_TXQLEN = 4096


class SetupError(RuntimeError):
    """Setting up the VNIC failed; the message says why. Nothing is left behind."""


@dataclass
class NetState:
    """What vstack added (or is about to add) to this network namespace."""

    name: str
    pid: int
    netns: int
    table: int
    fwmark: int
    rule_priority: int
    nft_table: str
    families: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> NetState:
        return cls(**json.loads(text))


def netns_id() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def state_path(name: str) -> Path:
    return RUN_DIR / f"{name}.{netns_id()}.state"


def nft_table_name(name: str) -> str:
    return "vstack_" + "".join(c if c.isalnum() else "_" for c in name)


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sysctl(path: str, value: str) -> None:
    try:
        Path("/proc/sys", path).write_text(value)
    except OSError as e:
        log.warning("sysctl %s=%s: %s", path.replace("/", "."), value, e.strerror)


def _nft(script: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        p = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True,
                           timeout=10)
    except FileNotFoundError:
        raise SetupError("nft (nftables) is not installed; the raw stack needs it") from None
    if check and p.returncode != 0:
        raise SetupError(f"nft failed: {p.stderr.strip()}")
    return p


NatMap = Mapping[str, Mapping[str, Target]]


def raw_nat_rules(fwmark: int, nat: NatMap) -> list[str]:
    """nft rules for the ``raw`` entries of the NAT map: the raw stack's re-injected
    packets (marked) to a virtual destination are DNATed to the real target in the output
    hook; conntrack reverses it (and the masquerade) on the replies, so the application
    sees its virtual destination answer."""
    rules = []
    for vdst, per_stack in nat.items():
        t = per_stack.get("raw")
        if t is None:
            continue
        try:
            v = parse_endpoint(vdst, f"nat.{vdst}")
        except ConfigError:
            continue
        fam = "ip6" if ":" in v.address else "ip"
        addr = f"[{t.address}]" if fam == "ip6" and (v.port or t.port) else t.address
        match = f"meta mark 0x{fwmark:x} {fam} daddr {v.address}"
        if v.port is not None:
            match += f" meta l4proto {{ tcp, udp }} th dport {v.port}"
            to = f"{addr}:{t.port or v.port}"
        else:
            to = t.address
        rules.append(f"{match} dnat {fam} to {to}")
    return rules


def nft_ruleset(state: NetState, tun: str, addr4: str | None, addr6: str | None,
                nat: NatMap | None = None) -> str:
    mark = f"0x{state.fwmark:x}"
    dnat = "\n        ".join(raw_nat_rules(state.fwmark, nat or {}))
    masq = []
    if addr4:
        masq.append(f"meta mark {mark} ip saddr {addr4} oifname != \"{tun}\" masquerade")
    if addr6:
        masq.append(f"meta mark {mark} ip6 saddr {addr6} oifname != \"{tun}\" masquerade")
    body = "\n        ".join(masq)
    return f"""table inet {state.nft_table} {{
    chain raw_out {{
        type filter hook output priority raw; policy accept;
        oifname "{tun}" notrack
    }}
    chain raw_pre {{
        type filter hook prerouting priority raw; policy accept;
        iifname "{tun}" notrack
    }}
    chain nat_out {{
        type nat hook output priority -100; policy accept;
        {dnat}
    }}
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        {body}
    }}
}}
"""


def teardown(state: NetState) -> list[str]:
    """Remove everything ``state`` names; idempotent; returns what was removed."""
    from pyroute2 import IPRoute

    removed: list[str] = []
    with IPRoute() as ipr:
        for fam in (socket.AF_INET, socket.AF_INET6):
            try:
                rules = ipr.get_rules(family=fam)
            except Exception:
                continue
            for r in rules:
                prio = r.get_attr("FRA_PRIORITY")
                table = r.get_attr("FRA_TABLE") or r.get("table")
                ours = (prio == state.rule_priority and r.get_attr("FRA_FWMARK") == state.fwmark
                        and table == MAIN_TABLE) or (
                            prio == state.rule_priority + 1 and table == state.table)
                if ours:
                    with contextlib.suppress(Exception):
                        ipr.rule("del", family=fam, priority=prio, table=table,
                                 **({"fwmark": state.fwmark} if prio == state.rule_priority
                                    else {"iifname": r.get_attr("FRA_IIFNAME")}))
                        removed.append(f"rule {prio} v{4 if fam == socket.AF_INET else 6}")
            try:
                routes = ipr.get_routes(family=fam, table=state.table)
            except Exception:
                routes = []
            for rt in routes:
                if (rt.get_attr("RTA_TABLE") or rt.get("table")) != state.table:
                    continue
                dst = rt.get_attr("RTA_DST") or ("0.0.0.0" if fam == socket.AF_INET else "::")
                with contextlib.suppress(Exception):
                    ipr.route("del", family=fam, table=state.table, dst=f"{dst}/{rt['dst_len']}",
                              oif=rt.get_attr("RTA_OIF"))
                    removed.append(f"route {dst}/{rt['dst_len']} table {state.table}")
        idx = ipr.link_lookup(ifname=state.name)
        if idx:
            links = ipr.get_links(idx[0])
            info = links[0].get_attr("IFLA_LINKINFO") if links else None
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if kind == "tun":
                with contextlib.suppress(Exception):
                    ipr.link("del", index=idx[0])
                    removed.append(f"device {state.name}")
    p = _nft(f"delete table inet {state.nft_table}\n", check=False)
    if p.returncode == 0:
        removed.append(f"nft table {state.nft_table}")
    return removed


def recover(name: str) -> list[str]:
    """At start: if a previous vstack with this device name crashed in this netns, remove
    what it left. Raises SetupError if it is still running."""
    path = state_path(name)
    try:
        state = NetState.from_json(path.read_text())
    except FileNotFoundError:
        return []
    except (ValueError, TypeError, OSError):
        log.warning("unreadable state file %s: removing it", path)
        path.unlink(missing_ok=True)
        return []
    if _pid_alive(state.pid):
        raise SetupError(f"vstack is already running with device {name!r} (pid {state.pid}); "
                         "stop it or choose another [vnic] name")
    removed = teardown(state)
    path.unlink(missing_ok=True)
    if removed:
        log.warning("removed what a previous vstack (pid %d) left: %s", state.pid,
                    ", ".join(removed))
    return removed


class Vnic:
    """The configured TUN device and the routing around it. ``Vnic.setup(cfg)`` builds it
    all or raises SetupError with nothing left; ``close()`` removes it all."""

    def __init__(self, cfg: VnicConfig, tun: Tun, state: NetState) -> None:
        self.cfg = cfg
        self.tun = tun
        self.state = state
        self.addr4 = str(ipaddress.ip_interface(cfg.address4).ip) if cfg.address4 else None
        self.addr6 = str(ipaddress.ip_interface(cfg.address6).ip) if cfg.address6 else None
        self._closed = False

    @property
    def name(self) -> str:
        return self.cfg.name

    @classmethod
    def setup(cls, cfg: VnicConfig, nat: NatMap | None = None) -> Vnic:
        if os.geteuid() != 0:
            raise SetupError("vstack must run as root (TUN device, routes, nftables)")
        try:
            from pyroute2 import IPRoute
        except ImportError:  # pragma: no cover
            raise SetupError("pyroute2 is not installed") from None
        recover(cfg.name)
        with IPRoute() as ipr:
            if ipr.link_lookup(ifname=cfg.name):
                raise SetupError(f"device name {cfg.name!r} is taken: "
                                 "choose another [vnic] name")
        fams = []
        if cfg.address4:
            fams.append(4)
        if cfg.address6:
            fams.append(6)
        state = NetState(cfg.name, os.getpid(), netns_id(), cfg.table, cfg.fwmark,
                         cfg.rule_priority, nft_table_name(cfg.name), fams)
        try:
            RUN_DIR.mkdir(parents=True, exist_ok=True)
            state_path(cfg.name).write_text(state.to_json())
        except OSError as e:
            raise SetupError(f"cannot write the state file in {RUN_DIR}: {e.strerror}") from None
        try:
            tun = open_tun(cfg.name, vnet_hdr=cfg.offload, multi_queue=cfg.queues > 1)
        except TunError as e:
            state_path(cfg.name).unlink(missing_ok=True)
            raise SetupError(str(e)) from None
        if cfg.offload:  # issue 6: refused offloads fall back (logged); 0 = none
            from vstack.vnic.offload import OffloadError, enable_offloads

            try:
                tun.offloads = enable_offloads(tun.fd)
            except OffloadError as e:
                tun.close()
                state_path(cfg.name).unlink(missing_ok=True)
                raise SetupError(f"{e} (set [vnic] offload = false)") from None
        self = cls(cfg, tun, state)
        try:
            self._configure(nat or {})
        except BaseException as e:
            self.close()
            if isinstance(e, SetupError):
                raise
            if isinstance(e, Exception):
                raise SetupError(f"configuring {cfg.name}: {e}") from e
            raise
        return self

    def _configure(self, nat: NatMap) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        cfg = self.cfg
        name = cfg.name
        _sysctl(f"net/ipv4/conf/{name}/rp_filter", "0")
        _sysctl(f"net/ipv4/conf/{name}/accept_local", "1")
        if self.addr6:
            _sysctl(f"net/ipv6/conf/{name}/disable_ipv6", "0")
            # no router solicitations / autoconf chatter from the TUN itself
            _sysctl(f"net/ipv6/conf/{name}/accept_ra", "0")
            _sysctl(f"net/ipv6/conf/{name}/router_solicitations", "0")
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=name)[0]
            # a deeper TUN queue absorbs the moments vstack is not scheduled; once it is
            # full, the app's socket buffer fills and the app blocks (backpressure) rather
            # than the TUN dropping
            ipr.link("set", index=idx, mtu=cfg.mtu, txqlen=TUN_TXQLEN, state="up")
            if cfg.address4:
                i4 = ipaddress.ip_interface(cfg.address4)
                ipr.addr("add", index=idx, address=str(i4.ip), prefixlen=i4.network.prefixlen)
            if cfg.address6:
                i6 = ipaddress.ip_interface(cfg.address6)
                try:
                    ipr.addr("add", index=idx, address=str(i6.ip),
                             prefixlen=i6.network.prefixlen, flags=IFA_F_NODAD)
                except NetlinkError as e:
                    raise SetupError(f"IPv6 address {cfg.address6} on {name}: {e} "
                                     "(is IPv6 disabled? set [vnic] address6 = \"\")") from None
            prefixes: list[str] = []
            for r in cfg.routes:
                if r == "all":
                    prefixes += ["0.0.0.0/0", "::/0"]
                else:
                    prefixes.append(str(ipaddress.ip_network(r, strict=False)))
            for p in dict.fromkeys(prefixes):
                net = ipaddress.ip_network(p)
                src = self.addr4 if net.version == 4 else self.addr6
                if src is None:
                    log.warning("route %s skipped: no IPv%d address on %s", p, net.version, name)
                    continue
                fam = socket.AF_INET if net.version == 4 else socket.AF_INET6
                try:
                    ipr.route("add", family=fam, dst=p, table=cfg.table, oif=idx, prefsrc=src)
                except NetlinkError as e:
                    raise SetupError(f"route {p} table {cfg.table} dev {name}: {e}") from None
            for fam, have in ((socket.AF_INET, self.addr4), (socket.AF_INET6, self.addr6)):
                if not have:
                    continue
                try:
                    ipr.rule("add", family=fam, priority=cfg.rule_priority, fwmark=cfg.fwmark,
                             table=MAIN_TABLE)
                    ipr.rule("add", family=fam, priority=cfg.rule_priority + 1, iifname="lo",
                             table=cfg.table)
                    ipr.rule("add", family=fam, priority=cfg.rule_priority + 1, iifname=name,
                             table=cfg.table)
                except NetlinkError as e:
                    if e.code == errno.EEXIST:
                        raise SetupError(f"policy rule at priority {cfg.rule_priority} exists: "
                                         "another vstack? choose another [vnic] "
                                         "rule_priority") from None
                    raise SetupError(f"policy rule: {e} (kernel without policy routing?)"
                                     ) from None
        _nft(nft_ruleset(self.state, name, self.addr4, self.addr6, nat))

    def update_nat(self, nat: NatMap) -> None:
        """Replace the raw stack's DNAT rules (configuration reload), atomically."""
        t = self.state.nft_table
        script = f"flush chain inet {t} nat_out\n" + "".join(
            f"add rule inet {t} nat_out {r}\n" for r in raw_nat_rules(self.cfg.fwmark, nat))
        _nft(script)

    def close(self) -> list[str]:
        """Remove the device, routes, rules and nft table; idempotent."""
        if self._closed:
            return []
        self._closed = True
        self.tun.close()
        removed = []
        try:
            removed = teardown(self.state)
        finally:
            state_path(self.cfg.name).unlink(missing_ok=True)
        return removed

    def describe(self) -> dict[str, Any]:
        return {"name": self.cfg.name, "address4": self.addr4, "address6": self.addr6,
                "table": self.cfg.table, "fwmark": self.cfg.fwmark,
                "nft_table": self.state.nft_table}

"""vstack's configuration: one TOML file, every key optional with a documented default.

An unknown section or key, or a value of the wrong type or range, raises ``ConfigError``
whose message names it (``section.key: message``). ``load(path)`` reads a file,
``parse(text)`` a string, ``from_dict(data)`` an already-parsed mapping; ``Config()`` is
the all-defaults configuration (what ``vstack demo`` starts from).

Example::

    [vnic]
    name = "vstk0"              # TUN device name (<= 15 characters)
    mtu = 1500
    address4 = "198.18.0.1/30"  # the TUN's IPv4 address ("" = none)
    address6 = "fd56:5354::1/64"
    routes = ["all"]            # prefixes routed into the TUN; "all" = 0.0.0.0/0 + ::/0
    fwmark = 0x5654             # SO_MARK of vstack's own sockets (they bypass the TUN)
    table = 22100               # routing table holding the routes via the TUN
    rule_priority = 100         # fwmark rule at this priority, table rules at +1
    offload = true              # IFF_VNET_HDR + TUNSETOFFLOAD (CSUM/TSO/USO, GRO back)
    queues = 0                  # TUN queues, one worker process each (0: one per core)

    [execution]
    default_stack = "udp"
    max_flows = 65536
    idle_timeout_s = 60.0
    metrics_interval_s = 1.0
    queue_max = 1024
    batch = 64                  # packets read from the TUN per wakeup
    nice = 0                    # daemon priority; e.g. -10 to run ahead of the apps

    [nat."10.201.1.2:9000"]     # virtual destination -> real target, per stack
    udp = "10.201.2.2:9000"
    dccp = "10.201.1.2:5001"

    [stacks.dccp]               # opaque per-stack options, handed to the stack
    service_code = 0x44434350
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad configuration: the message starts with ``section.key:``."""


@dataclass(slots=True)
class VnicConfig:
    name: str = "vstk0"
    mtu: int = 1500
    address4: str = "198.18.0.1/30"  # RFC 2544 benchmarking range: unlikely to clash
    address6: str = "fd56:5354::1/64"
    routes: list[str] = field(default_factory=lambda: ["all"])
    fwmark: int = 0x5654
    table: int = 22100
    rule_priority: int = 100
    # issue 6: virtio_net_hdr + TUN offloads (super-packets in, GSO super-packets back);
    # refused offloads fall back to fewer / none by themselves
    offload: bool = True
    # > 1: IFF_MULTI_QUEUE, one queue per worker process (vstack run --workers); 0: one per
    # core, resolved by ``vstack run`` (anything else treats 0 as 1)
    queues: int = 0


@dataclass(slots=True)
class ExecutionConfig:
    default_stack: str = "udp"
    max_flows: int = 65536
    idle_timeout_s: float = 60.0
    metrics_interval_s: float = 1.0
    queue_max: int = 1024
    batch: int = 64
    nice: int = 0  # scheduling priority of the daemon (-20..19); < 0: ahead of the apps


@dataclass(slots=True)
class DecisionConfig:
    rules: str = ""  # path of a .rules file; "" = the static selector
    exploration: float = 0.0
    backend: str = "durable"


@dataclass(slots=True)
class ManagementConfig:
    listen: str = ""  # "host:port" of the management channel; "" = off
    key: str = ""
    max_skew_s: float = 30.0


@dataclass(slots=True)
class ControlConfig:
    socket: str = "/run/vstack/control.sock"


@dataclass(slots=True)
class LogConfig:
    db: str = ""  # SQLAlchemy URL or a file path; "" = no decision log
    record: str = ""


@dataclass(slots=True)
class MonitorConfig:
    interfaces: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Target:
    address: str
    port: int | None  # None: keep the flow's destination port

    def __str__(self) -> str:
        a = f"[{self.address}]" if ":" in self.address else self.address
        return a if self.port is None else f"{a}:{self.port}"


@dataclass(slots=True)
class Config:
    vnic: VnicConfig = field(default_factory=VnicConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    # virtual destination "addr:port" (or "addr") -> stack name -> real target
    nat: dict[str, dict[str, Target]] = field(default_factory=dict)
    stacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    management: ManagementConfig = field(default_factory=ManagementConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    log: LogConfig = field(default_factory=LogConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


_SECTIONS: dict[str, type] = {
    "vnic": VnicConfig,
    "execution": ExecutionConfig,
    "decision": DecisionConfig,
    "management": ManagementConfig,
    "control": ControlConfig,
    "log": LogConfig,
    "monitor": MonitorConfig,
}


def parse_endpoint(text: str, where: str, *, port_required: bool = False) -> Target:
    """``"10.0.0.1:9000"``, ``"[fd00::1]:9000"``, ``"10.0.0.1"`` or ``"fd00::1"``."""
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected \"address:port\", got {text!r}")
    s = text.strip()
    addr: str
    port: int | None = None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ConfigError(f"{where}: unbalanced '[' in {text!r}")
        addr, rest = s[1:end], s[end + 1:]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ConfigError(f"{where}: bad port in {text!r}")
            port = int(rest[1:])
    elif s.count(":") == 1:
        addr, p = s.split(":")
        if not p.isdigit():
            raise ConfigError(f"{where}: bad port in {text!r}")
        port = int(p)
    else:
        addr = s
    try:
        addr = str(ipaddress.ip_address(addr))
    except ValueError:
        raise ConfigError(f"{where}: not an IP address: {addr!r}") from None
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"{where}: port out of range: {port}")
    if port_required and port is None:
        raise ConfigError(f"{where}: a port is required in {text!r}")
    return Target(addr, port)


def _check_type(where: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return list(value)
    raise ConfigError(f"{where}: unsupported value {value!r}")  # pragma: no cover


def _section(name: str, cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a table, got {data!r}")
    obj = cls()
    known = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(sorted(known))})")
        setattr(obj, key, _check_type(f"{name}.{key}", value, getattr(obj, key)))
    return obj


def _validate(cfg: Config) -> None:
    v = cfg.vnic
    if not v.name or len(v.name) > 15 or "/" in v.name or " " in v.name:
        raise ConfigError(f"vnic.name: must be 1-15 characters without '/' or space: {v.name!r}")
    if not 576 <= v.mtu <= 65535:
        raise ConfigError(f"vnic.mtu: must be 576..65535, got {v.mtu}")
    for key, fam in (("address4", 4), ("address6", 6)):
        text = getattr(v, key)
        if text:
            try:
                iface = ipaddress.ip_interface(text)
            except ValueError:
                raise ConfigError(f"vnic.{key}: not an address/prefix: {text!r}") from None
            if iface.version != fam:
                raise ConfigError(f"vnic.{key}: not an IPv{fam} address: {text!r}")
    if not v.address4 and not v.address6:
        raise ConfigError("vnic.address4: at least one of address4 / address6 is required")
    for r in v.routes:
        if r == "all":
            continue
        try:
            ipaddress.ip_network(r, strict=False)
        except ValueError:
            raise ConfigError(f"vnic.routes: not a prefix or \"all\": {r!r}") from None
    if not 0 < v.fwmark < 2**32:
        raise ConfigError(f"vnic.fwmark: must be 1..2^32-1, got {v.fwmark}")
    if not 1 <= v.table < 2**31 or v.table in (253, 254, 255):
        raise ConfigError(f"vnic.table: must be 1..2^31-1, not 253-255, got {v.table}")
    if not 0 <= v.queues <= 256:
        raise ConfigError(f"vnic.queues: must be 0..256 (0: one per core), got {v.queues}")
    if not 1 <= v.rule_priority < 32765:
        raise ConfigError(f"vnic.rule_priority: must be 1..32764, got {v.rule_priority}")
    e = cfg.execution
    if not e.default_stack:
        raise ConfigError("execution.default_stack: must not be empty")
    for key in ("max_flows", "queue_max", "batch"):
        if getattr(e, key) < 1:
            raise ConfigError(f"execution.{key}: must be >= 1, got {getattr(e, key)}")
    if not -20 <= e.nice <= 19:
        raise ConfigError(f"execution.nice: must be -20..19, got {e.nice}")
    for key in ("idle_timeout_s", "metrics_interval_s"):
        if getattr(e, key) <= 0:
            raise ConfigError(f"execution.{key}: must be > 0, got {getattr(e, key)}")
    if not 0.0 <= cfg.decision.exploration <= 1.0:
        raise ConfigError(f"decision.exploration: must be 0..1, got {cfg.decision.exploration}")
    if cfg.management.max_skew_s <= 0:
        raise ConfigError(f"management.max_skew_s: must be > 0, got {cfg.management.max_skew_s}")


def from_dict(data: Mapping[str, Any]) -> Config:
    cfg = Config()
    for name, value in data.items():
        if name in _SECTIONS:
            setattr(cfg, name, _section(name, _SECTIONS[name], value))
        elif name == "nat":
            if not isinstance(value, dict):
                raise ConfigError(f"nat: expected a table, got {value!r}")
            for vdst, per_stack in value.items():
                where = f"nat.{vdst!r}" if "." in vdst else f"nat.{vdst}"
                v = parse_endpoint(vdst, where)
                if not isinstance(per_stack, dict):
                    raise ConfigError(f"{where}: expected a table of stack = \"target\"")
                m: dict[str, Target] = {}
                for stack, tgt in per_stack.items():
                    t = parse_endpoint(tgt, f"{where}.{stack}")
                    if (":" in t.address) != (":" in v.address):
                        raise ConfigError(f"{where}.{stack}: target family differs from {vdst!r}")
                    m[stack] = t
                cfg.nat[str(v)] = m
        elif name == "stacks":
            if not isinstance(value, dict):
                raise ConfigError(f"stacks: expected a table, got {value!r}")
            for stack, opts in value.items():
                if not isinstance(opts, dict):
                    raise ConfigError(f"stacks.{stack}: expected a table, got {opts!r}")
                cfg.stacks[stack] = dict(opts)
        else:
            known = ", ".join(sorted([*_SECTIONS, "nat", "stacks"]))
            raise ConfigError(f"{name}: unknown section (known: {known})")
    _validate(cfg)
    return cfg


def parse(text: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: not valid TOML: {e}") from None
    return from_dict(data)


def load(path: str | Path) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    return parse(text)

"""Configuration: defaults, a full file, and errors that name the bad key."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vstack.config import Config, ConfigError, Target, load, parse, parse_endpoint

FULL = """
[vnic]
name = "vs1"
mtu = 1400
address4 = "10.9.0.1/24"
address6 = ""
routes = ["10.201.0.0/16", "all"]
fwmark = 0x1234
table = 300
rule_priority = 200

[execution]
default_stack = "raw"
max_flows = 10
idle_timeout_s = 5
metrics_interval_s = 0.5
queue_max = 8
batch = 16
nice = -10

[nat."10.201.1.2:9000"]
udp = "10.201.2.2:9000"
dccp = "10.201.1.2:5001"

[nat."[fd01::2]:9000"]
udp = "[fd02::2]:9001"

[nat."10.201.3.3"]
udp = "10.201.4.4"

[stacks.dccp]
service_code = 0x44434350
transport = "udp"

[decision]
rules = "rules/paper.rules"
exploration = 0.1

[management]
listen = "0.0.0.0:7000"
key = "k"
max_skew_s = 10

[control]
socket = "/tmp/x.sock"

[log]
db = "sqlite:///x.db"

[monitor]
interfaces = ["eth0"]
"""


def test_defaults_are_valid() -> None:
    c = parse("")
    assert c == Config()
    assert c.vnic.name == "vstk0" and c.vnic.fwmark == 0x5654 and c.vnic.table == 22100
    assert c.vnic.routes == ["all"]
    assert c.execution.default_stack == "udp"
    assert c.nat == {}


def test_full_file(tmp_path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(FULL)
    c = load(p)
    assert c.vnic.name == "vs1" and c.vnic.mtu == 1400 and c.vnic.address6 == ""
    assert c.vnic.fwmark == 0x1234
    assert c.execution.idle_timeout_s == 5.0 and isinstance(c.execution.idle_timeout_s, float)
    assert c.execution.nice == -10
    assert c.nat["10.201.1.2:9000"] == {"udp": Target("10.201.2.2", 9000),
                                        "dccp": Target("10.201.1.2", 5001)}
    assert c.nat["[fd01::2]:9000"]["udp"] == Target("fd02::2", 9001)
    assert c.nat["10.201.3.3"]["udp"] == Target("10.201.4.4", None)
    assert c.stacks["dccp"]["service_code"] == 0x44434350
    assert c.decision.exploration == 0.1
    assert c.monitor.interfaces == ["eth0"]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[vnic]\nnmae = 1", "vnic.nmae: unknown key"),
        ("[vnc]\nname = 'x'", "vnc: unknown section"),
        ("[vnic]\nmtu = 'big'", "vnic.mtu: expected an integer"),
        ("[vnic]\nmtu = 10", "vnic.mtu: must be"),
        ("[vnic]\nname = 'a-very-long-device-name'", "vnic.name:"),
        ("[vnic]\naddress4 = '10.0.0.300/24'", "vnic.address4:"),
        ("[vnic]\naddress4 = 'fd00::1/64'", "vnic.address4: not an IPv4"),
        ("[vnic]\naddress4 = ''\naddress6 = ''", "vnic.address4: at least one"),
        ("[vnic]\nroutes = ['everything']", "vnic.routes:"),
        ("[vnic]\nroutes = 'all'", "vnic.routes: expected a list"),
        ("[vnic]\ntable = 254", "vnic.table:"),
        ("[execution]\nmax_flows = 0", "execution.max_flows:"),
        ("[execution]\nidle_timeout_s = true", "execution.idle_timeout_s: expected a number"),
        ("[execution]\nmetrics_interval_s = -1", "execution.metrics_interval_s:"),
        ("[execution]\nnice = -30", "execution.nice: must be -20..19"),
        ("[nat.'10.0.0.1:9000']\nudp = 'nowhere:1'", "nat.'10.0.0.1:9000'.udp: not an IP"),
        ("[nat.'10.0.0.1:9000']\nudp = '10.0.0.2:99999'", "nat.'10.0.0.1:9000'.udp: port out"),
        ("[nat.'10.0.0.1:9000']\nudp = '[fd00::1]:9'", "target family differs"),
        ("[nat.'x:1']\nudp = '10.0.0.2:1'", "not an IP address"),
        ("[decision]\nexploration = 2.0", "decision.exploration:"),
        ("vnic = 3", "vnic: expected a table"),
        ("[vnic\n", "config: not valid TOML"),
    ],
)
def test_errors_name_the_key(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse(text)
    assert where in str(ei.value)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "nope.toml")


@settings(max_examples=100)
@given(st.ip_addresses(), st.one_of(st.none(), st.integers(1, 65535)))
def test_endpoint_round_trip(addr, port) -> None:
    t = Target(str(addr), port)
    assert parse_endpoint(str(t), "x") == t


@settings(max_examples=100)
@given(st.text(max_size=30))
def test_endpoint_garbage_is_config_error(text: str) -> None:
    try:
        parse_endpoint(text, "x")
    except ConfigError as e:
        assert str(e).startswith("x:")


class _Reloads:
    """Records what ``reload_config`` applies (the datapath and the rule driver)."""

    def __init__(self) -> None:
        self.configs: list[Config] = []
        self.driver_reloads = 0

    def reload(self, config: Config | None = None) -> None:
        if config is None:
            self.driver_reloads += 1
        else:
            self.configs.append(config)


def test_reload_config_applies_the_file_and_keeps_the_queue_count(tmp_path,
                                                                   caplog) -> None:
    from vstack.cli.daemon import reload_config

    path = tmp_path / "v.toml"
    path.write_text('[execution]\ndefault_stack = "raw"\n')
    running = Config()
    running.vnic.queues = 4  # from --workers, not in the file
    dp, driver = _Reloads(), _Reloads()
    new = reload_config(path, running, dp, driver)
    assert new is not None and dp.configs == [new] and driver.driver_reloads == 1
    assert new.execution.default_stack == "raw" and new.vnic.queues == 4
    # a file that does not load changes nothing and says why
    path.write_text('[execution]\ndefault_stack = "nosuch"\n')
    assert reload_config(path, running, dp, None) is None
    assert dp.configs == [new] and "not reloaded" in caplog.text

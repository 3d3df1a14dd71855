"""The DCCP codec against real captures: every packet in ../shared/testdata/dccp/*.pcap is
decoded and compared with the tcpdump -vv text beside it (fields, options, checksum verdict).

The text is parsed, not hand-copied; a few explicit asserts follow at the end.
libpcap cuts every record to the file's snaplen (the oobr capture says 70 while some of its
records are longer), so the packets are cut the same way here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import dpkt
import pytest

from vstack.dccp.checksum import check, compute_checksum
from vstack.dccp.options import (
    AckVector,
    CcidOption,
    ChangeL,
    ConfirmR,
    DataChecksum,
    DataDropped,
    ElapsedTime,
    Feature,
    FeatureOption,
    InitCookie,
    Mandatory,
    NdpCount,
    Option,
    Padding,
    SlowReceiver,
    Timestamp,
    TimestampEcho,
    UnknownOption,
    strip_padding,
)
from vstack.dccp.packet import (
    DccpChecksumError,
    DccpPacket,
    DccpParseError,
    PacketType,
    ResetCode,
    decode,
    encode,
)

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared/testdata/dccp"
PCAPS = sorted(DATA_DIR.glob("*.pcap")) if DATA_DIR.is_dir() else []

pytestmark = pytest.mark.skipif(not PCAPS, reason=f"no DCCP captures in {DATA_DIR}")

# tcpdump's names (print-dccp.c).
TYPE_NAMES = {
    "Request": PacketType.REQUEST,
    "Response": PacketType.RESPONSE,
    "Data": PacketType.DATA,
    "Ack": PacketType.ACK,
    "DataAck": PacketType.DATAACK,
    "CloseReq": PacketType.CLOSEREQ,
    "Close": PacketType.CLOSE,
    "Reset": PacketType.RESET,
    "Sync": PacketType.SYNC,
    "SyncAck": PacketType.SYNCACK,
}
RESET_NAMES = {c.name.lower(): c for c in ResetCode}
FEATURE_NAMES = {
    1: "ccid",
    2: "allow_short_seqno",
    3: "sequence_window",
    4: "ecn_incapable",
    5: "ack_ratio",
    6: "send_ack_vector",
    7: "send_ndp_count",
    8: "minimum checksum coverage",
    9: "check data checksum",
}


def tcpdump_option(opt: Option) -> str:
    """How tcpdump -vv prints one option."""
    if isinstance(opt, Padding):
        return "nop"
    if isinstance(opt, Mandatory):
        return "mandatory"
    if isinstance(opt, SlowReceiver):
        return "slowreceiver"
    if isinstance(opt, FeatureOption):
        name = FEATURE_NAMES.get(opt.feature, f"feature {opt.feature}")
        return " ".join([opt.NAME, name, *(str(b) for b in opt.value_bytes())])
    if isinstance(opt, AckVector):
        return f"ack_vector{opt.nonce} 0x{opt.cells.hex()}"
    if isinstance(opt, ElapsedTime):
        return f"elapsed_time {opt.value}"
    if isinstance(opt, NdpCount):
        return f"ndp_count {opt.count}"
    if isinstance(opt, Timestamp):
        return f"timestamp {opt.value}"
    if isinstance(opt, TimestampEcho):
        extra = "" if opt.elapsed is None else f" (elapsed time {opt.elapsed})"
        return f"timestamp_echo {opt.echo}{extra}"
    if isinstance(opt, InitCookie):
        return f"initcookie 0x{opt.data.hex()}"
    if isinstance(opt, DataDropped):
        return f"data_dropped 0x{opt.data.hex()}"
    if isinstance(opt, DataChecksum):
        return f"data_checksum 0x{opt.crc:08x}"
    if isinstance(opt, CcidOption | UnknownOption):
        return f"option {opt.type}"
    raise AssertionError(opt)


@dataclass
class Expected:
    """One tcpdump -vv record."""

    number: int
    is_dccp: bool
    sport: int = 0
    dport: int = 0
    ccval: int = 0
    cscov: int = 0
    cksum: int | None = None  # as printed; None: tcpdump gave no verdict
    correct: bool | None = None
    should_be: int | None = None
    type: PacketType | None = None
    service: int | None = None
    reset_code: int | None = None
    ack: int | None = None
    seq: int = 0
    options: list[str] | None = None  # the complete options tcpdump printed
    truncated: bool = False  # "[|dccp]": the capture ends inside the header/options
    invalid: str | None = None  # the option tcpdump called invalid


RECORD_START = re.compile(r"^\s*(\d+)\s+\d{4}-\d\d-\d\d \S+ ", re.M)
DCCP_RE = re.compile(
    r"\.(?P<sport>\d+) > \S+\.(?P<dport>\d+): DCCP \(CCVal (?P<ccval>\d+), CsCov (?P<cscov>\d+)"
    r"(?:, cksum 0x(?P<cksum>[0-9a-f]{4})"
    r" \((?:(?P<ok>correct)|incorrect -> 0x(?P<sb>[0-9a-f]{4}))\))?"
    r"\) DCCP-(?P<type>\w+)"
    r"(?: \(service=(?P<service>\d+)\))?"
    r"(?: \(code=(?P<code>\w+)\))?"
    r"(?: \(ack=(?P<ack>\d+)\))?"
    r" seq (?P<seq>\d+)"
    r"(?: <(?P<opts>.*))?$"
)


def parse_tcpdump(text: str) -> list[Expected]:
    starts = list(RECORD_START.finditer(text))
    out = []
    for i, m in enumerate(starts):
        body = text[m.start() : starts[i + 1].start() if i + 1 < len(starts) else len(text)]
        body = " ".join(line.strip() for line in body.splitlines())
        d = DCCP_RE.search(body)
        if d is None:
            out.append(Expected(int(m.group(1)), is_dccp=False))
            continue
        e = Expected(
            number=int(m.group(1)),
            is_dccp=True,
            sport=int(d["sport"]),
            dport=int(d["dport"]),
            ccval=int(d["ccval"]),
            cscov=int(d["cscov"]),
            cksum=int(d["cksum"], 16) if d["cksum"] else None,
            correct=(d["ok"] is not None) if d["cksum"] else None,
            should_be=int(d["sb"], 16) if d["sb"] else None,
            type=TYPE_NAMES[d["type"]],
            service=int(d["service"]) if d["service"] else None,
            reset_code=RESET_NAMES[d["code"]] if d["code"] else None,
            ack=int(d["ack"]) if d["ack"] else None,
            seq=int(d["seq"]),
        )
        opts = d["opts"]
        if opts is not None:
            items = [s.strip() for s in opts.rstrip().removesuffix(">").split(", ")]
            if items and items[-1].endswith("[|dccp]"):
                e.truncated = True
                items.pop()
            elif items and items[-1].endswith("(invalid)"):
                e.invalid = items.pop().split()[0]
            e.options = items
        out.append(e)
    return out


@dataclass
class Captured:
    number: int
    dccp: bytes | None  # the DCCP bytes as captured; None: not IP/DCCP
    wire_len: int = 0
    src: bytes = b""
    dst: bytes = b""


def read_pcap(path: Path) -> list[Captured]:
    out = []
    with path.open("rb") as f:
        reader = dpkt.pcap.Reader(f)
        snaplen = reader.snaplen
        for i, (_ts, frame) in enumerate(reader, start=1):
            buf = frame[:snaplen]
            eth = dpkt.ethernet.Ethernet(buf)
            ip = eth.data
            if isinstance(ip, dpkt.ip.IP) and ip.p == 33:
                off = 14 + ip.hl * 4
                out.append(Captured(i, buf[off:], ip.len - ip.hl * 4, ip.src, ip.dst))
            elif isinstance(ip, dpkt.ip6.IP6) and ip.nxt == 33:
                out.append(Captured(i, buf[14 + 40 :], ip.plen, ip.src, ip.dst))
            else:
                out.append(Captured(i, None))
    return out


def cases() -> list[tuple[str, Captured, Expected]]:
    result = []
    for pcap in PCAPS:
        txt = pcap.with_name(pcap.stem + ".tcpdump-vv.txt")
        expected = parse_tcpdump(txt.read_text())
        captured = read_pcap(pcap)
        assert [e.number for e in expected] == [c.number for c in captured], pcap.name
        result += [(pcap.stem, c, e) for c, e in zip(captured, expected, strict=True)]
    return result


CASES = cases() if PCAPS else []


def test_every_capture_has_its_text_and_packets() -> None:
    assert len(PCAPS) >= 4
    assert sum(1 for _, _, e in CASES if e.is_dccp) >= 35


@pytest.mark.parametrize(
    ("name", "cap", "exp"), CASES, ids=[f"{n}#{c.number}" for n, c, _ in CASES]
)
def test_capture_packet_matches_tcpdump(name: str, cap: Captured, exp: Expected) -> None:
    assert (cap.dccp is not None) == exp.is_dccp
    if cap.dccp is None:
        return
    raw = cap.dccp
    whole = len(raw) == cap.wire_len

    # The checksum verdict: tcpdump gives one exactly when the whole packet was captured.
    assert (exp.cksum is not None) == whole
    if whole:
        assert exp.cksum == (raw[6] << 8) | raw[7]
        assert check(raw, cap.src, cap.dst) is exp.correct
        computed = compute_checksum(raw, cap.src, cap.dst)
        assert computed == (exp.cksum if exp.correct else exp.should_be)
        if exp.correct is False:
            with pytest.raises(DccpChecksumError) as ei:
                decode(raw, cap.src, cap.dst, strict=False)
            assert ei.value.expected == exp.should_be

    kw: dict[str, object] = {"verify": False, "strict": False, "wire_len": cap.wire_len}
    if exp.truncated or exp.invalid:
        with pytest.raises(DccpParseError) as pe:
            decode(raw, **kw)  # type: ignore[arg-type]
        if exp.invalid:
            assert exp.invalid in pe.value.reason
        return

    pkt = decode(raw, **kw)  # type: ignore[arg-type]
    assert pkt.type == exp.type
    assert (pkt.sport, pkt.dport) == (exp.sport, exp.dport)
    assert (pkt.seq, pkt.ack) == (exp.seq, exp.ack)
    assert (pkt.ccval, pkt.cscov) == (exp.ccval, exp.cscov)
    assert pkt.service_code == exp.service
    assert pkt.reset_code == exp.reset_code
    assert [tcpdump_option(o) for o in pkt.options] == (exp.options or [])

    if whole and exp.correct and pkt.x:
        # Re-encoding what we decoded gives the captured bytes back, checksum included.
        assert encode(pkt, cap.src, cap.dst) == raw
        assert decode(raw, cap.src, cap.dst) == pkt


# --- a few explicit, hand-written expectations ------------------------------------------------


def _get(name: str, number: int) -> Captured:
    for n, c, _ in CASES:
        if n == name and c.number == number:
            return c
    raise KeyError((name, number))


def test_partial_coverage_dataack_v4() -> None:
    c = _get("dccp_partial_csum_v4_simple", 4)
    assert c.dccp is not None
    pkt = decode(c.dccp, "139.133.209.176", "139.133.209.65")
    assert pkt.type is PacketType.DATAACK
    assert (pkt.sport, pkt.dport, pkt.cscov) == (52667, 5001, 1)
    assert pkt.seq == 33164071490 and pkt.ack == 1925546833
    assert pkt.payload == b"hello world\n"
    assert strip_padding(pkt.options) == (AckVector(0, b"\x00"), ElapsedTime(70), NdpCount(1))
    # CsCov 1 covers only the header: the payload can change, the checksum still holds.
    assert check(c.dccp[:-12] + b"HELLO WORLD!", "139.133.209.176", "139.133.209.65")


def test_response_feature_options() -> None:
    c = _get("dccp_partial_csum_v4_longer", 2)
    assert c.dccp is not None
    pkt = decode(c.dccp, c.src, c.dst)
    assert pkt.type is PacketType.RESPONSE and pkt.service_code == 0
    opts = strip_padding(pkt.options)
    assert opts[0] == ChangeL(Feature.ACK_RATIO, (2,), width=1)
    assert opts[1] == ConfirmR(Feature.CCID, (2, 2))
    confirm, ack_ratio = opts[1], opts[3]
    assert isinstance(confirm, ConfirmR) and isinstance(ack_ratio, ConfirmR)
    assert confirm.value == 2 and confirm.preferences == (2,)
    assert ack_ratio.value == 2 and ack_ratio.is_nn and ack_ratio.width == 1


def test_reset_v6() -> None:
    c = _get("dccp_partial_csum_v6_simple", 7)
    assert c.dccp is not None
    pkt = decode(c.dccp, "3ffe::2", "3ffe::1")
    assert pkt.type is PacketType.RESET and pkt.reset_code == ResetCode.CLOSED
    assert pkt.reset_data == b"\x00\x00\x00"
    assert pkt.seq == 1385331170 and pkt.ack == 1337846932
    with pytest.raises(DccpChecksumError):  # another address: wrong pseudo-header
        decode(c.dccp, "3ffe::2", "3ffe::3")
    with pytest.raises(DccpChecksumError):  # same address bytes as IPv4-mapped: wrong family
        decode(c.dccp, "::ffff:139.133.209.65", "3ffe::1")


def test_oobr_fuzzed_packets() -> None:
    # 1: a Request with X=0 (and a bad checksum): RFC 4340 §5.1 says ignore it.
    c1 = _get("dccp_options-oobr", 1)
    assert c1.dccp is not None
    assert compute_checksum(c1.dccp, c1.src, c1.dst) == 0x8BF3
    with pytest.raises(DccpParseError, match="X=0"):
        decode(c1.dccp, verify=False)
    lenient: DccpPacket = decode(c1.dccp, verify=False, strict=False)
    assert (lenient.seq, lenient.service_code, lenient.x) == (8, 4105078398, False)
    # 3: a Timestamp Echo of length 4.
    c3 = _get("dccp_options-oobr", 3)
    assert c3.dccp is not None
    assert not check(c3.dccp, c3.src, c3.dst)
    with pytest.raises(DccpParseError, match="timestamp_echo"):
        decode(c3.dccp, verify=False)

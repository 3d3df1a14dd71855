"""DCCP options (RFC 4340 §5.8), typed, sans-IO.

Every option is a frozen, slotted dataclass. ``decode_options`` turns the options area of a
packet into a tuple of them (Padding kept, so that decode -> encode gives the same bytes);
``encode_options`` does the reverse and pads with Padding to a 4-byte multiple (§5.8: the
options area is a multiple of 32 bits).

Single-byte options are 0-31 (§5.8); 32-255 carry a length byte that counts the type and
length bytes. Options 128-255 are CCID-specific (§10.3) and kept as ``CcidOption``; unknown
options as ``UnknownOption`` (a receiver ignores them, §5.8, unless Mandatory precedes them,
which is the connection's business, not the codec's).

Feature options (§6): Change L/R carry a feature number and a preference list; Confirm L/R
carry the feature number, the chosen value, then the preference list. Server-priority (SP)
feature values are one byte each. Non-negotiable (NN) features (Sequence Window, Ack Ratio)
carry one big-endian integer; its width on the wire is kept in ``width`` (RFC width by
default: Sequence Window 6 bytes, Ack Ratio 2; Linux 2.6.18 sent Ack Ratio in 1 byte).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from vstack.dccp.packet import DccpPacket

__all__ = [
    "NN_FEATURE_WIDTH",
    "AckVector",
    "CcidOption",
    "ChangeL",
    "ChangeR",
    "ConfirmL",
    "ConfirmR",
    "DataChecksum",
    "DataDropped",
    "DccpOptionError",
    "DccpParseError",
    "ElapsedTime",
    "Feature",
    "FeatureOption",
    "InitCookie",
    "Mandatory",
    "NdpCount",
    "Option",
    "OptionType",
    "Padding",
    "SlowReceiver",
    "Timestamp",
    "TimestampEcho",
    "UnknownOption",
    "crc32c",
    "decode_options",
    "encode_options",
    "is_nn_feature",
    "strip_padding",
]


class DccpParseError(ValueError):
    """A malformed DCCP packet or option from the wire (a *remote* error): count and drop.

    ``reason`` says what was wrong. Defined here (the lowest codec module) and re-exported
    by ``vstack.dccp.packet``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DccpOptionError(DccpParseError):
    """An option with an invalid length or value (RFC 4340 §5.8; Linux answers Reset 5).

    ``option_type`` and ``option_data`` (what there was of it) give the Reset's Data 1-3
    (§5.6, Option Error): ``reset_data``. ``packet``: set by ``packet.decode`` to the packet
    decoded *without* its options, so that the connection can check its sequence number
    before answering with a Reset.
    """

    def __init__(self, reason: str, option_type: int, option_data: bytes) -> None:
        super().__init__(reason)
        self.option_type = option_type
        self.option_data = bytes(option_data)
        self.packet: DccpPacket | None = None

    @property
    def reset_data(self) -> bytes:
        """Data 1-3 of a Reset with code Option Error (5): type, first two data bytes."""
        return bytes((self.option_type,)) + (self.option_data[:2] + b"\x00\x00")[:2]


class OptionType(IntEnum):
    """Option types (RFC 4340 §5.8, table 3)."""

    PADDING = 0
    MANDATORY = 1
    SLOW_RECEIVER = 2
    CHANGE_L = 32
    CONFIRM_L = 33
    CHANGE_R = 34
    CONFIRM_R = 35
    INIT_COOKIE = 36
    NDP_COUNT = 37
    ACK_VECTOR0 = 38
    ACK_VECTOR1 = 39
    DATA_DROPPED = 40
    TIMESTAMP = 41
    TIMESTAMP_ECHO = 42
    ELAPSED_TIME = 43
    DATA_CHECKSUM = 44


class Feature(IntEnum):
    """Feature numbers (RFC 4340 §6, table 4)."""

    CCID = 1
    ALLOW_SHORT_SEQNOS = 2
    SEQUENCE_WINDOW = 3
    ECN_INCAPABLE = 4
    ACK_RATIO = 5
    SEND_ACK_VECTOR = 6
    SEND_NDP_COUNT = 7
    MIN_CHECKSUM_COVERAGE = 8
    CHECK_DATA_CHECKSUM = 9


# Non-negotiable features and their RFC value widths in bytes (§6 table 4; §7.5.2, §11.3).
NN_FEATURE_WIDTH: dict[int, int] = {Feature.SEQUENCE_WINDOW: 6, Feature.ACK_RATIO: 2}


def is_nn_feature(feature: int) -> bool:
    """True for the non-negotiable features (value is one multi-byte integer)."""
    return feature in NN_FEATURE_WIDTH


# --- single-byte options -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Padding:
    """Padding (type 0), one byte."""


@dataclass(frozen=True, slots=True)
class Mandatory:
    """Mandatory (type 1, §5.8.2): the following option must be understood."""


@dataclass(frozen=True, slots=True)
class SlowReceiver:
    """Slow Receiver (type 2, §11.6)."""


# --- feature negotiation (§6) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeatureOption:
    """Base of Change L/R and Confirm L/R (§6.1, §6.2).

    ``values``: for SP features, one int (0-255) per byte: Change's preference list, or
    Confirm's chosen value followed by the preference list. For NN features, a single int
    (empty for a Confirm that says "feature unknown", §6.6.7). ``width``: NN value width on
    the wire (None: the RFC width); ignored for SP features.
    """

    feature: int
    values: tuple[int, ...] = ()
    width: int | None = None

    TYPE: ClassVar[int] = -1
    NAME: ClassVar[str] = "?"

    def __post_init__(self) -> None:
        # Normalise so that a built option equals its decoded self: an NN value without an
        # explicit width takes the RFC width; SP features have no width.
        if is_nn_feature(self.feature):
            if self.width is None and self.values:
                object.__setattr__(self, "width", NN_FEATURE_WIDTH[self.feature])
        elif self.width is not None:
            object.__setattr__(self, "width", None)

    @property
    def is_nn(self) -> bool:
        return is_nn_feature(self.feature)

    @property
    def value(self) -> int | None:
        """The first value: the NN value, Change's first preference, Confirm's chosen value."""
        return self.values[0] if self.values else None

    @property
    def preferences(self) -> tuple[int, ...]:
        """Change: all values. Confirm: the preference list after the chosen value."""
        return self.values[1:] if self.TYPE in (33, 35) else self.values

    def value_bytes(self) -> bytes:
        """The bytes after the feature number."""
        if self.is_nn:
            if not self.values:
                return b""
            if len(self.values) != 1:
                raise ValueError(f"NN feature {self.feature} takes one value, got {self.values}")
            w = self.width if self.width is not None else NN_FEATURE_WIDTH[self.feature]
            if not 1 <= w <= 6:
                raise ValueError(f"NN value width must be 1-6 bytes, got {w}")
            return self.values[0].to_bytes(w, "big")
        return bytes(self.values)


@dataclass(frozen=True, slots=True)
class ChangeL(FeatureOption):
    TYPE: ClassVar[int] = 32
    NAME: ClassVar[str] = "change_l"


@dataclass(frozen=True, slots=True)
class ConfirmL(FeatureOption):
    TYPE: ClassVar[int] = 33
    NAME: ClassVar[str] = "confirm_l"


@dataclass(frozen=True, slots=True)
class ChangeR(FeatureOption):
    TYPE: ClassVar[int] = 34
    NAME: ClassVar[str] = "change_r"


@dataclass(frozen=True, slots=True)
class ConfirmR(FeatureOption):
    TYPE: ClassVar[int] = 35
    NAME: ClassVar[str] = "confirm_r"


_FEATURE_CLASSES: dict[int, type[ChangeL | ConfirmL | ChangeR | ConfirmR]] = {
    32: ChangeL,
    33: ConfirmL,
    34: ChangeR,
    35: ConfirmR,
}


# --- other options -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InitCookie:
    """Init Cookie (type 36, §8.1.4): opaque server state, up to 253 bytes."""

    data: bytes


@dataclass(frozen=True, slots=True)
class NdpCount:
    """NDP Count (type 37, §7.7): 1-6 byte count, encoded in the fewest bytes."""

    count: int


# Ack Vector cell states (RFC 4340 §11.4).
ACK_STATE_RECEIVED = 0
ACK_STATE_ECN_MARKED = 1
ACK_STATE_RESERVED = 2
ACK_STATE_NOT_RECEIVED = 3


@dataclass(frozen=True, slots=True)
class AckVector:
    """Ack Vector (types 38/39 for nonce 0/1, §11.4).

    ``cells``: one byte per run: state in the top 2 bits, run length in the low 6 bits
    (the run covers run_len + 1 packets). The first cell starts at the packet's
    Acknowledgement Number and runs towards older sequence numbers.
    """

    nonce: int
    cells: bytes

    def runs(self) -> list[tuple[int, int]]:
        """The cells as ``(state, run_len)`` pairs, run_len being the raw 6-bit field."""
        return [(c >> 6, c & 0x3F) for c in self.cells]

    @classmethod
    def from_runs(cls, runs: Iterable[tuple[int, int]], nonce: int = 0) -> AckVector:
        """Build from ``(state, run_len)`` pairs; run_len > 63 is split into several cells."""
        out = bytearray()
        for state, run_len in runs:
            if not 0 <= state <= 3 or run_len < 0:
                raise ValueError(f"bad ack vector run ({state}, {run_len})")
            n = run_len + 1  # packets in this run
            while n > 0:
                take = min(n, 64)
                out.append((state << 6) | (take - 1))
                n -= take
        return cls(nonce, bytes(out))

    def packets(self, ack_no: int, seq_bits: int = 48) -> Iterator[tuple[int, int]]:
        """``(seqno, state)`` for every packet the vector describes, newest first."""
        mask = (1 << seq_bits) - 1
        seq = ack_no
        for c in self.cells:
            state = c >> 6
            for _ in range((c & 0x3F) + 1):
                yield seq, state
                seq = (seq - 1) & mask


@dataclass(frozen=True, slots=True)
class DataDropped:
    """Data Dropped (type 40, §11.7): raw blocks, see ``blocks()``."""

    data: bytes

    def blocks(self) -> list[tuple[int | None, int]]:
        """``(drop_state, run_len)`` per block; drop_state None for a Normal Block."""
        out: list[tuple[int | None, int]] = []
        for b in self.data:
            if b & 0x80:
                out.append(((b >> 4) & 0x07, b & 0x0F))
            else:
                out.append((None, b & 0x7F))
        return out


@dataclass(frozen=True, slots=True)
class Timestamp:
    """Timestamp (type 41, §13.1): 32-bit value in units of 10 microseconds."""

    value: int


@dataclass(frozen=True, slots=True)
class TimestampEcho:
    """Timestamp Echo (type 42, §13.3): echoed timestamp, optional elapsed time.

    ``elapsed`` is encoded in 2 bytes when < 65536, else 4; None: absent (length 6).
    """

    echo: int
    elapsed: int | None = None


@dataclass(frozen=True, slots=True)
class ElapsedTime:
    """Elapsed Time (type 43, §13.2): 2 or 4 bytes (the fewest), units of 10 us."""

    value: int


@dataclass(frozen=True, slots=True)
class DataChecksum:
    """Data Checksum (type 44, §9.3): CRC-32c of the application data area."""

    crc: int


@dataclass(frozen=True, slots=True)
class CcidOption:
    """A CCID-specific option (types 128-255, §10.3), kept and passed on."""

    type: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class UnknownOption:
    """An option this codec does not know (3-31: single byte, data empty; 45-127)."""

    type: int
    data: bytes = b""


Option = (
    Padding
    | Mandatory
    | SlowReceiver
    | ChangeL
    | ConfirmL
    | ChangeR
    | ConfirmR
    | InitCookie
    | NdpCount
    | AckVector
    | DataDropped
    | Timestamp
    | TimestampEcho
    | ElapsedTime
    | DataChecksum
    | CcidOption
    | UnknownOption
)

_PADDING = Padding()
_MANDATORY = Mandatory()
_SLOW_RECEIVER = SlowReceiver()


def strip_padding(options: Iterable[Option]) -> tuple[Option, ...]:
    """The options without Padding."""
    return tuple(o for o in options if not isinstance(o, Padding))


# --- encoding ----------------------------------------------------------------------------


def _tlv(t: int, body: bytes) -> bytes:
    if len(body) > 253:
        raise ValueError(f"option {t} body of {len(body)} bytes exceeds 253")
    return bytes((t, len(body) + 2)) + body


def _minimal(value: int, widths: tuple[int, ...], what: str) -> bytes:
    if value < 0:
        raise ValueError(f"{what} must not be negative: {value}")
    for w in widths:
        if value < 1 << (8 * w):
            return value.to_bytes(w, "big")
    raise ValueError(f"{what} {value} does not fit in {widths[-1]} bytes")


def encode_option(opt: Option) -> bytes:
    """One option's bytes (no padding)."""
    if isinstance(opt, Padding):
        return b"\x00"
    if isinstance(opt, Mandatory):
        return b"\x01"
    if isinstance(opt, SlowReceiver):
        return b"\x02"
    if isinstance(opt, FeatureOption):
        return _tlv(opt.TYPE, bytes((opt.feature,)) + opt.value_bytes())
    if isinstance(opt, InitCookie):
        return _tlv(36, opt.data)
    if isinstance(opt, NdpCount):
        return _tlv(37, _minimal(opt.count, (1, 2, 3, 4, 5, 6), "NDP count"))
    if isinstance(opt, AckVector):
        if opt.nonce not in (0, 1):
            raise ValueError(f"ack vector nonce must be 0 or 1, got {opt.nonce}")
        return _tlv(38 + opt.nonce, opt.cells)
    if isinstance(opt, DataDropped):
        return _tlv(40, opt.data)
    if isinstance(opt, Timestamp):
        return _tlv(41, opt.value.to_bytes(4, "big"))
    if isinstance(opt, TimestampEcho):
        body = opt.echo.to_bytes(4, "big")
        if opt.elapsed is not None:
            body += _minimal(opt.elapsed, (2, 4), "elapsed time")
        return _tlv(42, body)
    if isinstance(opt, ElapsedTime):
        return _tlv(43, _minimal(opt.value, (2, 4), "elapsed time"))
    if isinstance(opt, DataChecksum):
        return _tlv(44, opt.crc.to_bytes(4, "big"))
    if isinstance(opt, CcidOption):
        if not 128 <= opt.type <= 255:
            raise ValueError(f"CCID-specific option type must be 128-255, got {opt.type}")
        return _tlv(opt.type, opt.data)
    if isinstance(opt, UnknownOption):
        if opt.type < 32:
            if opt.data:
                raise ValueError(f"single-byte option {opt.type} cannot carry data")
            return bytes((opt.type,))
        return _tlv(opt.type, opt.data)
    raise TypeError(f"not a DCCP option: {opt!r}")


def encode_options(options: Iterable[Option], *, pad: bool = True) -> bytes:
    """Encode options; with ``pad``, append Padding to a multiple of 4 bytes (§5.8)."""
    out = b"".join([encode_option(o) for o in options])
    if pad and len(out) & 3:
        out += b"\x00" * (4 - (len(out) & 3))
    return out


# --- decoding ----------------------------------------------------------------------------

_NAMES = {t.value: t.name.lower() for t in OptionType}


def _name(t: int) -> str:
    return _NAMES.get(t, f"option {t}")


def decode_option_body(t: int, body: bytes) -> Option:
    """One option from its type and the bytes after its length byte.

    Raises DccpParseError for a length the RFC does not allow (what tcpdump calls invalid).
    """
    n = len(body)
    if 32 <= t <= 35:
        if n < 1:
            raise DccpOptionError(f"{_name(t)}: no feature number", t, body)
        feature, rest = body[0], body[1:]
        if is_nn_feature(feature):
            if len(rest) > 6:
                raise DccpOptionError(
                    f"{_name(t)}: NN value of {len(rest)} bytes exceeds 6", t, body
                )
            values: tuple[int, ...] = (int.from_bytes(rest, "big"),) if rest else ()
            return _FEATURE_CLASSES[t](feature, values, len(rest) if rest else None)
        return _FEATURE_CLASSES[t](feature, tuple(rest))
    if t == 36:
        return InitCookie(body)
    if t == 37:
        if not 1 <= n <= 6:
            raise DccpOptionError(f"ndp_count: length {n + 2} not 3-8", t, body)
        return NdpCount(int.from_bytes(body, "big"))
    if t in (38, 39):
        return AckVector(t - 38, body)
    if t == 40:
        return DataDropped(body)
    if t == 41:
        if n != 4:
            raise DccpOptionError(f"timestamp: length {n + 2} not 6", t, body)
        return Timestamp(int.from_bytes(body, "big"))
    if t == 42:
        if n not in (4, 6, 8):
            raise DccpOptionError(f"timestamp_echo: length {n + 2} not 6, 8 or 10", t, body)
        return TimestampEcho(
            int.from_bytes(body[:4], "big"), int.from_bytes(body[4:], "big") if n > 4 else None
        )
    if t == 43:
        if n not in (2, 4):
            raise DccpOptionError(f"elapsed_time: length {n + 2} not 4 or 6", t, body)
        return ElapsedTime(int.from_bytes(body, "big"))
    if t == 44:
        if n != 4:
            raise DccpOptionError(f"data_checksum: length {n + 2} not 6", t, body)
        return DataChecksum(int.from_bytes(body, "big"))
    if t >= 128:
        return CcidOption(t, body)
    return UnknownOption(t, body)


def decode_options(data: bytes | bytearray | memoryview) -> tuple[Option, ...]:
    """Decode an options area. Raises only DccpParseError (truncated or invalid option)."""
    buf = bytes(data)
    out: list[Option] = []
    i, end = 0, len(buf)
    while i < end:
        t = buf[i]
        if t < 32:
            if t == 0:
                out.append(_PADDING)
            elif t == 1:
                out.append(_MANDATORY)
            elif t == 2:
                out.append(_SLOW_RECEIVER)
            else:
                out.append(UnknownOption(t))
            i += 1
            continue
        if i + 1 >= end:
            raise DccpOptionError(f"{_name(t)}: truncated before its length byte", t, b"")
        length = buf[i + 1]
        if length < 2:
            raise DccpOptionError(f"{_name(t)}: length {length} < 2", t, b"")
        if i + length > end:
            raise DccpOptionError(
                f"{_name(t)}: length {length} runs past the options area", t, buf[i + 2 : end]
            )
        out.append(decode_option_body(t, buf[i + 2 : i + length]))
        i += length
    return tuple(out)


# --- CRC-32c for the Data Checksum option (§9.3) ------------------------------------------


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32c (Castagnoli, RFC 3309), for the Data Checksum option."""
    crc = 0xFFFFFFFF
    t = _CRC32C
    for b in bytes(data):
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF

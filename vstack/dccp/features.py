"""DCCP feature negotiation (RFC 4340 §6).  Sans-IO.

Each feature exists twice per connection: the instance *located* at this
endpoint ("local", changed by our Change L / the peer's Change R) and the one
located at the peer ("remote", changed by our Change R / the peer's Change L).

Rules implemented:

* reconciliation: server-priority (SP) features take the first entry of the
  server's preference list that the client's list also holds (§6.3.1); if
  there is none the value stays as it was.  Non-negotiable (NN) features take
  the value the feature location sends (§6.3.2);
* **every Change the peer sends gets its Confirm** on our next packet
  (§6.2, §6.6.1): Confirm R for a Change L, Confirm L for a Change R; for SP
  features the chosen value followed by our preference list.  Linux 6.1
  resets with code 9 when a Change(CCID) in its Response goes unconfirmed;
* our own Changes are retransmitted on every packet (and the connection sends
  Acks for them) until their Confirm arrives (§6.6.3);
* a Change for an unknown feature gets an empty Confirm (§6.6.7);
* Mandatory (§5.8.2, §6.6.9): a Mandatory Change that is unknown, invalid or
  cannot be reconciled yields Reset code 6 (Mandatory Error) with Data 1-3 =
  the option type and its first two data bytes.

Feature numbers and defaults: CCID(1)=2, Allow Short Seqnos(2)=0, Sequence
Window(3)=100, ECN Incapable(4)=0, Ack Ratio(5)=2, Send Ack Vector(6)=0,
Send NDP Count(7)=0 (§6.4 table).  Only CCID 2 is implemented (no CCID3).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from vstack.dccp.options import (
    ChangeL,
    ChangeR,
    ConfirmL,
    ConfirmR,
    Feature,
    FeatureOption,
    Mandatory,
    Option,
    Padding,
)

# the feature numbers of RFC 4340 §6 (table 4), named once in options.Feature
CCID = Feature.CCID
ALLOW_SHORT_SEQNOS = Feature.ALLOW_SHORT_SEQNOS
SEQUENCE_WINDOW = Feature.SEQUENCE_WINDOW
ECN_INCAPABLE = Feature.ECN_INCAPABLE
ACK_RATIO = Feature.ACK_RATIO
SEND_ACK_VECTOR = Feature.SEND_ACK_VECTOR
SEND_NDP_COUNT = Feature.SEND_NDP_COUNT

RESET_MANDATORY_ERROR = 6
RESET_OPTION_ERROR = 5


class Kind(Enum):
    SP = "server-priority"
    NN = "non-negotiable"


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    number: int
    name: str
    kind: Kind
    default: int
    valid: tuple[int, int]  # inclusive value range

    def is_valid(self, v: int) -> bool:
        return self.valid[0] <= v <= self.valid[1]


# RFC 4340 §6.4, table 4 (+ §7.5.2 Sequence Window bounds, §11.3 Ack Ratio).
SPECS: dict[int, FeatureSpec] = {
    s.number: s
    for s in (
        FeatureSpec(CCID, "CCID", Kind.SP, 2, (2, 2)),  # only CCID2 implemented
        FeatureSpec(ALLOW_SHORT_SEQNOS, "Allow Short Seqnos", Kind.SP, 0, (0, 1)),
        FeatureSpec(SEQUENCE_WINDOW, "Sequence Window", Kind.NN, 100, (32, (1 << 46) - 1)),
        FeatureSpec(ECN_INCAPABLE, "ECN Incapable", Kind.SP, 0, (0, 1)),
        FeatureSpec(ACK_RATIO, "Ack Ratio", Kind.NN, 2, (1, 0xFFFF)),
        FeatureSpec(SEND_ACK_VECTOR, "Send Ack Vector", Kind.SP, 0, (0, 1)),
        FeatureSpec(SEND_NDP_COUNT, "Send NDP Count", Kind.SP, 0, (0, 1)),
    )
}

# Our preference lists (SP features), most preferred first.  We do not do ECN,
# so we prefer to be ECN Incapable; we accept whatever the peer says about its side.
DEFAULT_LOCAL_PREFS: dict[int, tuple[int, ...]] = {
    CCID: (2,),
    ALLOW_SHORT_SEQNOS: (0, 1),
    ECN_INCAPABLE: (1, 0),
    SEND_ACK_VECTOR: (1, 0),
    SEND_NDP_COUNT: (0, 1),
}
DEFAULT_REMOTE_PREFS: dict[int, tuple[int, ...]] = {
    CCID: (2,),
    ALLOW_SHORT_SEQNOS: (0, 1),
    ECN_INCAPABLE: (1, 0),
    SEND_ACK_VECTOR: (1, 0),
    SEND_NDP_COUNT: (0, 1),
}


@dataclass(frozen=True, slots=True)
class NegotiationFailure:
    """A local decision to reset the connection (code and Data 1-3)."""

    code: int
    data: bytes
    reason: str


@dataclass(slots=True)
class _Pending:
    values: tuple[int, ...]
    mandatory: bool
    sent: int = 0


@dataclass(slots=True)
class FeatureResult:
    """What one packet's options did."""

    confirms_owed: bool = False  # we must send a packet carrying Confirms
    changed: list[tuple[str, int, int]] = field(default_factory=list)  # (L|R, feature, value)
    failure: NegotiationFailure | None = None


def reconcile_sp(server: Iterable[int], client: Iterable[int]) -> int | None:
    """§6.3.1: the first server preference the client also lists."""
    cl = set(client)
    for v in server:
        if v in cl:
            return v
    return None


class FeatureNegotiator:
    """Feature state of one connection endpoint."""

    def __init__(
        self,
        is_server: bool,
        local_prefs: Mapping[int, tuple[int, ...]] | None = None,
        remote_prefs: Mapping[int, tuple[int, ...]] | None = None,
    ) -> None:
        self.is_server = is_server
        self.local_prefs = dict(DEFAULT_LOCAL_PREFS if local_prefs is None else local_prefs)
        self.remote_prefs = dict(DEFAULT_REMOTE_PREFS if remote_prefs is None else remote_prefs)
        self.local: dict[int, int] = {n: s.default for n, s in SPECS.items()}
        self.remote: dict[int, int] = {n: s.default for n, s in SPECS.items()}
        self._pending_l: dict[int, _Pending] = {}  # our Change L awaiting Confirm R
        self._pending_r: dict[int, _Pending] = {}  # our Change R awaiting Confirm L
        self._confirms: list[ConfirmL | ConfirmR] = []  # owed, sent once on the next packet
        # A non-mandatory Change unanswered after this many sendings is given up (the
        # feature keeps its value).  Linux 6.1 ignores SP Changes once OPEN, for example.
        self.max_change_sends = 16
        self.abandoned: list[tuple[str, int]] = []
        self.confirms_sent = 0
        self.changes_received = 0

    # ---- starting negotiations -------------------------------------------------
    def change_local(self, feature: int, values: tuple[int, ...], mandatory: bool = False) -> None:
        """Queue Change L: we want the feature located here to become ``values[0]``-ish."""
        self._pending_l[feature] = _Pending(tuple(values), mandatory)

    def change_remote(self, feature: int, values: tuple[int, ...], mandatory: bool = False) -> None:
        """Queue Change R: we want the peer's instance changed."""
        self._pending_r[feature] = _Pending(tuple(values), mandatory)

    @property
    def pending(self) -> bool:
        """Changes sent but not yet confirmed."""
        return bool(self._pending_l or self._pending_r)

    @property
    def confirms_owed(self) -> bool:
        return bool(self._confirms)

    def pending_features(self) -> list[tuple[str, int]]:
        return [("L", f) for f in self._pending_l] + [("R", f) for f in self._pending_r]

    # ---- producing options -----------------------------------------------------
    def take_confirms(self) -> list[Option]:
        """The owed Confirms only (the caller repeats them itself, e.g. in PARTOPEN)."""
        out: list[Option] = list(self._confirms)
        self.confirms_sent += len(out)
        self._confirms.clear()
        return out

    def options(self) -> list[Option]:
        """Options for the next packet: owed Confirms (once), then pending Changes (§6.6.3)."""
        out: list[Option] = list(self._confirms)
        self.confirms_sent += len(self._confirms)
        self._confirms.clear()
        for where, table in (("L", self._pending_l), ("R", self._pending_r)):
            for feat, p in list(table.items()):
                if p.sent >= self.max_change_sends and not p.mandatory:
                    del table[feat]
                    self.abandoned.append((where, feat))
                    continue
                if p.mandatory:
                    out.append(Mandatory())
                out.append(ChangeL(feat, p.values) if where == "L" else ChangeR(feat, p.values))
                p.sent += 1
        return out

    # ---- consuming options ----------------------------------------------------
    def process(self, options: Iterable[Option]) -> FeatureResult:
        """Handle the feature options of one received (sequence-valid) packet."""
        res = FeatureResult()
        mandatory = False
        for opt in options:
            if isinstance(opt, Padding):
                continue
            if isinstance(opt, Mandatory):
                mandatory = True
                continue
            if isinstance(opt, ChangeL | ChangeR):
                self.changes_received += 1
                fail = self._on_change(opt, mandatory, res)
                res.confirms_owed = True
            elif isinstance(opt, ConfirmL | ConfirmR):
                fail = self._on_confirm(opt, mandatory, res)
            else:
                fail = None
            mandatory = False
            if fail is not None:
                res.failure = fail
                return res
        return res

    def _fail(self, opt: FeatureOption, reason: str) -> NegotiationFailure:
        body = bytes((opt.feature,)) + opt.value_bytes()
        data = bytes((opt.TYPE,)) + body[:2]
        return NegotiationFailure(RESET_MANDATORY_ERROR, data.ljust(3, b"\0"), reason)

    def _on_change(
        self, opt: ChangeL | ChangeR, mandatory: bool, res: FeatureResult
    ) -> NegotiationFailure | None:
        # Change L from the peer is about the feature located at the peer (our
        # "remote"); we answer Confirm R.  Change R is about ours; Confirm L.
        peer_local = isinstance(opt, ChangeL)
        confirm_cls: type[ConfirmL] | type[ConfirmR] = ConfirmR if peer_local else ConfirmL
        table = self.remote if peer_local else self.local
        prefs_map = self.remote_prefs if peer_local else self.local_prefs
        spec = SPECS.get(opt.feature)
        if spec is None or (spec.kind is Kind.NN and not peer_local):
            # §6.6.7 unknown feature (and §6.3.2: NN features take only Change L)
            if mandatory:
                return self._fail(opt, f"mandatory change of unknown feature {opt.feature}")
            self._owe(confirm_cls(opt.feature, ()))
            return None
        if spec.kind is Kind.NN:
            value = opt.value
            if value is None or len(opt.values) != 1 or not spec.is_valid(value):
                if mandatory:
                    return self._fail(opt, f"invalid {spec.name} value {opt.values}")
                # §6.6.8: confirm the current value
                self._owe(confirm_cls(opt.feature, (table[opt.feature],)))
                return None
            table[opt.feature] = value
            res.changed.append(("R" if peer_local else "L", opt.feature, value))
            self._owe(confirm_cls(opt.feature, (value,), opt.width))  # same width as the Change
            return None
        ours = prefs_map.get(opt.feature, (spec.default,))
        theirs = tuple(v for v in opt.values if spec.is_valid(v)) if opt.values else ()
        # the server's list decides (§6.3.1)
        chosen = reconcile_sp(ours, theirs) if self.is_server else reconcile_sp(theirs, ours)
        if chosen is None:
            if mandatory:
                return self._fail(opt, f"no common value for {spec.name}: {opt.values} vs {ours}")
            chosen = table[opt.feature]
        else:
            table[opt.feature] = chosen
            res.changed.append(("R" if peer_local else "L", opt.feature, chosen))
        self._owe(confirm_cls(opt.feature, (chosen, *ours)))
        return None

    def _owe(self, confirm: ConfirmL | ConfirmR) -> None:
        # one Confirm per feature instance per packet: a newer answer replaces an older one
        self._confirms = [
            c
            for c in self._confirms
            if not (type(c) is type(confirm) and c.feature == confirm.feature)
        ]
        self._confirms.append(confirm)

    def _on_confirm(
        self, opt: ConfirmL | ConfirmR, mandatory: bool, res: FeatureResult
    ) -> NegotiationFailure | None:
        # Confirm R answers our Change L (feature located here); Confirm L our Change R.
        ours_here = isinstance(opt, ConfirmR)
        pending_map = self._pending_l if ours_here else self._pending_r
        table = self.local if ours_here else self.remote
        p = pending_map.get(opt.feature)
        if p is None:
            return None  # §6.6.4: a Confirm for no outstanding Change is ignored
        spec = SPECS.get(opt.feature)
        value = opt.value
        if value is None:
            # §6.6.7: the peer does not know the feature
            del pending_map[opt.feature]
            if p.mandatory:
                return self._fail(opt, f"peer does not know mandatory feature {opt.feature}")
            return None
        if spec is not None and not spec.is_valid(value):
            return NegotiationFailure(
                RESET_OPTION_ERROR,
                bytes((opt.TYPE, opt.feature, value & 0xFF)),
                f"confirmed invalid value {value} for {spec.name}",
            )
        if spec is not None and spec.kind is Kind.NN and value not in p.values:
            return None  # confirms an earlier Change we have since replaced: keep waiting
        if spec is not None and spec.kind is Kind.SP and value not in p.values:
            # the peer confirmed a value we never offered: keep it only if valid (it is),
            # as Linux does; it is still the reconciled value (§6.3.1 server decides)
            pass
        table[opt.feature] = value
        del pending_map[opt.feature]
        res.changed.append(("L" if ours_here else "R", opt.feature, value))
        return None

"""DCCP sequence-number arithmetic and validity windows (RFC 4340 §7).

Sans-IO and pure: every function takes integers and returns integers/booleans.

* 48-bit circular arithmetic (§7.1): :func:`add`, :func:`sub`, :func:`dist`,
  :func:`lt`, :func:`le`, :func:`between`.
* Extension of 24-bit short sequence numbers to 48 bits (§7.6, Appendix A):
  :func:`extend`.
* Sequence and acknowledgement validity windows (§7.5.1): :class:`SeqState`
  holds ISS/ISR/GSS/GSR/GAR and the Sequence Window values, and computes
  SWL/SWH/AWL/AWH.
* The per-packet-type validity table of §7.5.3 (applied as step 6 of the
  §8.5 pseudocode): :data:`VALIDITY_TABLE` and :meth:`SeqState.check`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

SEQ_BITS = 48
SEQ_MOD = 1 << SEQ_BITS
SEQ_MASK = SEQ_MOD - 1
SHORT_BITS = 24
SHORT_MOD = 1 << SHORT_BITS
_HALF = 1 << (SEQ_BITS - 1)


def add(a: int, b: int) -> int:
    """``a + b`` modulo 2**48 (§7.1)."""
    return (a + b) & SEQ_MASK


def sub(a: int, b: int) -> int:
    """``a - b`` modulo 2**48, always in ``[0, 2**48)``."""
    return (a - b) & SEQ_MASK


def dist(a: int, b: int) -> int:
    """Signed circular distance from ``b`` to ``a`` in ``[-2**47, 2**47)``.

    ``dist(a, b) > 0`` means ``a`` is "after" ``b`` (§7.1: comparisons are
    circular, half the space ahead is greater).
    """
    d = (a - b) & SEQ_MASK
    return d - SEQ_MOD if d >= _HALF else d


def lt(a: int, b: int) -> bool:
    """Circular ``a < b``."""
    return dist(a, b) < 0


def le(a: int, b: int) -> bool:
    """Circular ``a <= b``."""
    return dist(a, b) <= 0


def gt(a: int, b: int) -> bool:
    return dist(a, b) > 0


def ge(a: int, b: int) -> bool:
    return dist(a, b) >= 0


def between(x: int, lo: int, hi: int) -> bool:
    """Circular ``lo <= x <= hi`` (the window runs forward from ``lo`` to ``hi``)."""
    return sub(x, lo) <= sub(hi, lo)


def cmax(a: int, b: int) -> int:
    """Circular maximum of two sequence numbers."""
    return a if ge(a, b) else b


def extend(short: int, reference: int, bits: int = SHORT_BITS) -> int:
    """Extend a ``bits``-wide sequence number to 48 bits (§7.6 and Appendix A).

    ``reference`` is the expected neighbourhood: GSR for sequence numbers,
    GSS for acknowledgement numbers.  The result is the 48-bit number whose
    low ``bits`` bits equal ``short`` and which lies closest to ``reference``
    (within half the short space on either side), as in the RFC's
    Appendix A algorithm.
    """
    mod = 1 << bits
    short &= mod - 1
    ref_low = reference & (mod - 1)
    base = reference - ref_low
    if short < ref_low and ref_low - short > mod // 2:
        base += mod  # short wrapped forward past the reference
    elif short > ref_low and short - ref_low > mod // 2:
        base -= mod  # short is slightly behind a reference that wrapped
    return (base + short) & SEQ_MASK


class SeqCheck(Enum):
    """How a packet type's number is checked (§7.5.3 table)."""

    NONE = "n/a"
    WINDOW = "SWL <= seqno <= SWH / AWL <= ackno <= AWH"
    STRICT = "GSR < seqno <= SWH / GAR <= ackno <= AWH"
    OPEN_HIGH = "SWL <= seqno (no upper bound)"


# §7.5.3 "Sequence-Validity Rules": (sequence check, acknowledgement check) per
# packet type number (0 Request ... 9 SyncAck).  Close/CloseReq/Reset use the
# stricter LSWL = GSR + 1 and LAWL = GAR of §8.5 step 6.
VALIDITY_TABLE: dict[int, tuple[SeqCheck, SeqCheck]] = {
    0: (SeqCheck.WINDOW, SeqCheck.NONE),  # Request
    1: (SeqCheck.WINDOW, SeqCheck.WINDOW),  # Response
    2: (SeqCheck.WINDOW, SeqCheck.NONE),  # Data
    3: (SeqCheck.WINDOW, SeqCheck.WINDOW),  # Ack
    4: (SeqCheck.WINDOW, SeqCheck.WINDOW),  # DataAck
    5: (SeqCheck.STRICT, SeqCheck.STRICT),  # CloseReq
    6: (SeqCheck.STRICT, SeqCheck.STRICT),  # Close
    7: (SeqCheck.STRICT, SeqCheck.STRICT),  # Reset
    8: (SeqCheck.OPEN_HIGH, SeqCheck.WINDOW),  # Sync
    9: (SeqCheck.OPEN_HIGH, SeqCheck.WINDOW),  # SyncAck
}


@dataclass(slots=True)
class SeqState:
    """Per-connection sequence-number variables (§7.5.1, §8.5).

    ``local_window`` is the Sequence Window value located at this endpoint
    (W' in §7.5.1, bounds the acknowledgement window AWL..AWH);
    ``remote_window`` is the peer's (W, bounds SWL..SWH).
    """

    iss: int = 0
    isr: int | None = None
    gss: int = 0
    gsr: int | None = None
    gar: int | None = None
    local_window: int = 100
    remote_window: int = 100

    def next_seq(self) -> int:
        """Allocate the next sequence number to send (every packet uses one, §7.3)."""
        self.gss = add(self.gss, 1)
        return self.gss

    def start(self, iss: int) -> None:
        self.iss = iss & SEQ_MASK
        self.gss = self.iss
        self.gar = self.iss

    def set_isr(self, isr: int) -> None:
        self.isr = isr & SEQ_MASK
        self.gsr = self.isr

    # §7.5.1: SWL = max(GSR + 1 - floor(W/4), ISR), SWH = GSR + floor(3W/4)
    @property
    def swl(self) -> int:
        assert self.gsr is not None and self.isr is not None
        low = sub(add(self.gsr, 1), self.remote_window // 4)
        # max(low, ISR) in circular terms: ISR only matters early on.
        return self.isr if lt(low, self.isr) and le(self.isr, self.gsr) else low

    @property
    def swh(self) -> int:
        assert self.gsr is not None
        return add(self.gsr, (3 * self.remote_window) // 4)

    # §7.5.1: AWL = max(GSS + 1 - W', ISS), AWH = GSS
    @property
    def awl(self) -> int:
        low = sub(add(self.gss, 1), self.local_window)
        return self.iss if lt(low, self.iss) and le(self.iss, self.gss) else low

    @property
    def awh(self) -> int:
        return self.gss

    def seq_valid(self, ptype: int, seqno: int) -> bool:
        check = VALIDITY_TABLE[ptype][0]
        gsr = self.gsr
        if gsr is None:
            return True  # nothing received yet (LISTEN / REQUEST: §7.5.3 footnote)
        if check is SeqCheck.WINDOW:
            # fast path of between(seqno, swl, swh) once GSR is W/4 past ISR
            w = self.remote_window
            d = (seqno - gsr - 1 + w // 4) & SEQ_MASK  # distance above GSR + 1 - W/4
            isr = self.isr if self.isr is not None else gsr
            if ((gsr - isr) & SEQ_MASK) >= w // 4:
                return d <= w // 4 - 1 + (3 * w) // 4
            return between(seqno, self.swl, self.swh)
        if check is SeqCheck.STRICT:
            return between(seqno, add(gsr, 1), self.swh)
        if check is SeqCheck.OPEN_HIGH:
            return ge(seqno, self.swl)
        return True

    def ack_valid(self, ptype: int, ackno: int | None) -> bool:
        check = VALIDITY_TABLE[ptype][1]
        if check is SeqCheck.NONE or ackno is None:
            return True
        if check is SeqCheck.STRICT:
            low = self.gar if self.gar is not None else self.awl
            return between(ackno, low, self.awh)
        return between(ackno, self.awl, self.awh)

    def check(self, ptype: int, seqno: int, ackno: int | None) -> bool:
        """§8.5 step 6 / §7.5.3: is the packet sequence-valid?"""
        return self.seq_valid(ptype, seqno) and self.ack_valid(ptype, ackno)

    def update_received(self, ptype: int, seqno: int, ackno: int | None) -> None:
        """§8.5 step 6: update GSR (and GAR unless Sync) for a valid packet."""
        if self.gsr is None or gt(seqno, self.gsr):
            self.gsr = seqno
        if ackno is not None and ptype != 8 and (self.gar is None or gt(ackno, self.gar)):
            self.gar = ackno

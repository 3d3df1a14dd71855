"""CCID2, TCP-like congestion control (RFC 4341), sender half.  Sans-IO.

The receiver half is the Ack Vector (:mod:`vstack.dccp.ackvector`) plus the
Ack Ratio rule in the connection; this module is the HC-sender:

* ``cwnd`` counted in packets, slow start and congestion avoidance (§5);
* the ``pipe`` (data packets sent, neither acked nor lost) and
  :meth:`Ccid2Sender.can_send`, False at a full window (§5);
* loss detection from Ack Vectors: a data packet is lost when it is not
  acknowledged and ``NUMDUPACK`` (3) data packets sent after it have been
  (§5, "dupacks" in the RFC 2581 sense), or when the RTO expires;
* one window reduction per window of data (``recovery_point``), ECN marks
  treated like loss (§5);
* the retransmission timeout in the style of RFC 6298 (SRTT, RTTVAR,
  RTO = SRTT + 4 RTTVAR, clamped; exponential backoff on expiry);
* the Ack Ratio the sender wants the peer to use (§6.1.2): at most half the
  window, at least 1, so that a small window still gets acks.

Time is passed in as ``now`` (seconds, float).  Nothing here sends packets:
the connection asks :meth:`Ccid2Sender.can_send`, reports
:meth:`~Ccid2Sender.on_sent`, :meth:`~Ccid2Sender.on_ack` and
:meth:`~Ccid2Sender.on_timeout`, and reads :meth:`~Ccid2Sender.next_timer`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from vstack.dccp import seq as sq
from vstack.dccp.ackvector import AckRange, CellState

NUMDUPACK = 3


@dataclass(slots=True)
class Ccid2Config:
    mss: int = 1424
    initial_cwnd: int | None = None  # None: RFC 3390 min(4, max(2, 4380 // mss)) packets
    max_cwnd: int = 1 << 16  # the connection lowers this to Sequence Window / 5
    initial_rto: float = 1.0  # RFC 6298 §2.1
    min_rto: float = 0.2  # RFC 6298 says 1 s; Linux's CCID2 and TCP use 200 ms
    max_rto: float = 64.0
    clock_granularity: float = 0.001
    max_ack_ratio: int = 2
    numdupack: int = NUMDUPACK


@dataclass(slots=True)
class _Sent:
    time: float
    acked: bool = False
    lost: bool = False


@dataclass(slots=True)
class Ccid2Stats:
    sent: int = 0
    acked: int = 0
    lost: int = 0
    ecn_marked: int = 0
    timeouts: int = 0
    reductions: int = 0
    rtt_samples: int = 0


@dataclass(slots=True)
class AckResult:
    newly_acked: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)


class Ccid2Sender:
    def __init__(self, config: Ccid2Config | None = None) -> None:
        self.config = config or Ccid2Config()
        c = self.config
        init = c.initial_cwnd
        if init is None:
            init = min(4, max(2, 4380 // max(1, c.mss)))
        self.cwnd: int = max(1, min(init, c.max_cwnd))
        self.ssthresh: int = 1 << 30
        self._ca_count = 0  # acks counted towards the next CA increase
        self._out: OrderedDict[int, _Sent] = OrderedDict()  # data seqno -> state, in send order
        self._pipe = 0
        self.recovery_point: int | None = None  # highest seqno sent at the last reduction
        self._last_sent: int | None = None
        self.srtt: float | None = None
        self.rttvar: float = 0.0
        self.rto: float = c.initial_rto
        self._rto_deadline: float | None = None
        self.stats = Ccid2Stats()

    # ---- window --------------------------------------------------------
    @property
    def pipe(self) -> int:
        """Data packets in flight: sent, not acknowledged, not declared lost."""
        return self._pipe

    def can_send(self) -> bool:
        """§5: the sender may send a data packet only while pipe < cwnd."""
        return self._pipe < self.cwnd

    def set_max_cwnd(self, max_cwnd: int) -> None:
        self.config.max_cwnd = max(2, max_cwnd)
        self.cwnd = min(self.cwnd, self.config.max_cwnd)

    def desired_ack_ratio(self) -> int:
        """RFC 4341 §6.1.2: Ack Ratio at most cwnd/2 (and at least 1)."""
        return max(1, min(self.config.max_ack_ratio, self.cwnd // 2))

    # ---- events --------------------------------------------------------
    def on_sent(self, seqno: int, now: float) -> None:
        """A data-carrying packet with ``seqno`` left."""
        self._out[seqno] = _Sent(now)
        self._pipe += 1
        self._last_sent = seqno
        self.stats.sent += 1
        if self._rto_deadline is None:
            self._rto_deadline = now + self.rto

    def on_ack(self, ackno: int, ranges: Sequence[AckRange] | None, now: float) -> AckResult:
        """Process an acknowledgement (RFC 4341 §5, §6).

        ``ranges`` is the decoded Ack Vector (None if the packet had none; then
        only ``ackno`` itself counts as received).
        """
        res = AckResult()
        if not self._out:
            return res
        acked: set[int] = set()
        marked: set[int] = set()
        if ranges is None:
            if ackno in self._out:
                acked.add(ackno)
        else:
            self._match_ranges(ranges, acked, marked)
        for s in acked:
            ent = self._out[s]
            if ent.acked:
                continue
            if not ent.lost:
                self._pipe -= 1
            ent.acked = True
            res.newly_acked.append(s)
        if not res.newly_acked:
            return res
        self.stats.acked += len(res.newly_acked)
        # RTT sample from the packet named by the Acknowledgement Number (RFC 6298 §2)
        if ackno in acked and ackno in res.newly_acked:
            self._rtt_sample(now - self._out[ackno].time)
        ecn = [s for s in res.newly_acked if s in marked]
        if ecn:
            self.stats.ecn_marked += len(ecn)
            self._reduce(ecn[0])
        # window growth per newly acknowledged packet (§5)
        for _ in res.newly_acked:
            if self.cwnd < self.ssthresh:
                self.cwnd += 1
            else:
                self._ca_count += 1
                if self._ca_count >= self.cwnd:
                    self._ca_count = 0
                    self.cwnd += 1
        self.cwnd = min(self.cwnd, self.config.max_cwnd)
        res.lost = self._detect_losses()
        self._gc()
        self._rto_deadline = (now + self.rto) if self._pipe > 0 else None
        return res

    def on_ack_cumulative(self, ackno: int, now: float) -> AckResult:
        """Fallback when the peer sends no Ack Vectors: treat ``ackno`` as cumulative."""
        if not self._out:
            return AckResult()
        low = next(iter(self._out))
        if sq.lt(ackno, low):
            return AckResult()
        return self.on_ack(ackno, [AckRange(ackno, low, CellState.RECEIVED)], now)

    def _match_ranges(self, ranges: Sequence[AckRange], acked: set[int], marked: set[int]) -> None:
        out = list(self._out)  # ascending (send order)
        # ranges are descending and disjoint; walk both from the top
        i = len(out) - 1
        for r in ranges:
            while i >= 0 and sq.gt(out[i], r.high):
                i -= 1
            while i >= 0 and sq.ge(out[i], r.low):
                if r.state != CellState.NOT_RECEIVED:
                    acked.add(out[i])
                    if r.state == CellState.ECN_MARKED:
                        marked.add(out[i])
                i -= 1
            if i < 0:
                break

    def _detect_losses(self) -> list[int]:
        lost: list[int] = []
        above = 0
        for s in reversed(self._out):
            ent = self._out[s]
            if ent.acked:
                above += 1
            elif not ent.lost and above >= self.config.numdupack:
                ent.lost = True
                self._pipe -= 1
                lost.append(s)
        if lost:
            lost.reverse()
            self.stats.lost += len(lost)
            self._reduce(lost[0])
        return lost

    def _reduce(self, trigger: int) -> None:
        """Halve once per window of data (§5, like TCP fast recovery)."""
        if self.recovery_point is not None and sq.le(trigger, self.recovery_point):
            return
        self.ssthresh = max(self.cwnd // 2, 2)
        self.cwnd = self.ssthresh
        self._ca_count = 0
        self.recovery_point = self._last_sent
        self.stats.reductions += 1

    def _gc(self) -> None:
        while self._out:
            s, ent = next(iter(self._out.items()))
            if ent.acked or ent.lost:
                del self._out[s]
            else:
                break
        # keep the table bounded even if nothing resolves the head
        while len(self._out) > 4 * self.config.max_cwnd + 64:
            s, ent = self._out.popitem(last=False)
            if not ent.acked and not ent.lost:
                self._pipe -= 1

    def seed_rtt(self, r: float) -> None:
        """An RTT measured outside CCID2 (the handshake's Timestamp Echo, RFC 4340 §13)."""
        self._rtt_sample(r)

    def _rtt_sample(self, r: float) -> None:
        r = max(r, 0.0)
        self.stats.rtt_samples += 1
        if self.srtt is None:
            self.srtt = r
            self.rttvar = r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        c = self.config
        rto = self.srtt + max(c.clock_granularity, 4 * self.rttvar)
        self.rto = min(max(rto, c.min_rto), c.max_rto)

    def next_timer(self) -> float | None:
        return self._rto_deadline if self._pipe > 0 else None

    def on_timeout(self, now: float) -> list[int]:
        """RTO expiry: everything in flight is lost, cwnd = 1, back off (RFC 6298 §5)."""
        if self._rto_deadline is None or now < self._rto_deadline or self._pipe == 0:
            return []
        lost = [s for s, e in self._out.items() if not e.acked and not e.lost]
        for s in lost:
            self._out[s].lost = True
        self._pipe = 0
        self.stats.lost += len(lost)
        self.stats.timeouts += 1
        self.ssthresh = max(self.cwnd // 2, 2)
        self.cwnd = 1
        self._ca_count = 0
        self.recovery_point = self._last_sent
        self.rto = min(self.rto * 2, self.config.max_rto)
        self._rto_deadline = None
        self._gc()
        return lost

    @property
    def rtt(self) -> float | None:
        return self.srtt

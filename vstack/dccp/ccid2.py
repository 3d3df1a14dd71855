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
_HALF = 1 << 47  # half the 48-bit sequence space (§7.1)


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
        # data packets in flight (sent, neither acked nor lost): seqno -> send time, in
        # send order (= circular seqno order). Acked and lost packets leave at once, so
        # an ack costs O(packets it acknowledges), not O(window) (issue 6: with an ack
        # every Ack Ratio packets the old O(cwnd) scan per ack was 3.6 us per data packet)
        self._out: OrderedDict[int, float] = OrderedDict()
        # the NUMDUPACK highest data seqnos ever acknowledged, newest first: a packet in
        # flight below the last of them has NUMDUPACK later packets acknowledged (§5)
        self._acked_hi: list[int] = []
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
        return len(self._out)

    def can_send(self) -> bool:
        """§5: the sender may send a data packet only while pipe < cwnd."""
        return len(self._out) < self.cwnd

    def set_max_cwnd(self, max_cwnd: int) -> None:
        self.config.max_cwnd = max(2, max_cwnd)
        if self.cwnd > self.config.max_cwnd:
            self.cwnd = self.config.max_cwnd
            self._ca_count = 0  # counted towards the larger window

    def desired_ack_ratio(self) -> int:
        """RFC 4341 §6.1.2: Ack Ratio at most cwnd/2 (and at least 1)."""
        return max(1, min(self.config.max_ack_ratio, self.cwnd // 2))

    # ---- events --------------------------------------------------------
    def on_sent(self, seqno: int, now: float) -> None:
        """A data-carrying packet with ``seqno`` left."""
        self._out[seqno] = now
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
        out = self._out
        if not out:
            return res
        ack_sent = out.get(ackno)  # the RTT sample's packet (RFC 6298 §2)
        newly = res.newly_acked
        marked: list[int] = []
        if ranges is None:
            if ack_sent is not None:
                newly.append(ackno)
        else:
            # distances back from ackno: in-flight packets ascending = distances falling;
            # the ranges come newest first, so reversed they are oldest first too
            mask = sq.SEQ_MASK
            rs = [((ackno - r.low) & mask, (ackno - r.high) & mask, r.state)
                  for r in reversed(ranges)]
            k, nr = 0, len(rs)
            for s in out:
                d = (ackno - s) & mask
                if d >= _HALF:
                    break  # sent after ackno: this ack says nothing about it
                while k < nr and rs[k][1] > d:
                    k += 1  # that range lies entirely before s
                if k == nr:
                    break  # no range reaches s or anything newer
                lo_d, _hi_d, state = rs[k]
                if lo_d >= d and state != CellState.NOT_RECEIVED:
                    newly.append(s)
                    if state == CellState.ECN_MARKED:
                        marked.append(s)
        if not newly:
            return res
        for s in newly:
            del out[s]
        self.stats.acked += len(newly)
        if ack_sent is not None and (ranges is None or ackno in newly):
            self._rtt_sample(now - ack_sent)
        if marked:
            self.stats.ecn_marked += len(marked)
            self._reduce(marked[0])
        self._grow(len(newly))
        res.lost = self._detect_losses(ackno, newly)
        self._bound()
        self._rto_deadline = (now + self.rto) if out else None
        return res

    def _grow(self, n: int) -> None:
        """§5: +1 per acknowledged packet in slow start, +1 per window in congestion
        avoidance (the per-packet rule, summed)."""
        cwnd = self.cwnd
        if cwnd < self.ssthresh:
            inc = min(n, self.ssthresh - cwnd)
            cwnd += inc
            n -= inc
        ca = self._ca_count
        while n > 0:
            need = max(1, cwnd - ca)  # ca may exceed a cwnd that shrank since
            if n >= need:
                n -= need
                ca = 0
                cwnd += 1
            else:
                ca += n
                n = 0
        self._ca_count = ca
        self.cwnd = min(cwnd, self.config.max_cwnd)

    def on_ack_cumulative(self, ackno: int, now: float) -> AckResult:
        """Fallback when the peer sends no Ack Vectors: treat ``ackno`` as cumulative."""
        if not self._out:
            return AckResult()
        low = next(iter(self._out))
        if sq.lt(ackno, low):
            return AckResult()
        return self.on_ack(ackno, [AckRange(ackno, low, CellState.RECEIVED)], now)

    def _detect_losses(self, ackno: int, newly: list[int]) -> list[int]:
        """A packet in flight is lost once NUMDUPACK data packets sent after it are
        acknowledged (§5): it lies below the NUMDUPACK-th highest acknowledged seqno.
        In flight is in seqno order, so the lost ones are at its front."""
        mask = sq.SEQ_MASK
        nd = self.config.numdupack
        # newest first; a late, reordered ack (ackno below an earlier one) keeps them
        hi = sorted({*self._acked_hi, *newly[-nd:]}, key=lambda s: (s - ackno + _HALF) & mask,
                    reverse=True)[:nd]
        self._acked_hi = hi
        if len(hi) < nd:
            return []
        third = hi[-1]
        lost: list[int] = []
        out = self._out
        for s in out:
            if (third - s) & mask >= _HALF or s == third:
                break
            lost.append(s)
        if lost:
            for s in lost:
                del out[s]
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

    def _bound(self) -> None:
        """Keep the table bounded even if nothing resolves its head."""
        out = self._out
        while len(out) > 4 * self.config.max_cwnd + 64:
            out.popitem(last=False)

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
        return self._rto_deadline if self._out else None

    def on_timeout(self, now: float) -> list[int]:
        """RTO expiry: everything in flight is lost, cwnd = 1, back off (RFC 6298 §5)."""
        if self._rto_deadline is None or now < self._rto_deadline or not self._out:
            return []
        lost = list(self._out)
        self._out.clear()
        self.stats.lost += len(lost)
        self.stats.timeouts += 1
        self.ssthresh = max(self.cwnd // 2, 2)
        self.cwnd = 1
        self._ca_count = 0
        self.recovery_point = self._last_sent
        self.rto = min(self.rto * 2, self.config.max_rto)
        self._rto_deadline = None
        return lost

    @property
    def rtt(self) -> float | None:
        return self.srtt

"""Ack Vector bookkeeping (RFC 4340 §11.4, used by CCID2, RFC 4341 §6).

Sans-IO.  Two halves:

* :class:`AckVectorReceiver` (the HC-receiver): records which sequence numbers
  arrived, run-length encodes them into Ack Vector cells (§11.4: a cell is
  ``state << 6 | run_length``; state 0 received, 1 received ECN-marked,
  3 not yet received; a run length of ``n`` covers ``n + 1`` packets, newest
  first, starting at the packet's Acknowledgement Number), remembers which of
  its own packets carried which vector, and trims its state when the peer
  acknowledges one of those packets ("acks of acks", §11.4.2 / RFC 4341 §6.1.4).
* :func:`decode_cells` (the HC-sender): turns an Ack Vector received from the
  peer, together with the packet's Acknowledgement Number, into seqno ranges
  with their states.

Ack Vector [Nonce 0] (option 38) and [Nonce 1] (option 39) are treated alike
on input: this stack sets no ECN codepoints (it negotiates ECN Incapable), so
the nonce sum it reports is always 0 and it does not verify the peer's
(§12.2 allows this when ECN is not in use).  Cells are ``(state, run_length)``
pairs here; the codec converts them to bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum

from vstack.dccp import seq as sq

MAX_RUN = 63  # six bits of run length
MAX_CELLS = 253  # an option carries at most 253 bytes of cells (§5.8, §11.4)


class CellState(IntEnum):
    """Ack Vector cell states (§11.4)."""

    RECEIVED = 0
    ECN_MARKED = 1
    NOT_RECEIVED = 3


Cell = tuple[int, int]  # (state, run_length), run_length 0..63 covers run_length+1 packets


def encode_cell(state: int, run: int) -> int:
    return ((state & 3) << 6) | (run & MAX_RUN)


def decode_cell(byte: int) -> Cell:
    return (byte >> 6) & 3, byte & MAX_RUN


@dataclass(frozen=True, slots=True)
class AckRange:
    """Seqnos ``low..high`` (inclusive, circular) all in ``state``."""

    high: int
    low: int
    state: int

    def __iter__(self) -> Iterator[int]:
        n = sq.sub(self.high, self.low)
        for i in range(n + 1):
            yield sq.sub(self.high, i)


def decode_cells(ackno: int, cells: Iterable[Cell]) -> list[AckRange]:
    """Ranges reported by an Ack Vector whose first cell starts at ``ackno`` (§11.4)."""
    out: list[AckRange] = []
    cur = ackno
    for state, run in cells:
        low = sq.sub(cur, run)
        out.append(AckRange(cur, low, state))
        cur = sq.sub(low, 1)
    return out


class AckVectorReceiver:
    """HC-receiver Ack Vector state: which seqnos arrived, run-length encoded on demand.

    ``max_packets`` bounds the memory held when acks of acks do not arrive;
    older state is forgotten first (it is then simply not reported).
    """

    def __init__(self, max_packets: int = MAX_CELLS * (MAX_RUN + 1), max_records: int = 256):
        self.max_packets = max_packets
        self.max_records = max_records
        self._tail: int | None = None  # lowest tracked seqno
        self._states = bytearray()  # index i -> state of seqno tail + i
        # our packet seqno -> the Acknowledgement Number its Ack Vector started at
        self._records: OrderedDict[int, int] = OrderedDict()
        self.trimmed = 0  # how many times an ack-of-ack trimmed the state
        self._trimmed_below: int | None = None  # state below this was reported and dropped

    # ---- receiving -------------------------------------------------------
    @property
    def head(self) -> int | None:
        """Greatest seqno recorded (the Ack Vector's starting Acknowledgement Number)."""
        if self._tail is None or not self._states:
            return None
        return sq.add(self._tail, len(self._states) - 1)

    @property
    def tail(self) -> int | None:
        return self._tail

    def __len__(self) -> int:
        return len(self._states)

    def add(self, seqno: int, state: int = CellState.RECEIVED) -> bool:
        """Record that ``seqno`` arrived; False if it was a duplicate or too old."""
        if self._tail is None:
            self._tail = seqno
            self._states = bytearray((state,))
            return True
        if not self._states:  # everything up to tail - 1 was trimmed by an ack of ack
            ahead = sq.dist(seqno, self._tail)
            if ahead < 0:
                return False  # at or below the trim point: already reported
            if ahead > self.max_packets:
                self._tail = seqno
                ahead = 0
            self._states = bytearray((CellState.NOT_RECEIVED,)) * ahead + bytes((state,))
            return True
        head = sq.add(self._tail, len(self._states) - 1)
        ahead = sq.dist(seqno, head)
        if ahead > 0:
            if ahead > self.max_packets:
                self._tail = seqno
                self._states = bytearray((state,))
                return True
            self._states.extend(bytes((CellState.NOT_RECEIVED,)) * (ahead - 1))
            self._states.append(state)
            self._bound()
            return True
        idx = sq.dist(seqno, self._tail)
        if idx < 0:
            # reordered: older than the oldest we track.  Grow backwards unless the
            # state there was already trimmed (ack of ack) or it exceeds the bound.
            if self._trimmed_below is not None and sq.lt(seqno, self._trimmed_below):
                return False
            if len(self._states) - idx > self.max_packets:
                return False
            self._states[:0] = bytes((state,)) + bytes((CellState.NOT_RECEIVED,)) * (-idx - 1)
            self._tail = seqno
            return True
        if self._states[idx] != CellState.NOT_RECEIVED:
            return False
        self._states[idx] = state
        return True

    def is_received(self, seqno: int) -> bool | None:
        """True/False if tracked, None if outside the tracked range."""
        if self._tail is None:
            return None
        idx = sq.dist(seqno, self._tail)
        if idx < 0 or idx >= len(self._states):
            return None
        return self._states[idx] != CellState.NOT_RECEIVED

    def _bound(self) -> None:
        extra = len(self._states) - self.max_packets
        if extra > 0 and self._tail is not None:
            del self._states[:extra]
            self._tail = sq.add(self._tail, extra)
            self._trimmed_below = self._tail

    # ---- generating ------------------------------------------------------
    def cells(self, max_cells: int = MAX_CELLS, max_cover: int | None = None) -> list[Cell]:
        """Run-length cells from ``head`` down towards the tail (§11.4), newest first.

        At most ``max_cells`` cells and ``max_cover`` packets (None: all tracked):
        a truncated vector is still correct, it just says nothing about older packets.
        Runs are found with ``bytearray.rfind`` so a long run costs one C call.
        """
        out: list[Cell] = []
        st = self._states
        i = len(st) - 1
        lo = 0 if max_cover is None else max(0, len(st) - max_cover)
        others = {0: (1, 3), 1: (0, 3), 3: (0, 1)}
        while i >= lo and len(out) < max_cells:
            state = st[i]
            start = lo
            for o in others.get(state, (0, 1, 3)):
                j = st.rfind(o, lo, i)
                if j + 1 > start:
                    start = j + 1
            n = i - start + 1  # packets in this run
            while n > 0 and len(out) < max_cells:
                take = min(n, MAX_RUN + 1)
                out.append((state, take - 1))
                n -= take
            i = start - 1
        return out

    def nonce(self) -> int:
        """ECN nonce echo (§12.2): 0 - this stack sends no ECT(1) codepoints."""
        return 0

    # ---- acks of acks ------------------------------------------------------
    def record_sent(self, our_seqno: int, ackno: int) -> None:
        """We sent packet ``our_seqno`` carrying an Ack Vector starting at ``ackno``."""
        self._records[our_seqno] = ackno
        while len(self._records) > self.max_records:
            self._records.popitem(last=False)

    def on_acked(self, our_seqno: int) -> bool:
        """The peer acknowledged our packet ``our_seqno`` (an ack of our ack).

        If it carried an Ack Vector starting at A, the peer's sender has seen
        the state of every seqno <= A, so we forget it (§11.4.2; the new
        tail is A + 1).  Returns True if state was trimmed.
        """
        ackno = self._records.get(our_seqno)
        if ackno is None:
            return False
        # drop this record and every older one
        for key in list(self._records):
            del self._records[key]
            if key == our_seqno:
                break
        if self._tail is None:
            return False
        drop = sq.dist(ackno, self._tail) + 1
        if drop <= 0:
            return False
        self._trimmed_below = sq.add(ackno, 1)
        if drop >= len(self._states):
            self._tail = sq.add(ackno, 1)
            self._states = bytearray()
        else:
            del self._states[:drop]
            self._tail = sq.add(self._tail, drop)
        self.trimmed += 1
        return True

    @property
    def records(self) -> int:
        return len(self._records)

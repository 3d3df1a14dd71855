"""The flow manager's table (sans-IO): flows keyed by anything hashable, with idle expiry,
a hard cap with LRU eviction, and counters.  Time is always the caller's ``now``.

Design (measured, see ``docs/analysis.md``)
    One ``collections.OrderedDict`` maps key -> ``_Entry(value, last)``; the dict's order *is*
    the recency order (least recently used first).  Everything is O(1) and runs in C:

    * ``touch(key, now)``: one dict lookup, one attribute store, one ``move_to_end``
      (about 0.1 us; per packet on the hot path).  It returns the value, so the datapath needs
      a single call per packet (``None`` = unknown flow).
    * ``insert`` beyond ``max_flows`` pops the front (``popitem(last=False)``): the LRU flow.
    * ``expire(now)`` pops from the front while the front has been idle for at least
      ``idle_timeout``: since the front is the least recently touched, it stops at the first
      live flow, so a sweep costs O(expired + 1), however large the table.  Call it from a
      coarse timer (e.g. once a second); :meth:`next_expiry` says when it is next due.

    Rejected alternatives: a plain ``dict`` with pop + re-insert keeps insertion order too, but
    its deleted slots pile up at the front until the next resize, so finding the LRU entry
    degrades to a scan; storing only a last-seen time and sweeping the whole table makes
    expiry O(n) (10**6 flows) and LRU eviction O(n).

    Memory: about 200 bytes per flow for the table itself (dict slot, ordered-dict node and
    the two-slot entry), excluding the key and value objects the caller owns.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["FlowCounters", "FlowTable"]

K = TypeVar("K")
V = TypeVar("V")


class _Entry(Generic[V]):
    __slots__ = ("last", "value")

    def __init__(self, value: V, last: float) -> None:
        self.value = value
        self.last = last


@dataclass(frozen=True, slots=True)
class FlowCounters:
    """A snapshot of the table's counters."""

    created: int  # inserts of new keys
    expired: int  # removed by expire()
    evicted: int  # removed because the cap was reached (LRU)
    removed: int  # removed by pop() / clear()
    current: int  # flows in the table now
    peak: int  # most flows ever at once


class FlowTable(Generic[K, V]):
    """Flows keyed by ``K`` with values ``V``; see the module docstring for the design.

    ``idle_timeout``: a flow not touched for at least this many seconds is expired by
    :meth:`expire` (``None`` or ``inf``: never).  ``max_flows``: the hard cap; inserting a new
    key into a full table evicts the least recently used flow.
    """

    __slots__ = ("_d", "created", "evicted", "expired", "idle_timeout", "max_flows", "peak",
                 "removed")

    def __init__(self, *, idle_timeout: float | None = 30.0, max_flows: int = 1_000_000) -> None:
        if max_flows < 1:
            raise ValueError(f"max_flows must be >= 1, not {max_flows}")
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0, not {idle_timeout}")
        self.idle_timeout: float = float("inf") if idle_timeout is None else float(idle_timeout)
        self.max_flows = max_flows
        self._d: OrderedDict[K, _Entry[V]] = OrderedDict()
        self.created = 0
        self.expired = 0
        self.evicted = 0
        self.removed = 0
        self.peak = 0

    # ---------------------------------------------------------------- hot path
    def touch(self, key: K, now: float) -> V | None:
        """Mark ``key`` as seen at ``now`` (most recently used) and return its value, or
        ``None`` (and no change) if the key is not in the table."""
        e = self._d.get(key)
        if e is None:
            return None
        e.last = now
        self._d.move_to_end(key)
        return e.value

    def insert(self, key: K, value: V, now: float) -> tuple[K, V] | None:
        """Add (or replace) ``key`` as the most recently used flow.  If that makes the table
        exceed ``max_flows``, the least recently used flow is removed and returned (and
        counted as evicted); otherwise returns ``None``."""
        d = self._d
        e = d.get(key)
        if e is not None:
            e.value = value
            e.last = now
            d.move_to_end(key)
            return None
        evicted: tuple[K, V] | None = None
        if len(d) >= self.max_flows:
            k, old = d.popitem(last=False)
            self.evicted += 1
            evicted = (k, old.value)
        d[key] = _Entry(value, now)
        self.created += 1
        if len(d) > self.peak:
            self.peak = len(d)
        return evicted

    # ---------------------------------------------------------------- lookups
    def get(self, key: K, default: V | None = None) -> V | None:
        """The value of ``key`` without touching it."""
        e = self._d.get(key)
        return default if e is None else e.value

    def last_seen(self, key: K) -> float:
        """When ``key`` was last inserted or touched (KeyError if absent)."""
        return self._d[key].last

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently used first."""
        return iter(self._d)

    def items(self) -> Iterator[tuple[K, V]]:
        """(key, value), least recently used first."""
        for k, e in self._d.items():
            yield k, e.value

    def keys(self) -> list[K]:
        """A snapshot of the keys, least recently used first (one C-level copy)."""
        return list(self._d)

    def recent(self, since: float) -> list[tuple[K, V]]:
        """The flows touched (or inserted) at or after ``since``, most recent first; it
        walks back from the most recent end, so it costs O(result + 1)."""
        out: list[tuple[K, V]] = []
        for k, e in reversed(self._d.items()):  # no key hashing (FlowKey hashes in Python)
            if e.last < since:
                break
            out.append((k, e.value))
        return out

    def entry(self, key: K) -> tuple[V, float] | None:
        """(value, last seen) of ``key`` without touching it, or ``None``; one lookup."""
        e = self._d.get(key)
        return None if e is None else (e.value, e.last)

    def touch_last(self, key: K, now: float) -> float | None:
        """Like :meth:`touch`, but returns when ``key`` was last seen before (``None`` and
        no change if absent)."""
        e = self._d.get(key)
        if e is None:
            return None
        last = e.last
        e.last = now
        self._d.move_to_end(key)
        return last

    def oldest(self) -> tuple[K, V, float] | None:
        """The least recently used flow (key, value, last seen), or ``None`` if empty."""
        for k, e in self._d.items():
            return k, e.value, e.last
        return None

    # ---------------------------------------------------------------- removal
    def pop(self, key: K, default: V | None = None) -> V | None:
        """Remove ``key`` and return its value (``default`` if absent)."""
        e = self._d.pop(key, None)
        if e is None:
            return default
        self.removed += 1
        return e.value

    def clear(self) -> list[tuple[K, V]]:
        """Remove every flow (counted as removed) and return them, LRU first."""
        out = [(k, e.value) for k, e in self._d.items()]
        self.removed += len(out)
        self._d.clear()
        return out

    def expire(self, now: float,
               keep: Callable[[K, V], bool] | None = None) -> list[tuple[K, V]]:
        """Remove and return the flows idle for at least ``idle_timeout`` at ``now``, LRU
        first. ``keep(key, value)``, asked for each of them before it goes: True keeps
        the flow and touches it at ``now`` (the caller found activity the table had not
        been told of)."""
        d = self._d
        limit = now - self.idle_timeout
        out: list[tuple[K, V]] = []
        while d:
            k = next(iter(d))
            e = d[k]
            if e.last > limit:
                break
            if keep is not None and keep(k, e.value) and d.get(k) is e:
                e.last = now
                d.move_to_end(k)
                continue
            if d.get(k) is e:
                del d[k]
                out.append((k, e.value))
        self.expired += len(out)
        return out

    def next_expiry(self) -> float | None:
        """When the least recently used flow will be due for :meth:`expire` (``None`` if the
        table is empty or nothing ever expires)."""
        o = self.oldest()
        if o is None or self.idle_timeout == float("inf"):
            return None
        return o[2] + self.idle_timeout

    # ---------------------------------------------------------------- counters
    @property
    def current(self) -> int:
        return len(self._d)

    def counters(self) -> FlowCounters:
        return FlowCounters(self.created, self.expired, self.evicted, self.removed,
                            len(self._d), self.peak)

"""Flow table: idle expiry, LRU eviction at the cap, counters, and a stateful model check."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vstack.analysis.flowkey import FlowKey
from vstack.execution.flows import FlowCounters, FlowTable


def test_insert_touch_get_pop() -> None:
    t: FlowTable[str, int] = FlowTable(idle_timeout=10, max_flows=10)
    assert t.insert("a", 1, 0.0) is None
    assert t.touch("a", 1.0) == 1 and t.last_seen("a") == 1.0
    assert t.touch("zz", 1.0) is None and "zz" not in t
    assert t.get("a") == 1 and t.last_seen("a") == 1.0  # get does not touch
    assert t.get("zz", 7) == 7
    assert len(t) == 1 and list(t) == ["a"] and list(t.items()) == [("a", 1)]
    assert t.insert("a", 2, 3.0) is None  # replace: not a new flow
    assert t.get("a") == 2 and t.created == 1
    assert t.pop("a") == 2 and t.pop("a", -1) == -1 and len(t) == 0
    assert t.counters() == FlowCounters(created=1, expired=0, evicted=0, removed=1, current=0,
                                        peak=1)


def test_idle_expiry() -> None:
    t: FlowTable[str, int] = FlowTable(idle_timeout=5, max_flows=100)
    t.insert("a", 1, 0.0)
    t.insert("b", 2, 1.0)
    t.insert("c", 3, 2.0)
    t.touch("a", 4.0)  # a is now the most recent
    assert t.next_expiry() == 6.0  # b, last seen at 1
    assert t.expire(5.9) == []
    assert t.expire(6.0) == [("b", 2)]  # idle for exactly idle_timeout: expired
    assert t.expire(8.5) == [("c", 3)]
    assert list(t) == ["a"] and t.next_expiry() == 9.0
    assert t.expire(100) == [("a", 1)] and t.next_expiry() is None
    c = t.counters()
    assert (c.created, c.expired, c.current, c.peak) == (3, 3, 0, 3)


def test_no_idle_timeout_never_expires() -> None:
    t: FlowTable[int, int] = FlowTable(idle_timeout=None, max_flows=4)
    t.insert(1, 1, 0.0)
    assert t.expire(1e12) == [] and t.next_expiry() is None and len(t) == 1


def test_lru_eviction_at_cap() -> None:
    t: FlowTable[int, str] = FlowTable(idle_timeout=60, max_flows=3)
    for i in range(3):
        assert t.insert(i, f"v{i}", float(i)) is None
    t.touch(0, 10.0)  # order now 1, 2, 0
    assert t.insert(3, "v3", 11.0) == (1, "v1")
    assert t.insert(4, "v4", 12.0) == (2, "v2")
    assert list(t) == [0, 3, 4] and len(t) == 3
    assert t.insert(0, "new", 13.0) is None  # existing key at the cap: no eviction
    assert t.oldest() == (3, "v3", 11.0)
    c = t.counters()
    assert (c.created, c.evicted, c.current, c.peak) == (5, 2, 3, 3)


def test_clear_and_bad_config() -> None:
    t: FlowTable[int, int] = FlowTable(max_flows=5)
    t.insert(1, 1, 0)
    t.insert(2, 2, 0)
    assert t.clear() == [(1, 1), (2, 2)] and t.removed == 2 and len(t) == 0
    assert t.oldest() is None
    with pytest.raises(ValueError, match="max_flows"):
        FlowTable(max_flows=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        FlowTable(idle_timeout=0)


def test_flow_keys_work_as_keys() -> None:
    t: FlowTable[FlowKey, int] = FlowTable(max_flows=2)
    k = FlowKey(17, "10.0.0.1", 1, "10.0.0.2", 2)
    t.insert(k, 1, 0)
    assert t.touch(FlowKey.parse(str(k)), 1) == 1


def test_large_table_eviction_order() -> None:
    n = 20_000
    t: FlowTable[int, int] = FlowTable(idle_timeout=1000, max_flows=n)
    for i in range(n):
        t.insert(i, i, float(i))
    for i in range(0, n, 2):  # even keys become the most recent
        t.touch(i, float(n + i))
    evicted = [t.insert(n + j, 0, float(3 * n)) for j in range(n // 2)]
    assert [e[0] for e in evicted if e] == list(range(1, n, 2))  # all odd keys, oldest first
    assert t.evicted == n // 2 and t.peak == n


class FlowTableModel(RuleBasedStateMachine):
    """The table against a plain model: dict key -> (value, last), recency list."""

    CAP = 5
    IDLE = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.t: FlowTable[int, int] = FlowTable(idle_timeout=self.IDLE, max_flows=self.CAP)
        self.now = 0.0
        self.model: dict[int, tuple[int, float]] = {}
        self.order: list[int] = []  # LRU first
        self.created = self.expired = self.evicted = self.removed = self.peak = 0

    def _use(self, k: int) -> None:
        if k in self.order:
            self.order.remove(k)
        self.order.append(k)

    @rule(dt=st.floats(0, 6, allow_nan=False))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(k=st.integers(0, 9), v=st.integers())
    def insert(self, k: int, v: int) -> None:
        got = self.t.insert(k, v, self.now)
        want = None
        if k not in self.model:
            self.created += 1
            if len(self.model) >= self.CAP:
                old = self.order.pop(0)
                want = (old, self.model.pop(old)[0])
                self.evicted += 1
        self.model[k] = (v, self.now)
        self._use(k)
        self.peak = max(self.peak, len(self.model))
        assert got == want

    @rule(k=st.integers(0, 9))
    def touch(self, k: int) -> None:
        got = self.t.touch(k, self.now)
        if k in self.model:
            assert got == self.model[k][0]
            self.model[k] = (self.model[k][0], self.now)
            self._use(k)
        else:
            assert got is None

    @rule(k=st.integers(0, 9))
    def pop(self, k: int) -> None:
        got = self.t.pop(k)
        if k in self.model:
            assert got == self.model.pop(k)[0]
            self.order.remove(k)
            self.removed += 1
        else:
            assert got is None

    @rule()
    def expire(self) -> None:
        got = self.t.expire(self.now)
        want = [(k, self.model[k][0]) for k in self.order
                if self.now - self.model[k][1] >= self.IDLE]
        for k, _ in want:
            del self.model[k]
            self.order.remove(k)
        self.expired += len(want)
        assert got == want

    @invariant()
    def agrees(self) -> None:
        assert list(self.t) == self.order
        assert {k: self.t.get(k) for k in self.t} == {k: v for k, (v, _) in self.model.items()}
        assert self.t.counters() == FlowCounters(self.created, self.expired, self.evicted,
                                                 self.removed, len(self.model), self.peak)
        for k, (_, last) in self.model.items():
            assert self.t.last_seen(k) == last


TestFlowTableModel = FlowTableModel.TestCase
TestFlowTableModel.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


def test_memory_per_flow_is_small() -> None:
    """The table's own overhead per flow (dict slot, ordered-dict node, entry), measured with
    tracemalloc: well under the daemon's 1 KB-per-flow budget."""
    import gc
    import tracemalloc

    n = 50_000
    keys = [object() for _ in range(n)]
    gc.collect()
    tracemalloc.start()
    try:
        t: FlowTable[object, None] = FlowTable(max_flows=n)
        before = tracemalloc.get_traced_memory()[0]
        for k in keys:
            t.insert(k, None, 0.0)
        per_flow = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(t) == n
    assert per_flow < 300, per_flow


def test_recent_entry_touch_last() -> None:
    t: FlowTable[str, int] = FlowTable(idle_timeout=10, max_flows=10)
    for i, k in enumerate("abcd"):
        t.insert(k, i, float(i))
    assert t.recent(2.0) == [("d", 3), ("c", 2)]  # most recent first, stops at b
    assert t.recent(9.0) == [] and t.keys() == ["a", "b", "c", "d"]
    assert t.entry("b") == (1, 1.0) and t.entry("zz") is None
    assert t.touch_last("a", 5.0) == 0.0 and t.touch_last("zz", 5.0) is None
    assert t.keys() == ["b", "c", "d", "a"] and t.last_seen("a") == 5.0
    assert t.recent(4.0) == [("a", 0)]


def test_expire_asks_keep_before_a_flow_goes() -> None:
    t: FlowTable[str, int] = FlowTable(idle_timeout=5, max_flows=10)
    for i, k in enumerate("abc"):
        t.insert(k, i, float(i))
    asked: list[str] = []

    def keep(k: str, v: int) -> bool:
        asked.append(k)
        return k == "a"  # a had traffic the table was not told of

    assert t.expire(6.5, keep) == [("b", 1)]  # c (last 2.0) is not due yet
    assert asked == ["a", "b"] and t.keys() == ["c", "a"] and t.last_seen("a") == 6.5
    assert t.counters().expired == 1
    assert t.expire(11.5, keep) == [("c", 2)] and t.keys() == ["a"]  # a: kept again
    assert t.expire(100.0) == [("a", 0)] and len(t) == 0

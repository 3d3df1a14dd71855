"""The management message verifier: what is accepted, and why everything else is not."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vstack.analysis.flowkey import FlowKey
from vstack.management.auth import (
    REASONS,
    Accepted,
    NonceCache,
    Rejected,
    Verifier,
    canonical,
    compute_mac,
    sign,
)

KEY = b"k" * 32
NOW = 1_732_838_400.0
FLOW = "udp:10.0.0.1:5000->10.201.1.2:9000"


def _verifier(**kw) -> Verifier:
    return Verifier(KEY, max_skew_s=30, **kw)


def _reason(v: Verifier, data: bytes, now: float = NOW) -> str:
    out = v.verify(data, now)
    assert isinstance(out, Rejected), out
    return out.reason


def _resign(msg: dict, key: bytes = KEY) -> bytes:
    msg = dict(msg)
    msg["mac"] = compute_mac(msg, key)
    return json.dumps(msg).encode()


def test_congestion_accepted_as_event() -> None:
    v = _verifier()
    out = v.verify(sign({"type": "congestion", "link": "eth1", "level": 0.7}, KEY, NOW), NOW + 1)
    assert isinstance(out, Accepted)
    ev = out.event
    assert ev.type == "mgmt.congestion"
    assert ev.time == NOW + 1
    assert dict(ev.fields) == {"link": "eth1", "level": 0.7}
    assert ev.flow is None
    assert v.counters == {"accepted": 1, "malformed": 0, "unauthenticated": 0, "stale": 0,
                          "replayed": 0}


def test_switch_carries_flow_key() -> None:
    out = _verifier().verify(sign({"type": "switch", "flow": FLOW, "stack": "dccp"}, KEY, NOW),
                             NOW)
    assert isinstance(out, Accepted)
    assert out.event.type == "mgmt.switch"
    assert out.event.flow == FlowKey.parse(FLOW)
    assert out.event.fields["stack"] == "dccp"


def test_integer_level_becomes_float_and_unknown_types_pass_free_form() -> None:
    v = _verifier()
    out = v.verify(sign({"type": "congestion", "link": "x", "level": 1}, KEY, NOW), NOW)
    assert isinstance(out, Accepted) and isinstance(out.event.fields["level"], float)
    out = v.verify(sign({"type": "report", "a": 1, "b": "x", "c": None}, KEY, NOW), NOW)
    assert isinstance(out, Accepted)
    assert out.event.type == "mgmt.report" and dict(out.event.fields) == {"a": 1, "b": "x",
                                                                          "c": None}


def test_canonical_form_is_sorted_and_compact() -> None:
    assert canonical({"b": 1, "a": "x", "mac": "zz"}) == b'{"a":"x","b":1}'


def test_key_order_and_whitespace_in_the_datagram_do_not_matter() -> None:
    msg = json.loads(sign({"type": "congestion", "link": "l", "level": 0.5}, KEY, NOW))
    pretty = json.dumps(dict(reversed(list(msg.items()))), indent=2).encode()
    assert isinstance(_verifier().verify(pretty, NOW), Accepted)


def test_forged_mac_rejected() -> None:
    v = _verifier()
    msg = json.loads(sign({"type": "switch", "flow": FLOW, "stack": "dccp"}, KEY, NOW))
    msg["stack"] = "tcp"  # tampered after signing
    assert _reason(v, json.dumps(msg).encode()) == "unauthenticated"
    msg["mac"] = "0" * 64
    assert _reason(v, json.dumps(msg).encode()) == "unauthenticated"
    assert v.counters["unauthenticated"] == 2 and v.counters["accepted"] == 0


def test_wrong_key_rejected() -> None:
    v = _verifier()
    assert _reason(v, sign({"type": "congestion", "link": "l", "level": 1.0}, b"other-key",
                           NOW)) == "unauthenticated"


def test_missing_or_malformed_mac_is_unauthenticated() -> None:
    v = _verifier()
    msg = json.loads(sign({"type": "congestion", "link": "l", "level": 1.0}, KEY, NOW))
    del msg["mac"]
    assert _reason(v, json.dumps(msg).encode()) == "unauthenticated"
    msg["mac"] = 42
    assert _reason(v, json.dumps(msg).encode()) == "unauthenticated"
    assert v.counters["unauthenticated"] == 2


@pytest.mark.parametrize("offset", [31.0, -31.0, 3600.0])
def test_stale_rejected(offset: float) -> None:
    v = _verifier()
    data = sign({"type": "congestion", "link": "l", "level": 1.0}, KEY, NOW)
    assert _reason(v, data, NOW + offset) == "stale"
    assert v.counters["stale"] == 1


def test_skew_boundary_accepted() -> None:
    data = sign({"type": "congestion", "link": "l", "level": 1.0}, KEY, NOW)
    assert isinstance(_verifier().verify(data, NOW + 30.0), Accepted)


def test_replayed_nonce_rejected_even_with_new_ts() -> None:
    v = _verifier()
    nonce = "ab" * 16
    first = sign({"type": "congestion", "link": "l", "level": 1.0}, KEY, NOW, nonce=nonce)
    assert isinstance(v.verify(first, NOW), Accepted)
    assert _reason(v, first, NOW + 1) == "replayed"
    again = sign({"type": "congestion", "link": "l", "level": 0.1}, KEY, NOW + 5, nonce=nonce)
    assert _reason(v, again, NOW + 5) == "replayed"
    assert v.counters["replayed"] == 2 and v.counters["accepted"] == 1


def test_replay_after_window_is_stale_not_accepted() -> None:
    v = _verifier()
    data = sign({"type": "congestion", "link": "l", "level": 1.0}, KEY, NOW)
    assert isinstance(v.verify(data, NOW), Accepted)
    assert _reason(v, data, NOW + 31) == "stale"
    assert len(v.nonces) == 0  # expired out of the cache


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"\xff\xfe\x00",
        b"[1, 2, 3]",
        b'"a string"',
        b"null",
        b"{}",
        b'{"ts": 1, "nonce": "' + b"ab" * 16 + b'"}',  # no type
        b'{"type": "x", "nonce": "' + b"ab" * 16 + b'"}',  # no ts
        b'{"type": "x", "ts": 1}',  # no nonce
        b'{"type": "x", "ts": "1", "nonce": "' + b"ab" * 16 + b'"}',  # ts not a number
        b'{"type": "x", "ts": true, "nonce": "' + b"ab" * 16 + b'"}',
        b'{"type": "x", "ts": NaN, "nonce": "' + b"ab" * 16 + b'"}',
        b'{"type": "x", "ts": 1, "nonce": "abcd"}',  # nonce too short
        b'{"type": "x", "ts": 1, "nonce": "' + b"zz" * 16 + b'"}',  # nonce not hex
        b'{"type": "Bad Type", "ts": 1, "nonce": "' + b"ab" * 16 + b'"}',
        b'{"type": "x", "type": "y", "ts": 1, "nonce": "' + b"ab" * 16 + b'"}',  # dup key
        b'{"type": "x", "ts": 1, "nonce": "' + b"ab" * 16 + b'", "f": [1]}',  # not scalar
        b"[" * 5000,
    ],
)
def test_malformed_rejected(data: bytes) -> None:
    v = _verifier()
    assert _reason(v, data) == "malformed"
    assert v.counters["malformed"] == 1


def test_oversize_rejected() -> None:
    v = _verifier()
    data = sign({"type": "report", "blob": "x" * 1000, "more": "y" * 1000, "z": "w" * 1000,
                 "q": "v" * 1000, "r": "u" * 200}, KEY, NOW)
    assert len(data) > 4096
    assert _reason(v, data) == "malformed"


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "switch", "flow": "not a flow", "stack": "dccp"},
        {"type": "switch", "flow": FLOW},  # no stack
        {"type": "switch", "flow": FLOW, "stack": 3},
        {"type": "congestion", "link": "l", "level": "high"},
        {"type": "congestion", "level": 0.5},
    ],
)
def test_authenticated_but_bad_known_fields_are_malformed(msg: dict) -> None:
    v = _verifier()
    assert _reason(v, sign(msg, KEY, NOW)) == "malformed"


def test_all_reasons_counted_separately() -> None:
    v = _verifier()
    good = sign({"type": "congestion", "link": "l", "level": 1.0}, KEY, NOW)
    v.verify(good, NOW)
    v.verify(good, NOW)  # replayed
    v.verify(b"{", NOW)  # malformed
    v.verify(sign({"type": "x"}, b"wrong", NOW), NOW)  # unauthenticated
    v.verify(sign({"type": "x"}, KEY, NOW - 100), NOW)  # stale
    assert v.counters == {"accepted": 1, **dict.fromkeys(REASONS, 1)}


def test_nonce_cache_bounded_and_never_lets_a_replay_through() -> None:
    cache = NonceCache(window_s=30, max_entries=100)
    v = Verifier(KEY, max_skew_s=30, nonce_cache=cache)
    sent = []
    for i in range(1000):
        data = sign({"type": "report", "i": i}, KEY, NOW + i * 0.001)
        sent.append(data)
        assert isinstance(v.verify(data, NOW + i * 0.001), Accepted)
        assert len(cache) <= 100
    assert cache.evicted == 900
    # Every one of them replayed inside the window is refused: the evicted ones as stale.
    for data in sent:
        out = v.verify(data, NOW + 1)
        assert isinstance(out, Rejected) and out.reason in ("replayed", "stale")
    assert v.counters["accepted"] == 1000


def test_nonce_cache_expires_entries() -> None:
    cache = NonceCache(window_s=30, max_entries=10)
    for i in range(10):
        assert cache.check_and_add(f"{i:032x}", NOW, NOW) is None
    assert len(cache) == 10
    cache.expire(NOW + 31)
    assert len(cache) == 0
    assert cache.check_and_add("f" * 32, NOW + 31, NOW + 31) is None


def test_empty_key_refused() -> None:
    with pytest.raises(ValueError):
        Verifier(b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    v = _verifier()
    out = v.verify(data, NOW)
    assert isinstance(out, Rejected) and out.reason in REASONS


_json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_json = st.recursive(_json_scalar, lambda c: st.lists(c, max_size=4)
                     | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=10), _json, max_size=8))
def test_random_json_objects_never_raise_and_are_not_accepted(obj: dict) -> None:
    v = _verifier()
    out = v.verify(json.dumps(obj).encode(), NOW)
    assert isinstance(out, Rejected) and out.reason in REASONS


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(
    lambda k: k not in ("type", "ts", "nonce", "mac")),
    st.none() | st.booleans() | st.integers(-10**9, 10**9)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30), max_size=6))
def test_signed_free_form_round_trip(fields: dict) -> None:
    v = _verifier()
    out = v.verify(sign({"type": "report", **fields}, KEY, NOW), NOW)
    assert isinstance(out, Accepted)
    assert dict(out.event.fields) == fields

"""Authenticated management messages from the core network (sans-IO).

A message is one UDP datagram holding one JSON object::

    {"type": "congestion", "link": "eth1", "level": 0.7,
     "ts": 1732838400.25, "nonce": "9f1c...", "mac": "5d2a..."}

* ``type``: the message type; it becomes the event type ``mgmt.<type>``.
* ``ts``: the sender's clock, unix seconds (int or float).
* ``nonce``: a hex string of at least 16 random bytes (32 hex digits), new per message.
* ``mac``: hex HMAC-SHA256, keyed with the shared key from the config, over the
  *canonical JSON* of the message without ``mac``: keys sorted, no spaces
  (``separators=(",", ":")``), ASCII escapes (``ensure_ascii=True``), UTF-8.
* every other key is a field of the event; values are JSON scalars (string, number,
  boolean, null).

``Verifier.verify(datagram, now)`` checks, in this order: size and JSON shape
(``malformed``), the MAC (``unauthenticated``), the clock skew (``stale``), the nonce
(``replayed``), then the fields of known types (``malformed``). Only a message that
passes every check becomes an ``Event``; everything else is a ``Rejected`` with its
reason, and is counted. Nothing here touches a socket or a clock: ``now`` is passed in.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vstack.analysis.flowkey import FlowKey
from vstack.decision.events import MGMT_SCHEMA, Event

MAX_DATAGRAM = 4096  # bytes; a management message is small
MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64
MAX_FIELDS = 64
MAX_STRING = 1024

REASONS: tuple[str, ...] = ("malformed", "unauthenticated", "stale", "replayed")
RESERVED: frozenset[str] = frozenset({"type", "ts", "nonce", "mac"})

_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")
_FIELD_RE = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")


@dataclass(frozen=True, slots=True)
class Accepted:
    event: Event


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str  # one of REASONS
    detail: str = ""


Verdict = Accepted | Rejected


class _Malformed(Exception):
    pass


def as_key(key: bytes | str) -> bytes:
    """The shared key as bytes (a str from the config is taken as UTF-8)."""
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    if not raw:
        raise ValueError("management key is empty")
    return raw


def canonical(message: Mapping[str, Any]) -> bytes:
    """The bytes the MAC covers: the message without ``mac``, sorted keys, no spaces."""
    body = {k: v for k, v in message.items() if k != "mac"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("utf-8")


def compute_mac(message: Mapping[str, Any], key: bytes | str) -> str:
    return hmac.new(as_key(key), canonical(message), hashlib.sha256).hexdigest()


def sign(message: Mapping[str, Any], key: bytes | str, now: float,
         nonce: str | None = None) -> bytes:
    """A signed datagram for ``message`` (which holds ``type`` and the fields).
    ``ts`` is ``now``; ``nonce`` is fresh randomness unless given."""
    body = {k: v for k, v in message.items() if k != "mac"}
    body["ts"] = now
    body["nonce"] = nonce if nonce is not None else secrets.token_hex(MIN_NONCE_BYTES)
    body["mac"] = compute_mac(body, key)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("utf-8")


class NonceCache:
    """Nonces of accepted messages, remembered while a replay could still pass the skew
    check (until ``ts + window_s``). Memory is bounded by ``max_entries``: when full, the
    entry that expires first is evicted and its expiry becomes a floor; a message whose
    own expiry is not beyond that floor can no longer be proven fresh and is ``stale``.
    So eviction never lets a replay through."""

    def __init__(self, window_s: float = 30.0, max_entries: int = 65536) -> None:
        if window_s <= 0 or max_entries <= 0:
            raise ValueError("window_s and max_entries must be positive")
        self.window_s = window_s
        self.max_entries = max_entries
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self.floor = -math.inf
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._expiry)

    def expire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] < now:
            _, nonce = heapq.heappop(heap)
            self._expiry.pop(nonce, None)

    def check_and_add(self, nonce: str, ts: float, now: float) -> str | None:
        """None if ``nonce`` is new (and now remembered), else ``"replayed"`` or
        ``"stale"``."""
        self.expire(now)
        if nonce in self._expiry:
            return "replayed"
        expiry = ts + self.window_s
        if expiry <= self.floor:
            return "stale"
        while len(self._expiry) >= self.max_entries:
            old_expiry, old = heapq.heappop(self._heap)
            del self._expiry[old]
            self.floor = max(self.floor, old_expiry)
            self.evicted += 1
        self._expiry[nonce] = expiry
        heapq.heappush(self._heap, (expiry, nonce))
        return None


def _reject_constant(name: str) -> Any:
    raise _Malformed(f"non-standard JSON constant {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Malformed(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_number(v: object) -> bool:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _check_known_fields(etype: str, fields: dict[str, Any]) -> FlowKey | None:
    """Types and presence of the fields of known message types; the flow they name."""
    schema = MGMT_SCHEMA.get(etype)
    if schema is None:
        return None
    for name, tname in schema.items():
        if name not in fields:
            raise _Malformed(f"{etype} needs field {name!r}")
        v = fields[name]
        if tname == "str" and not isinstance(v, str):
            raise _Malformed(f"field {name!r} must be a string")
        if tname == "float":
            if not _is_number(v):
                raise _Malformed(f"field {name!r} must be a number")
            fields[name] = float(v)
        if tname == "int" and (not isinstance(v, int) or isinstance(v, bool)):
            raise _Malformed(f"field {name!r} must be an integer")
    if "flow" in schema:
        try:
            return FlowKey.parse(fields["flow"])
        except ValueError as e:
            raise _Malformed(str(e)) from None
    return None


class Verifier:
    """Turns datagrams into ``Accepted(Event)`` or ``Rejected(reason)``; counts both.

    ``counters`` holds ``accepted`` and one entry per reason in ``REASONS``."""

    def __init__(self, key: bytes | str, max_skew_s: float = 30.0,
                 nonce_cache: NonceCache | None = None, max_size: int = MAX_DATAGRAM) -> None:
        self._key = as_key(key)
        if max_skew_s <= 0:
            raise ValueError("max_skew_s must be positive")
        self.max_skew_s = max_skew_s
        self.nonces = nonce_cache if nonce_cache is not None else NonceCache(max_skew_s)
        self.max_size = max_size
        self.counters: dict[str, int] = {"accepted": 0, **dict.fromkeys(REASONS, 0)}

    def verify(self, datagram: bytes, now: float) -> Verdict:
        self.nonces.expire(now)
        verdict = self._verify(datagram, now)
        if isinstance(verdict, Accepted):
            self.counters["accepted"] += 1
        else:
            self.counters[verdict.reason] += 1
        return verdict

    def _verify(self, datagram: bytes, now: float) -> Verdict:
        try:
            msg = self._parse(datagram)
        except _Malformed as e:
            return Rejected("malformed", str(e))
        mac = msg.get("mac")
        if not isinstance(mac, str) or len(mac) != 64 or not _HEX_RE.match(mac):
            return Rejected("unauthenticated", "missing or badly formed mac")
        try:
            expected = compute_mac(msg, self._key)
        except (TypeError, ValueError) as e:  # cannot happen after _parse; be safe
            return Rejected("malformed", str(e))
        if not hmac.compare_digest(mac, expected):
            return Rejected("unauthenticated", "mac does not match")
        ts = float(msg["ts"])
        if abs(now - ts) > self.max_skew_s:
            return Rejected("stale", f"ts is {now - ts:+.1f}s off (max {self.max_skew_s:g}s)")
        seen = self.nonces.check_and_add(msg["nonce"], ts, now)
        if seen is not None:
            return Rejected(seen, "nonce already seen" if seen == "replayed"
                            else "older than the nonces the cache still remembers")
        etype = "mgmt." + msg["type"]
        fields = {k: v for k, v in msg.items() if k not in RESERVED}
        try:
            flow = _check_known_fields(etype, fields)
        except _Malformed as e:
            return Rejected("malformed", str(e))
        return Accepted(Event(type=etype, time=now, fields=fields, flow=flow))

    def _parse(self, datagram: bytes) -> dict[str, Any]:
        if not isinstance(datagram, bytes | bytearray | memoryview):
            raise _Malformed("not bytes")
        if len(datagram) > self.max_size:
            raise _Malformed(f"{len(datagram)} bytes, more than {self.max_size}")
        try:
            text = bytes(datagram).decode("utf-8")
            msg = json.loads(text, object_pairs_hook=_no_duplicates,
                             parse_constant=_reject_constant)
        except _Malformed:
            raise
        except (ValueError, RecursionError) as e:
            raise _Malformed(f"not JSON: {e}") from None
        if not isinstance(msg, dict):
            raise _Malformed("not a JSON object")
        for name in ("type", "ts", "nonce"):
            if name not in msg:
                raise _Malformed(f"missing field {name!r}")
        if not isinstance(msg["type"], str) or not _TYPE_RE.match(msg["type"]):
            raise _Malformed("type must match [a-z][a-z0-9_]*")
        if not _is_number(msg["ts"]):
            raise _Malformed("ts must be a number")
        nonce = msg["nonce"]
        if (not isinstance(nonce, str) or len(nonce) % 2
                or not MIN_NONCE_BYTES * 2 <= len(nonce) <= MAX_NONCE_BYTES * 2
                or not _HEX_RE.match(nonce)):
            raise _Malformed(f"nonce must be {MIN_NONCE_BYTES}..{MAX_NONCE_BYTES} bytes "
                             "as lowercase hex")
        if len(msg) > MAX_FIELDS:
            raise _Malformed(f"more than {MAX_FIELDS} fields")
        for k, v in msg.items():
            if k in RESERVED:
                continue
            if not _FIELD_RE.match(k):
                raise _Malformed(f"bad field name {k[:40]!r}")
            if isinstance(v, str):
                if len(v) > MAX_STRING:
                    raise _Malformed(f"field {k!r} longer than {MAX_STRING}")
            elif not (v is None or isinstance(v, bool) or _is_number(v)):
                raise _Malformed(f"field {k!r} must be a string, number, boolean or null")
        return msg

"""Identifiers: time-ordered event ids (UUIDv7) and deterministic idempotency keys (UUIDv5).

UUIDv7 ids sort by creation time, so B-tree indexes on them stay append-mostly and a log of ids
reads in order. Deterministic ids let a retried business operation derive the same key again
without storing it first.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from typing import Final

__all__ = ["HARBOUR_NAMESPACE", "DeterministicIds", "deterministic_id", "new_id", "uuid7_unix_ms"]

# Fixed forever: every deterministic id ever issued depends on it.
HARBOUR_NAMESPACE: Final = uuid.UUID("5f3c2a8e-6d1b-5c47-9a0e-4b8f7d2e1c93")

_RAND_BITS: Final = 74  # 12 bits rand_a + 62 bits rand_b (RFC 9562, section 5.7)
_RAND_LIMIT: Final = 1 << _RAND_BITS
_TS_LIMIT: Final = 1 << 48


class _V7State:
    """Last (millisecond, random) pair issued, so ids stay monotonic within the process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_ms = -1
        self.last_rand = 0

    def reset(self) -> None:
        # A forked child must not continue the parent's sequence: both would issue the same ids.
        self.lock = threading.Lock()
        self.last_ms = -1
        self.last_rand = 0


_state = _V7State()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_state.reset)


def new_id() -> uuid.UUID:
    """Return a new UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then 74 random bits.

    Ids from one process are strictly increasing, even within one millisecond or when the wall
    clock steps back (RFC 9562 "monotonic random", method 2): the random part of the previous id
    is incremented by a random amount, keeping ids unguessable.

    Returns:
        A version-7, RFC-variant ``uuid.UUID``.
    """
    with _state.lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms > _state.last_ms:
            ms, rand = now_ms, _random_bits(_RAND_BITS)
        else:
            ms, rand = _state.last_ms, _state.last_rand + 1 + _random_bits(32)
            if rand >= _RAND_LIMIT:
                # Counter exhausted within one millisecond: borrow the next millisecond.
                ms, rand = ms + 1, _random_bits(_RAND_BITS)
        _state.last_ms, _state.last_rand = ms, rand
    return _assemble_v7(ms, rand)


def uuid7_unix_ms(value: uuid.UUID) -> int:
    """Return the Unix timestamp in milliseconds embedded in a UUIDv7.

    Args:
        value: A version-7 UUID.

    Returns:
        Milliseconds since 1970-01-01T00:00:00Z.

    Raises:
        ValueError: ``value`` is not a version-7 UUID.
    """
    if value.version != 7:
        raise ValueError(f"not a UUIDv7: {value}")
    return value.int >> 80


def deterministic_id(namespace: str, *parts: str) -> uuid.UUID:
    """Derive a stable UUIDv5 from business identifiers, e.g. an idempotency key.

    The name hashed is the JSON array ``[namespace, *parts]``, so part boundaries can never be
    confused (``("a|b", "c")`` and ``("a", "b|c")`` give different ids). This encoding and
    :data:`HARBOUR_NAMESPACE` must never change: stored keys would stop matching.

    Args:
        namespace: What the id is for, e.g. ``"ledger.posting"``; keeps different uses apart.
        *parts: The business ids, as strings, e.g. a bank's instruction id.

    Returns:
        The same ``uuid.UUID`` for the same arguments, in every process and release.

    Raises:
        TypeError: ``namespace`` or a part is not a ``str``.
        ValueError: ``namespace`` is empty.
    """
    if not all(isinstance(item, str) for item in (namespace, *parts)):
        raise TypeError("deterministic_id takes str arguments only; convert ids with str()")
    if not namespace:
        raise ValueError("deterministic_id needs a non-empty namespace")
    name = json.dumps([namespace, *parts], ensure_ascii=True, separators=(",", ":"))
    return uuid.uuid5(HARBOUR_NAMESPACE, name)


class DeterministicIds:
    """:func:`deterministic_id` for many ids that share their leading arguments, as text.

    ``DeterministicIds(ns, *fixed).text(*rest)`` is ``str(deterministic_id(ns, *fixed, *rest))``
    at about a fifth of the cost: the hashed name's fixed prefix is encoded once and the UUID is
    formatted straight from the digest. The ledger writer derives one per answer it sends.
    """

    __slots__ = ("_prefix",)

    def __init__(self, namespace: str, *fixed: str) -> None:
        str(deterministic_id(namespace, *fixed))  # the same argument checks
        head = json.dumps([namespace, *fixed], ensure_ascii=True, separators=(",", ":"))
        self._prefix = HARBOUR_NAMESPACE.bytes + head[:-1].encode("ascii")

    def text(self, *parts: str) -> str:
        if not all(isinstance(part, str) for part in parts):
            raise TypeError("DeterministicIds.text takes str arguments only")
        # json.dumps(ensure_ascii=True) encodes each str with this same function.
        tail = "".join("," + _json_str(part) for part in parts) + "]"
        h = hashlib.sha1(self._prefix + tail.encode("ascii")).hexdigest()
        # As uuid.uuid5: the version nibble becomes 5 and the variant's top bits 10 (RFC 9562).
        return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


_json_str = json.encoder.encode_basestring_ascii
_VARIANT: Final = {f"{n:x}": f"{0x8 | (n & 0x3):x}" for n in range(16)}


def _random_bits(bits: int) -> int:
    return int.from_bytes(os.urandom((bits + 7) // 8), "big") >> (-bits % 8)


def _assemble_v7(unix_ms: int, rand: int) -> uuid.UUID:
    if not 0 <= unix_ms < _TS_LIMIT:
        raise ValueError(f"timestamp out of UUIDv7 range: {unix_ms}")
    rand_a, rand_b = rand >> 62, rand & ((1 << 62) - 1)
    value = (unix_ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return uuid.UUID(int=value)

"""A byte string that does not show itself: private keys travel in one of these."""

from __future__ import annotations

import hmac
from typing import final


@final
class Secret:
    """Bytes whose ``repr``/``str``/``format`` give only their length.

    A private key must never reach a log, a job ad, an exception message or a traceback, so it
    is wrapped as soon as it exists and unwrapped (:meth:`reveal`) only where it is written into
    the guest.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"Secret wraps bytes, not {type(value).__name__}")
        self._value = value

    def reveal(self) -> bytes:
        """The wrapped bytes; call only to hand them to the place they belong."""
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"<secret: {len(self._value)} bytes>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)

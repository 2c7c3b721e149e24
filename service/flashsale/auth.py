"""API keys and their two roles. Keys are compared as SHA-256 digests in constant time,
against every configured key, and never logged."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

from .errors import ApiError

Role = Literal["ops", "storefront"]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class KeyRing:
    entries: tuple[tuple[bytes, Role], ...]

    @classmethod
    def build(cls, ops: tuple[str, ...], storefront: tuple[str, ...]) -> KeyRing:
        return cls(tuple((_digest(k), "ops") for k in ops) + tuple((_digest(k), "storefront") for k in storefront))

    def role(self, authorization: str | None) -> Role:
        if not authorization or not authorization.startswith("Bearer "):
            raise ApiError("unauthorized", "send Authorization: Bearer <api key>")
        presented = _digest(authorization[7:].strip())
        found: Role | None = None
        for digest, role in self.entries:  # no early exit: time does not depend on which key matched
            if hmac.compare_digest(digest, presented):
                found = found or role
        if found is None:
            raise ApiError("unauthorized", "unknown API key")
        return found

    def require(self, authorization: str | None, role: Role) -> Role:
        found = self.role(authorization)
        if role == "ops" and found != "ops":
            raise ApiError("forbidden", "this endpoint needs an ops key")
        return found

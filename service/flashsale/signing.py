"""The Standard Webhooks signature every delivery carries.

A secret is ``whsec_`` and 32 random bytes in base64; the signature is ``v1,`` and the base64
HMAC-SHA256, keyed with those bytes, of ``{webhook-id}.{webhook-timestamp}.{body}``. After a
rotation the previous secret signs too, for as long as ops asked, so that a receiver can move to
the new one without refusing a delivery: the header then holds both signatures.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from datetime import datetime

import asyncpg

SECRET_PREFIX = "whsec_"  # noqa: S105  (the form of a secret, not one)


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, payload: str) -> str:
    """One ``v1,<base64>`` signature of a delivery (Standard Webhooks)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.{payload}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(signing: list[str], msg_id: str, timestamp: int, payload: str) -> dict[str, str]:
    """The Standard Webhooks headers of one delivery, signed with every secret in ``signing``."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, msg_id, timestamp, payload) for s in signing),
        "content-type": "application/json",
    }


def signing_secrets(row: asyncpg.Record, now: datetime) -> list[str]:
    """The secrets a delivery is signed with now: the current one, and the previous until its time."""
    previous = row["previous_secret"] if row["previous_until"] and row["previous_until"] > now else None
    return [row["secret"], *([previous] if previous else [])]

"""HTTP helpers every route module shares: the services an app holds, request bodies, keys,
path and query parameters, JSON responses. Route modules import from here, never from each
other, so that ``api`` can gather their routes without an import circle."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from .auth import KeyRing, Role
from .carts import Carts
from .connection import Client
from .errors import ApiError
from .polls import Polls
from .reservations import Reservations
from .sales import Sales
from .schemas import DIGITS, SLUG, encoder
from .settings import Settings
from .waiting import Room

T = TypeVar("T")
MAX_BODY = 16 * 1024
USER_ID = re.compile(r"^[^\x00-\x1f\x7f]{1,128}(?!\n)$")
FIELD = re.compile(r"at `\$\.([A-Za-z_]+)")


@dataclass(frozen=True)
class Services:
    settings: Settings
    redis: Client
    pool: asyncpg.Pool
    keyring: KeyRing
    sales: Sales
    reservations: Reservations
    room: Room
    polls: Polls
    carts: Carts


def services(request: Request) -> Services:
    s: Services = request.app.state.services
    return s


def json(body: msgspec.Struct | dict[str, Any], status: int = 200) -> Response:
    return Response(encoder.encode(body), status, media_type="application/json")


def decode(raw: bytes, type_: type[T]) -> T:
    """``raw`` decoded and validated as ``type_``: 400 for bytes that are not JSON, 422 naming the
    fields for JSON that breaks the schema."""
    try:
        return msgspec.json.decode(raw, type=type_)
    except msgspec.ValidationError as exc:
        if "got `float`" in str(exc):  # 2499.0 is an integer to JSON Schema: take it as one
            try:
                return msgspec.convert(_whole(msgspec.json.decode(raw)), type_)
            except msgspec.ValidationError as again:
                exc = again
        raise ApiError("invalid_request", str(exc), fields=FIELD.findall(str(exc))) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ApiError("invalid_request", f"body is not valid JSON: {exc}", status=400) from None


def _whole(value: Any) -> Any:
    """``value`` with every float that is a whole number made an int (2499.0 -> 2499)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    return value


def too_long(content_length: str) -> bool:
    """Whether a declared Content-Length is over 16 KiB (or too long a number to be sane)."""
    return (
        content_length.isascii()
        and content_length.isdigit()
        and (len(content_length) > 15 or int(content_length) > MAX_BODY)
    )


class Disconnected(Exception):
    """The client went away before its body arrived: there is no one left to answer."""


async def read(receive: Receive, content_length: str = "") -> bytes:
    """A request body straight from the ASGI ``receive``, at most 16 KiB (400 past that)."""
    if too_long(content_length):
        raise ApiError("invalid_request", "body is over 16 KiB", status=400)
    raw = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        chunk: bytes = message.get("body", b"")
        raw += chunk
        if len(raw) > MAX_BODY:
            raise ApiError("invalid_request", "body is over 16 KiB", status=400)
        if not message.get("more_body", False):
            return raw


async def body(request: Request, type_: type[T]) -> T:
    """The request body, at most 16 KiB, decoded and validated as ``type_``."""
    return decode(await read(request.receive, request.headers.get("content-length", "")), type_)


def authorize(request: Request, role: Role) -> Services:
    svc = services(request)
    svc.keyring.require(request.headers.get("authorization"), role)
    return svc


def slug(request: Request, name: str) -> str:
    return valid_slug(request.path_params[name], name)


def valid_slug(value: str, name: str) -> str:
    """``value`` of path parameter ``name``; 404 for one no sale or item can have."""
    if not SLUG.match(value):
        raise ApiError("not_found", f"no {name.removesuffix('_id')} {value!r}")
    return value


def user_id(request: Request) -> str:
    return valid_user_id(request.query_params.get("user_id", ""))


IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}(?!\n)$")


def valid_idempotency_key(value: str | None) -> str | None:
    """The Idempotency-Key header's value (None: not sent); 422 unless 1-128 printable ASCII."""
    if value is not None and not IDEMPOTENCY_KEY.match(value):
        raise ApiError(
            "invalid_request", "Idempotency-Key must be 1-128 printable ASCII characters", fields=["Idempotency-Key"]
        )
    return value


def valid_user_id(value: str) -> str:
    """The ``user_id`` query parameter's value; 422 if it is missing or no user id."""
    if not USER_ID.match(value):
        raise ApiError("invalid_request", "user_id query parameter is required (1-128 characters)", fields=["user_id"])
    return value


def limit(request: Request, default: int, maximum: int) -> int:
    """The ``limit`` query parameter: a whole number from 1 to ``maximum``, ``default`` if left out."""
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not DIGITS.fullmatch(raw) or not 1 <= int(raw) <= maximum:
        raise ApiError("invalid_request", f"limit must be a whole number from 1 to {maximum}", fields=["limit"])
    return int(raw)

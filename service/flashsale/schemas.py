"""Request and response bodies as typed msgspec structs: validation, encoding and the
OpenAPI schemas all come from these one set of types."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct, field

Slug = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="letters, digits, _ and -, at most 64")]
UserId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
Name = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
Quantity = Annotated[int, Meta(ge=1, le=1_000_000)]
Instant = Annotated[datetime, Meta(tz=True, description="ISO 8601 with offset")]
ReservationStatus = Literal["held", "confirmed", "released", "expired"]
SaleStatus = Literal["scheduled", "live", "paused", "ended", "sold_out"]


class ItemIn(Struct, forbid_unknown_fields=True):
    sku: Slug
    name: Name
    price_cents: Annotated[int, Meta(ge=0, le=10**12)]
    stock: Annotated[int, Meta(ge=0, le=10**9)]
    per_user_limit: Annotated[int, Meta(ge=1, le=1_000_000)] = 1


class SaleIn(Struct, forbid_unknown_fields=True):
    id: Slug
    name: Name
    starts_at: Instant
    ends_at: Instant
    items: Annotated[list[ItemIn], Meta(min_length=1, max_length=100)]
    hold_seconds: Annotated[int, Meta(ge=1, le=86_400)] = 600


class ReserveIn(Struct, forbid_unknown_fields=True):
    user_id: UserId
    sku: Slug
    quantity: Quantity = 1


class ConfirmIn(Struct, forbid_unknown_fields=True):
    user_id: UserId
    payment_ref: Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]


class CancelIn(Struct, forbid_unknown_fields=True):
    user_id: UserId


class Reservation(Struct, omit_defaults=True):
    reservation_id: str
    sale_id: str
    sku: str
    user_id: str
    quantity: int
    status: ReservationStatus
    created_at: datetime
    expires_at: datetime
    updated_at: datetime | None = None
    payment_ref: str | None = None


class ItemOut(Struct, omit_defaults=True):
    sku: str
    name: str
    price_cents: int
    stock_total: int
    available: int
    held: int
    per_user_limit: int
    next_release_at: datetime | None = None


class SaleOut(Struct):
    id: str
    name: str
    status: SaleStatus
    starts_at: datetime
    ends_at: datetime
    hold_seconds: int
    items: list[ItemOut]


class ErrorBody(Struct, omit_defaults=True):
    code: str
    message: str
    retry_after: int | None = None
    available: int | None = None
    starts_at: datetime | None = None
    fields: list[str] = field(default_factory=list)


class Error(Struct):
    error: ErrorBody


class Health(Struct):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = field(default_factory=dict)


encoder = msgspec.json.Encoder()

"""Request and response bodies as typed msgspec structs: validation, encoding and the
OpenAPI schemas all come from these one set of types."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

# `(?!\n)$`, not a bare `$`: in Python `$` also matches before a final newline ("id\n").
SLUG_PATTERN = r"^[A-Za-z0-9_-]{1,64}(?!\n)$"
SLUG = re.compile(SLUG_PATTERN)
DIGITS = re.compile(r"[0-9]{1,15}")  # a whole number from a query string or header, ASCII only
MAX_STOCK = 10**9  # Redis Lua's cjson writes integers past 14 digits as floats: stay well below
# Ids of webhooks and their events in a path: the route checks them (re.fullmatch, so no trailing
# newline passes) and the OpenAPI spec declares them, from these one spellings.
WEBHOOK_ID_PATTERN = r"^wh_[A-Za-z0-9_-]{22}$"
EVENT_ID_PATTERN = r"^evt_[A-Za-z0-9_.~-]{1,200}$"
Slug = Annotated[str, Meta(pattern=SLUG_PATTERN, description="letters, digits, _ and -, at most 64")]
UserId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+(?!\n)$")]
Name = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+(?!\n)$")]
Quantity = Annotated[int, Meta(ge=1, le=1_000_000)]
Instant = Annotated[datetime, Meta(tz=True, description="ISO 8601 with offset")]
HoldSeconds = Annotated[int, Meta(ge=1, le=86_400)]
ReservationStatus = Literal["held", "confirmed", "released", "expired"]
SaleStatus = Literal["scheduled", "live", "paused", "ended", "sold_out"]


class ItemIn(Struct, forbid_unknown_fields=True):
    sku: Slug
    name: Name
    price_cents: Annotated[int, Meta(ge=0, le=10**12)]
    stock: Annotated[int, Meta(ge=0, le=MAX_STOCK)]
    per_user_limit: Annotated[int, Meta(ge=1, le=1_000_000)] = 1
    shards: Annotated[
        int,
        Meta(ge=1, le=64, description="hash slots the stock is spread over (a hot item on a cluster: one per master)"),
    ] = 1
    per_ip_limit: (
        Annotated[int, Meta(ge=1, le=1_000_000, description="units held + confirmed per client ip")] | None
    ) = None
    per_device_limit: (
        Annotated[int, Meta(ge=1, le=1_000_000, description="units held + confirmed per client device")] | None
    ) = None


Items = Annotated[list[ItemIn], Meta(min_length=1, max_length=100)]
AdmitPerSecond = Annotated[int, Meta(ge=1, le=100_000, description="admissions a second, at most")]


class WaitingRoom(Struct, forbid_unknown_fields=True):
    """A queue in front of reserve: a reservation then needs the Admission-Token it hands out."""

    admit_per_s: AdmitPerSecond
    admission_ttl_s: Annotated[int, Meta(ge=10, le=86_400, description="how long a token is good for")] = 120
    abandon_after_s: Annotated[int, Meta(ge=5, le=3_600, description="a ticket not polled this long expires")] = 30


class SaleIn(Struct, forbid_unknown_fields=True):
    id: Slug
    name: Name
    starts_at: Instant
    ends_at: Instant
    items: Items
    hold_seconds: HoldSeconds = 600
    waiting_room: WaitingRoom | None = None
    ip_rate_per_s: Annotated[int, Meta(ge=1, le=1_000_000, description="attempts per client ip per second")] | None = (
        None
    )
    max_extensions: Annotated[int, Meta(ge=0, le=100, description="times one hold may be extended")] = 2
    max_extension_seconds: Annotated[
        int, Meta(ge=0, le=86_400, description="seconds one hold may be extended in all")
    ] = 300


class SaleDoc(SaleIn, forbid_unknown_fields=True, omit_defaults=True):
    """A sale as stored (Redis's sale hash, its events, Postgres): what ops sent, and the hash
    tags of its extra slots, chosen once when it was created (``shards.py``) so that every
    reservation id made in one of them (``S~x.<random>``) finds its keys again after a recover."""

    slots: list[str] = field(default_factory=list)


class SalePatch(Struct, forbid_unknown_fields=True):
    """A change to a sale that has not started: fields left out keep their value, ``items``
    replaces the whole list (a kept sku's ``stock`` becomes its new stock_total)."""

    name: Name | UnsetType = UNSET
    starts_at: Instant | UnsetType = UNSET
    ends_at: Instant | UnsetType = UNSET
    hold_seconds: HoldSeconds | UnsetType = UNSET
    items: Items | UnsetType = UNSET


class QueueIn(Struct, forbid_unknown_fields=True):
    user_id: UserId
    client: Client | None = None


class QueuePatch(Struct, forbid_unknown_fields=True):
    """A live change to a sale's waiting room (ops)."""

    admit_per_s: AdmitPerSecond


QueueStatus = Literal["waiting", "admitted", "closed", "expired"]
Reason = Literal["sold_out", "sale_ended", "closed_by_ops"]  # why a waiting room closed


class Ticket(Struct, omit_defaults=True):
    """A place in a sale's waiting room, as its user polls it."""

    ticket: str
    user_id: str
    status: QueueStatus
    poll_after_s: int  # when to ask again (spread: a crowd's polls do not come all at once)
    position: int | None = None  # 1 = next in line; while waiting
    estimated_wait_s: int | None = None  # while waiting
    admission_token: str | None = None  # when admitted: send it as the Admission-Token header
    expires_at: datetime | None = None  # when admitted: the token's end
    reason: Reason | None = None  # when closed


class QueueProgress(Struct, omit_defaults=True):
    """A sale's waiting room as ops watch it: counts since it opened, and now."""

    admit_per_s: int
    waiting: int  # tickets in line now
    joined: int
    admitted: int
    expired: int  # not polled for abandon_after_s
    closed_told: int  # waiting tickets told the queue closed
    estimated_wait_s: int  # for one joining now: waiting / admit_per_s
    closed: Reason | None = None


class RestockIn(Struct, forbid_unknown_fields=True):
    quantity: Quantity


class Client(Struct, forbid_unknown_fields=True):
    """The end user's address and device, as the storefront saw them."""

    ip: Annotated[str, Meta(min_length=2, max_length=64)] | None = None
    device: Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+(?!\n)$")] | None = None


class ReserveIn(Struct, forbid_unknown_fields=True):
    user_id: UserId
    sku: Slug
    quantity: Quantity = 1
    client: Client | None = None


class ExtendIn(Struct, forbid_unknown_fields=True):
    user_id: UserId
    seconds: Annotated[int, Meta(ge=1, le=86_400)]


class ConfirmIn(Struct, forbid_unknown_fields=True):
    user_id: UserId
    payment_ref: Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+(?!\n)$")]


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


class CartLine(Struct, forbid_unknown_fields=True):
    sku: Slug
    quantity: Quantity = 1


class CartIn(Struct, forbid_unknown_fields=True):
    user_id: UserId
    lines: Annotated[list[CartLine], Meta(min_length=1, max_length=20)]
    client: Client | None = None


class Cart(Struct):
    """A cart's lines, each an ordinary reservation, all held together (or none)."""

    cart_id: str
    sale_id: str
    user_id: str
    expires_at: datetime
    reservations: list[Reservation]


class ReservationList(Struct):
    """A user's reservations in a sale, newest first."""

    reservations: list[Reservation]


class ItemOut(Struct, omit_defaults=True):
    sku: str
    name: str
    price_cents: int
    stock_total: int
    available: int
    held: int
    per_user_limit: int
    next_release_at: datetime | None = None
    shards: int = 1


class SaleOut(Struct, omit_defaults=True):
    id: str
    name: str
    status: SaleStatus
    starts_at: datetime
    ends_at: datetime
    hold_seconds: int
    max_extensions: int
    max_extension_seconds: int
    items: list[ItemOut]
    waiting_room: WaitingRoom | None = None


class SalePage(Struct):
    """One page of sales, newest first; ``next_cursor`` is null on the last page."""

    sales: list[SaleOut]
    next_cursor: str | None


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


class ItemProgress(Struct):
    """One item of a sale in progress. Stock numbers are units; ``reservations`` (successful
    reserve calls), ``attempts`` and ``rejected`` count requests."""

    sku: str
    name: str
    stock_total: int
    available: int
    held: int
    confirmed: int
    released: int  # cancelled + expired
    cancelled: int
    expired: int
    reservations: int
    attempts: int
    rejected: dict[str, int]  # error code -> attempts refused with it
    drift: int = 0  # available + held + confirmed - stock_total: 0 unless a unit was made or lost


class Rates(Struct, omit_defaults=True):
    """Per second over ``window_s``, the span actually measured: shorter than asked while this
    process has watched the sale for less than the window, 0 (and every rate 0) at first."""

    window_s: float
    reservations: float
    attempts: float
    rejected: dict[str, float]
    queue: dict[str, float] = field(default_factory=dict)  # the waiting room's joined, admitted, expired, closed_told


class RateWindows(Struct):
    last_1s: Rates = field(name="1s")
    last_10s: Rates = field(name="10s")
    last_60s: Rates = field(name="60s")


class SaleProgress(Struct):
    """A sale being watched: its items, how far Postgres is behind Redis, and its rates."""

    sale_id: str
    status: SaleStatus
    at: datetime  # Redis time of the snapshot
    items: list[ItemProgress]
    persisted: int | None  # reservation rows in Postgres; null when Postgres did not answer
    queue_backlog: int  # events not yet in Postgres
    oldest_unpersisted_age_s: float
    dead_lettered: int
    workers_alive: int  # persister processes with a live heartbeat
    rates: RateWindows
    # What the live audit finds wrong, one line each with the numbers: an item whose units do
    # not add up (now), and Redis against Postgres (at the last audit with the queue empty).
    drift: list[str] = msgspec.field(default_factory=list)
    queue: QueueProgress | None = None  # the sale's waiting room, if it has one
    webhooks: WebhookCounts | None = None  # its webhook deliveries not yet done; null when Postgres did not answer
    webhooks_backlog: int = 0  # its events the webhooks' dispatcher has not taken yet (a stuck one shows here)


WebhookEvent = Literal[
    "reservation.created",
    "reservation.confirmed",
    "reservation.released",
    "reservation.expired",
    "sale.started",
    "sale.sold_out",
    "sale.ended",
]
DeliveryStatus = Literal["pending", "delivered", "dead"]


class WebhookIn(Struct, forbid_unknown_fields=True):
    url: Annotated[
        str, Meta(min_length=8, max_length=2000, pattern=r"^https?://[\x21-\x7e]+(?!\n)$", description="http(s)")
    ]
    events: Annotated[list[WebhookEvent], Meta(min_length=1, max_length=7)]


class WebhookCounts(Struct):
    """Deliveries waiting for their next try, and those dead-lettered after every retry failed."""

    pending: int
    dead: int


class Webhook(Struct, omit_defaults=True):
    id: str
    url: str
    events: list[WebhookEvent]
    created_at: datetime
    # Only in the answers to the registration and to a rotation: never shown again.
    secret: str | UnsetType = UNSET
    # After a rotation: until then every delivery is signed with the previous secret too.
    previous_secret_until: datetime | UnsetType = UNSET
    deliveries: WebhookCounts | UnsetType = UNSET


class WebhookList(Struct):
    webhooks: list[Webhook]


class RotateIn(Struct, forbid_unknown_fields=True):
    previous_valid_s: Annotated[
        int, Meta(ge=0, le=7 * 86_400, description="how long the previous secret still signs, too")
    ] = 86_400


class Delivery(Struct):
    event_id: str
    type: WebhookEvent
    sale_id: str
    status: DeliveryStatus
    attempts: int
    occurred_at: datetime
    next_at: datetime | None  # the next try, for a pending one
    last_error: str | None
    payload: str  # the body, as sent and signed


class DeliveryList(Struct):
    deliveries: list[Delivery]

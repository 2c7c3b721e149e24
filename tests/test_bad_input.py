"""Bad input gets a clear JSON error with the contract's code and status, and changes nothing."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from flashsale.keys import Keys

from .conftest import OPS, STORE, create_sale, sale_body

GOOD = {"user_id": "u1", "sku": "phone", "quantity": 1}
RID = "SALE.AAAAAAAAAAAAAAAAAAAAAA"
CURSOR_5000 = base64.urlsafe_b64encode(b"9" * 5000 + b":demo").decode().rstrip("=")

# (name, method, path, body as bytes or JSON, extra headers, status, code)
CASES: list[tuple[str, str, str, Any, dict[str, str], int, str]] = [
    ("truncated json", "POST", "/v1/sales/SALE/reservations", b'{"user_id": ', {}, 400, "invalid_request"),
    ("empty body", "POST", "/v1/sales/SALE/reservations", b"", {}, 400, "invalid_request"),
    ("not an object", "POST", "/v1/sales/SALE/reservations", [1, 2], {}, 422, "invalid_request"),
    ("user_id a number", "POST", "/v1/sales/SALE/reservations", {**GOOD, "user_id": 5}, {}, 422, "invalid_request"),
    ("sku missing", "POST", "/v1/sales/SALE/reservations", {"user_id": "u1"}, {}, 422, "invalid_request"),
    ("quantity zero", "POST", "/v1/sales/SALE/reservations", {**GOOD, "quantity": 0}, {}, 422, "invalid_request"),
    ("quantity negative", "POST", "/v1/sales/SALE/reservations", {**GOOD, "quantity": -3}, {}, 422, "invalid_request"),
    ("quantity huge", "POST", "/v1/sales/SALE/reservations", {**GOOD, "quantity": 10**30}, {}, 422, "invalid_request"),
    (
        "quantity fractional",
        "POST",
        "/v1/sales/SALE/reservations",
        {**GOOD, "quantity": 1.5},
        {},
        422,
        "invalid_request",
    ),
    ("quantity a string", "POST", "/v1/sales/SALE/reservations", {**GOOD, "quantity": "1"}, {}, 422, "invalid_request"),
    (
        "user_id too long",
        "POST",
        "/v1/sales/SALE/reservations",
        {**GOOD, "user_id": "x" * 129},
        {},
        422,
        "invalid_request",
    ),
    ("user_id empty", "POST", "/v1/sales/SALE/reservations", {**GOOD, "user_id": ""}, {}, 422, "invalid_request"),
    (
        "NUL in user_id",
        "POST",
        "/v1/sales/SALE/reservations",
        {**GOOD, "user_id": "a\x00b"},
        {},
        422,
        "invalid_request",
    ),
    (
        "bad UTF-8",
        "POST",
        "/v1/sales/SALE/reservations",
        b'{"user_id": "\xff\xfe", "sku": "phone"}',
        {},
        400,
        "invalid_request",
    ),
    (
        "body over 16 KiB",
        "POST",
        "/v1/sales/SALE/reservations",
        {**GOOD, "user_id": "x" * 20_000},
        {},
        400,
        "invalid_request",
    ),
    ("unknown field", "POST", "/v1/sales/SALE/reservations", {**GOOD, "price": 0}, {}, 422, "invalid_request"),
    (
        "Idempotency-Key too long",
        "POST",
        "/v1/sales/SALE/reservations",
        GOOD,
        {"Idempotency-Key": "k" * 129},
        422,
        "invalid_request",
    ),
    (
        "Idempotency-Key with a space",
        "POST",
        "/v1/sales/SALE/reservations",
        GOOD,
        {"Idempotency-Key": "a b"},
        422,
        "invalid_request",
    ),
    ("unknown sale", "POST", "/v1/sales/nope/reservations", GOOD, {}, 404, "not_found"),
    ("sale id with odd characters", "POST", "/v1/sales/a%00b/reservations", GOOD, {}, 404, "not_found"),
    ("unknown sku", "POST", "/v1/sales/SALE/reservations", {**GOOD, "sku": "nope"}, {}, 404, "not_found"),
    ("unknown sale read", "GET", "/v1/sales/nope", None, {}, 404, "not_found"),
    ("unknown reservation", "GET", f"/v1/reservations/{RID}?user_id=u1", None, {}, 404, "not_found"),
    ("malformed reservation id", "GET", "/v1/reservations/..%2F..?user_id=u1", None, {}, 404, "not_found"),
    ("reservation without user_id", "GET", f"/v1/reservations/{RID}", None, {}, 422, "invalid_request"),
    (
        "confirm unknown",
        "POST",
        f"/v1/reservations/{RID}/confirm",
        {"user_id": "u1", "payment_ref": "p"},
        {},
        404,
        "not_found",
    ),
    (
        "confirm without payment_ref",
        "POST",
        f"/v1/reservations/{RID}/confirm",
        {"user_id": "u1"},
        {},
        422,
        "invalid_request",
    ),
    ("cancel unknown", "POST", f"/v1/reservations/{RID}/cancel", {"user_id": "u1"}, {}, 404, "not_found"),
    ("unknown route", "GET", "/v2/everything", None, {}, 404, "not_found"),
    ("wrong method", "DELETE", "/v1/sales/SALE", None, {}, 405, "method_not_allowed"),
    ("no key", "POST", "/v1/sales/SALE/reservations", GOOD, {"Authorization": ""}, 401, "unauthorized"),
    ("wrong key", "POST", "/v1/sales/SALE/reservations", GOOD, {"Authorization": "Bearer nope"}, 401, "unauthorized"),
    ("basic auth", "POST", "/v1/sales/SALE/reservations", GOOD, {"Authorization": "Basic dTpw"}, 401, "unauthorized"),
    ("storefront key creating a sale", "POST", "/v1/sales", sale_body("other"), {}, 403, "forbidden"),
    (
        "sale ending before it starts",
        "POST",
        "/v1/sales",
        sale_body("other", starts_at="2030-01-02T00:00:00+00:00", ends_at="2030-01-01T00:00:00+00:00"),
        OPS,
        422,
        "invalid_request",
    ),
    (
        "sale time without offset",
        "POST",
        "/v1/sales",
        sale_body("other", starts_at="2030-01-01T00:00:00"),
        OPS,
        422,
        "invalid_request",
    ),
    (
        "two items with one sku",
        "POST",
        "/v1/sales",
        sale_body("other", items=[{"sku": "a", "name": "A", "price_cents": 1, "stock": 1}] * 2),
        OPS,
        422,
        "invalid_request",
    ),
    (
        "per_user_limit zero",
        "POST",
        "/v1/sales",
        sale_body("other", items=[{"sku": "a", "name": "A", "price_cents": 1, "stock": 1, "per_user_limit": 0}]),
        OPS,
        422,
        "invalid_request",
    ),
    (
        "negative stock",
        "POST",
        "/v1/sales",
        sale_body("other", items=[{"sku": "a", "name": "A", "price_cents": 1, "stock": -1}]),
        OPS,
        422,
        "invalid_request",
    ),
    ("sale id with a brace", "POST", "/v1/sales", sale_body("a{b}"), OPS, 422, "invalid_request"),
    ("sale id ending in a newline", "POST", "/v1/sales", sale_body("other\n"), OPS, 422, "invalid_request"),
    (
        "user_id ending in a newline",
        "POST",
        "/v1/sales/SALE/reservations",
        {**GOOD, "user_id": "u1\n"},
        {},
        422,
        "invalid_request",
    ),
    (
        "sale ending in the year 9999",
        "POST",
        "/v1/sales",
        sale_body("other", ends_at="9999-12-31T23:59:59-05:00"),
        OPS,
        422,
        "invalid_request",
    ),
    (
        "sale starting before 2000",
        "POST",
        "/v1/sales",
        sale_body("other", starts_at="1969-12-31T00:00:00+00:00"),
        OPS,
        422,
        "invalid_request",
    ),
    (
        "patch to the year 9999",
        "PATCH",
        "/v1/sales/SALE",
        {"ends_at": "9999-12-31T23:59:59+00:00"},
        OPS,
        422,
        "invalid_request",
    ),
    ("list limit in superscript digits", "GET", "/v1/sales?limit=%C2%B2", None, OPS, 422, "invalid_request"),
    ("list limit of 5000 digits", "GET", "/v1/sales?limit=" + "9" * 5000, None, OPS, 422, "invalid_request"),
    ("cursor with a superscript score", "GET", "/v1/sales?cursor=wrI6ZGVtbw", None, OPS, 422, "invalid_request"),
    ("cursor with a 5000-digit score", "GET", "/v1/sales?cursor=" + CURSOR_5000, None, OPS, 422, "invalid_request"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_bad_request_gets_a_json_error_and_changes_nothing(
    client: httpx.AsyncClient,
    redis: Redis,
    keys: Keys,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    sale = await create_sale(client)
    sid = sale["id"]
    state = (keys.item(sid, "phone"), keys.events(sid), keys.sale(sid), keys.sales)
    before = (
        await redis.hgetall(state[0]),
        await redis.xlen(state[1]),
        await redis.hgetall(state[2]),
        await redis.zcard(state[3]),
    )
    content = body if isinstance(body, bytes) else None
    r = await client.request(
        method,
        path.replace("SALE", sid),
        content=content,
        json=None if content is not None or body is None else body,
        headers={"Content-Type": "application/json", **STORE, **headers},
    )
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    if status == 405:
        assert "GET" in r.headers["allow"]
    after = (
        await redis.hgetall(state[0]),
        await redis.xlen(state[1]),
        await redis.hgetall(state[2]),
        await redis.zcard(state[3]),
    )
    assert after == before
    assert await redis.exists(keys.sale("other")) == 0


async def test_a_declared_body_over_16_kib_is_refused_before_it_is_read(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    r = await client.post(
        f"/v1/sales/{sale['id']}/reservations",
        content=b"{" + b" " * 20_000 + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "16 KiB" in r.json()["error"]["message"]


async def test_a_validation_error_names_the_field(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    r = await client.post(f"/v1/sales/{sale['id']}/reservations", json={**GOOD, "quantity": 0})
    assert r.json()["error"]["fields"] == ["quantity"]


async def test_a_whole_number_written_with_a_fraction_is_an_integer_as_json_schema_says(
    client: httpx.AsyncClient,
) -> None:
    sale = await create_sale(client)
    r = await client.post(f"/v1/sales/{sale['id']}/reservations", json={**GOOD, "quantity": 2.0})
    assert (r.status_code, r.json()["quantity"]) == (201, 2)
    half = await client.post(f"/v1/sales/{sale['id']}/reservations", json={**GOOD, "user_id": "v", "quantity": 1.5})
    assert (half.status_code, half.json()["error"]["fields"]) == (422, ["quantity"])

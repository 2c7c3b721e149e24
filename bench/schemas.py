"""Decode + validate a reservation body: msgspec (what the API uses) against pydantic v2.

    .venv/bin/python bench/schemas.py

Prints one table; the ratio is what matters (the machine is shared and absolute times drift).
"""

from __future__ import annotations

import contextlib
import timeit
from typing import Annotated

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from flashsale.schemas import ReserveIn

GOOD = b'{"user_id": "user-12345", "sku": "phone-x", "quantity": 1}'
BAD = b'{"user_id": "user-12345", "sku": "phone-x", "quantity": 0}'


class ReservePydantic(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
    sku: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    quantity: Annotated[int, Field(ge=1, le=1_000_000)] = 1


def msgspec_good() -> None:
    msgspec.json.decode(GOOD, type=ReserveIn)


def pydantic_good() -> None:
    ReservePydantic.model_validate_json(GOOD)


def msgspec_bad() -> None:
    with contextlib.suppress(msgspec.ValidationError):
        msgspec.json.decode(BAD, type=ReserveIn)


def pydantic_bad() -> None:
    with contextlib.suppress(ValueError):
        ReservePydantic.model_validate_json(BAD)


def main() -> None:
    n = 100_000
    rows = []
    for name, fn in (
        ("msgspec valid", msgspec_good),
        ("pydantic valid", pydantic_good),
        ("msgspec invalid", msgspec_bad),
        ("pydantic invalid", pydantic_bad),
    ):
        best = min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e9
        rows.append((name, best))
    print(f"{'decode + validate ReserveIn':<28}{'ns/op':>10}{'vs msgspec':>12}")
    for name, ns in rows:
        base = rows[0][1] if "valid" in name and "invalid" not in name else rows[2][1]
        print(f"{name:<28}{ns:>10.0f}{ns / base:>11.1f}x")


if __name__ == "__main__":
    main()

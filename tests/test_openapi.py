"""The OpenAPI document describes every endpoint, and the API keeps to it under fuzzing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from flashsale.api import ROUTES
from flashsale.settings import Settings

from . import procs
from .conftest import OPS_KEY, STORE_KEY, TESTS, create_sale

# One client and one API process: beside the crowd tests it costs them little, and run after them
# it made the heavy group the suite's longest path (make test uses --dist loadgroup).
pytestmark = pytest.mark.xdist_group("schemathesis")


async def test_openapi_describes_every_route(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json", headers={"Authorization": ""})
    assert r.status_code == 200
    paths = r.json()["paths"]
    for route in ROUTES:
        assert isinstance(route, Route)
        for method in (route.methods or set()) - {"HEAD"}:
            assert method.lower() in paths.get(route.path, {}), f"{method} {route.path} is not documented"


SEED = os.environ.get("FUZZ_SEED", "1")  # the shopper run's; another one shows its reach is not one seed's luck
SHOPPER = r"^/v1/(sales/\{sale_id\}(/reservations|/carts)?|reservations/.*|carts/.*)$"  # what a shopper calls


def schemathesis(url: str, key: str, *options: str, config: Path | None = None) -> None:
    """`st run` against the API with ``key`` and every check but positive_data_acceptance (the API
    has rules JSON Schema cannot say: ends_at after starts_at, one item per sku, so some
    schema-valid bodies are rightly 422): it must find no 5xx and no answer off the spec."""
    st = str(Path(sys.executable).with_name("st"))
    given = ("--config-file", str(config)) if config else ()
    checks = ("--checks", "all", "--exclude-checks", "positive_data_acceptance")
    run = subprocess.run(
        [st, *given, "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {key}", *checks, *options],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


@pytest.mark.timeout(300)  # about a minute alone; the margin is for a machine busy with the crowd tests
async def test_schemathesis_finds_no_server_error_and_no_response_off_the_spec(settings: Settings) -> None:
    with procs.api(settings, workers=1) as url:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {OPS_KEY}"}) as c:
            # Live, and with room for every hold the stateful phase makes as its one "shopper".
            item = {"sku": "phone", "name": "Phone", "price_cents": 1, "stock": 1_000_000, "per_user_limit": 1_000_000}
            await create_sale(c, sale_id="fuzz", items=[item])
            # First as a shopper, stateful phase only, on "fuzz" while it is live (the ops run below
            # may well end it: GET /v1/sales lists it), and only what a shopper calls, so that the
            # scenarios follow its links, not ops' 403s.
            shopper = TESTS / "schemathesis-shopper.toml"
            schemathesis(
                url, STORE_KEY, "--phases", "stateful", "--seed", SEED, "--include-path-regex", SHOPPER, config=shopper
            )
            fuzzed = (await c.get("/v1/sales/fuzz/progress")).json()["items"][0]
            schemathesis(url, OPS_KEY, "--max-examples", "6", "--seed", "1")
    # The stateful phase reached the core: holds on the live sale, and, through the links from a
    # hold (its id is nowhere else), some of them confirmed or cancelled (holds last 600 s: none expired).
    assert fuzzed["reservations"] > 0, fuzzed
    assert fuzzed["confirmed"] + fuzzed["cancelled"] > 0, fuzzed

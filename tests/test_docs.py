"""The API reference (docs/api.md, served at GET /docs) and the OpenAPI document never drift apart,
and the README sends a reader only to files inside the repository."""

from __future__ import annotations

import re

import httpx
import msgspec

from flashsale import openapi
from flashsale.errors import STATUS
from flashsale.settings import ROOT

REFERENCE = (ROOT / "docs" / "api.md").read_text()
METHODS = {"get", "post", "put", "patch", "delete"}


def shape(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)  # {rid} and {reservation_id} name the same slot


def test_the_reference_has_a_section_for_every_endpoint_of_the_openapi_document_and_no_other() -> None:
    spec = msgspec.json.decode(openapi.document())
    served = {(m.upper(), shape(p)) for p, ops in spec["paths"].items() for m in ops if m in METHODS}
    written = {(m, shape(p)) for m, p in re.findall(r"^### (GET|POST|PUT|PATCH|DELETE) (/\S*)$", REFERENCE, re.M)}
    assert written - served == set(), "the reference describes endpoints the service does not have"
    assert served - written == set(), "endpoints the reference does not describe"


def test_the_reference_lists_every_error_code_with_its_status() -> None:
    for code, status in STATUS.items():
        assert re.search(rf"^\| `{code}` \| {status} \|", REFERENCE, re.M), f"{code} ({status}) is not in the table"


async def test_docs_is_one_html_page_that_loads_nothing_from_anywhere(client: httpx.AsyncClient) -> None:
    r = await client.get("/docs", headers={"Authorization": ""})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert csp.startswith("default-src 'none';") and "style-src 'sha256-" in csp
    assert "<h3>POST /v1/sales/{sale_id}/reservations</h3>" in r.text
    assert not re.search(r"<(script|link|img|iframe)\b|\bsrc=", r.text), "the page loads something"


def test_the_readme_links_only_to_files_inside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", readme):
        if target.startswith("#"):
            continue
        if target.startswith("http"):
            assert re.match(r"https?://(127\.0\.0\.1|localhost)[:/]", target), f"a link off this machine: {target}"
            continue
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"README links to {target}, not a file of the repository"

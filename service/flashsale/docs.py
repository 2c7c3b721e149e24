"""``GET /docs``: the API reference (``docs/api.md``) as one readable HTML page, rendered here by
markdown-it-py, with its one stylesheet inline: nothing is loaded from anywhere, and the page's
Content-Security-Policy allows nothing else."""

from __future__ import annotations

import hashlib
from base64 import b64encode
from functools import cache

from markdown_it import MarkdownIt
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .settings import ROOT

REFERENCE = ROOT / "docs" / "api.md"
STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #1d1d1f; }
h1, h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
h3 { font-family: ui-monospace, monospace; font-size: 1.05rem; margin-top: 2rem; }
code, pre { font-family: ui-monospace, monospace; font-size: .9em; background: #f4f4f6; border-radius: 4px; }
code { padding: .1rem .3rem; }
pre { padding: .8rem 1rem; overflow-x: auto; }
pre code { padding: 0; background: none; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ddd; padding: .3rem .6rem; text-align: left; vertical-align: top; }
"""


@cache
def page() -> tuple[bytes, str]:
    """The page, and the Content-Security-Policy that lets its one inline style apply."""
    body = MarkdownIt("commonmark").enable("table").render(REFERENCE.read_text())
    html = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>flashsale API reference</title><style>{STYLE}</style></head>\n<body>\n{body}</body></html>\n"
    )
    digest = b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
    csp = (
        f"default-src 'none'; style-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html.encode(), csp


async def docs(request: Request) -> Response:
    html, csp = page()
    return Response(html, media_type="text/html; charset=utf-8", headers={"Content-Security-Policy": csp})


ROUTES = [Route("/docs", docs, methods=["GET"])]

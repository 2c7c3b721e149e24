"""Ops endpoints that run a sale: list, change before start, pause, resume, end, restock."""

from __future__ import annotations

from starlette.routing import BaseRoute

ROUTES: list[BaseRoute] = []

"""Ops endpoints that watch sales: progress, its live stream, the dashboard and /metrics."""

from __future__ import annotations

from starlette.routing import BaseRoute

ROUTES: list[BaseRoute] = []

"""The end user's address and device, as a storefront passes them on (``"client"``), made into
the keys that client budgets count by: one address per client however it is written."""

from __future__ import annotations

import ipaddress

from .errors import ApiError
from .schemas import Client


def ip_key(raw: str) -> str:
    """IPv4 as is; an IPv4-mapped IPv6 address as the IPv4 it maps; any other IPv6 address as its
    /64 (one subscriber's network: rotating addresses inside it is one client). 422 otherwise."""
    try:
        address = ipaddress.ip_address(raw.strip())
    except ValueError:
        raise ApiError("invalid_request", f"client.ip {raw!r} is not an IP address", fields=["client.ip"]) from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def keys_of(client: Client | None) -> tuple[str, str]:
    """(ip key, device) of a request's client, each '' when not given."""
    if client is None:
        return "", ""
    return ("" if client.ip is None else ip_key(client.ip)), client.device or ""

"""SSRF guard (SPEC §7.10): a URL the service fetches must resolve to public addresses only.

The host is resolved once and the caller connects to the address checked here (`Target.address`),
never to a second lookup (DNS rebinding). A configured upstream channel is trusted on its own
host AND port only (a local gateway may be private); any other URL must resolve to global
addresses, with IPv6 forms that carry an IPv4 address (mapped `::ffff:a.b.c.d`, compatible
`::a.b.c.d`, NAT64 `64:ff9b::/96` and `64:ff9b:1::/48`, 6to4 `2002::/16`) judged by that
IPv4 address, and Teredo (`2001::/32`) refused outright. Redirects are not followed.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_TEREDO = ipaddress.ip_network("2001::/32")
_COMPAT = ipaddress.ip_network("::/96")
DEFAULT_PORTS = {"http": 80, "https": 443}


class UnsafeURL(ValueError):
    """The URL may not be fetched."""


@dataclass(frozen=True)
class Target:
    """A checked URL: connect to `address`, send Host `host`, verify TLS for `host`."""

    scheme: str
    host: str
    port: int
    address: str
    path: str  # path and query, at least "/"


def embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """Return the IPv4 address an IPv6 form carries (mapped, compatible, NAT64, 6to4)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in net for net in _NAT64) or (address in _COMPAT and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def public(address: IPAddress) -> bool:
    """Tell whether an address is a global one, looking through IPv6 forms of IPv4."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _TEREDO:
            return False
        inner = embedded_v4(address)
        if inner is not None:
            return inner.is_global
    return address.is_global and not address.is_multicast


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise UnsafeURL(f"cannot resolve {host}") from exc
    return [str(info[4][0]).split("%")[0] for info in infos]


def check_url(url: str, trusted: Iterable[tuple[str, int]] = ()) -> Target:
    """Resolve once and return the Target to connect to; raise UnsafeURL when not allowed.

    `trusted` holds (host, port) pairs of the configured channels: only that exact pair may
    resolve to a private address.
    """
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise UnsafeURL("only http(s) URLs with a host may be fetched")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise UnsafeURL("bad port") from exc
    host = parts.hostname
    addresses = _resolve(host, port)
    if not addresses:
        raise UnsafeURL(f"cannot resolve {host}")
    if (host, port) not in set(trusted):
        for text in addresses:
            if not public(ipaddress.ip_address(text)):
                raise UnsafeURL(f"{host} resolves to a non-public address")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, host, port, addresses[0], path)


def origin(url: str) -> tuple[str, int]:
    """Return a base URL's (host, port) as check_url's `trusted` expects it."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or DEFAULT_PORTS.get(parts.scheme, 80)

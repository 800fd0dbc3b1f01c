"""SSRF guard (SPEC §7.10): a URL the service fetches must resolve to public addresses only.

The configured upstream channels are trusted (their hosts may be private, e.g. a local gateway);
any other host must resolve to global addresses, and redirects are not followed.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit


class UnsafeURL(ValueError):
    """The URL may not be fetched."""


def check_url(url: str, trusted_hosts: Iterable[str] = ()) -> None:
    """Raise UnsafeURL unless url is http(s) to a trusted host or to public addresses only."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeURL("only http(s) URLs with a host may be fetched")
    host = parts.hostname
    if host in set(trusted_hosts):
        return
    try:
        infos = socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeURL(f"cannot resolve {host}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            raise UnsafeURL(f"{host} resolves to a non-public address")

"""Fetch a link an upstream gave us (an image URL) through the SSRF guard, pinned to its address.

The address netguard checked is the one connected to (urllib3 pool on the IP; Host header, SNI
and certificate check for the name), so a second DNS answer can never redirect the fetch.
"""

from __future__ import annotations

import os

import urllib3
from requests.utils import DEFAULT_CA_BUNDLE_PATH

from app.edges.netguard import Target


class FetchError(Exception):
    """The file could not be fetched (network, status, or size)."""


def _pool(target: Target, timeout: urllib3.Timeout) -> urllib3.HTTPConnectionPool:
    if target.scheme == "https":
        ca = (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
              or DEFAULT_CA_BUNDLE_PATH)
        return urllib3.HTTPSConnectionPool(
            target.address, target.port, timeout=timeout, retries=False, maxsize=1,
            cert_reqs="CERT_REQUIRED", ca_certs=ca, server_hostname=target.host,
            assert_hostname=target.host)
    return urllib3.HTTPConnectionPool(target.address, target.port, timeout=timeout,
                                      retries=False, maxsize=1)


def fetch(target: Target, timeout: float = 30, max_bytes: int = 20 << 20) -> bytes:
    """GET a checked target (no redirects) and return its body, at most max_bytes."""
    host = target.host if ":" not in target.host else f"[{target.host}]"
    default = 443 if target.scheme == "https" else 80
    headers = {"Host": host if target.port == default else f"{host}:{target.port}",
               "Accept": "*/*", "User-Agent": "xiaoyi"}
    pool = _pool(target, urllib3.Timeout(connect=5, read=timeout))
    try:
        resp = pool.urlopen("GET", target.path, headers=headers, redirect=False,
                            preload_content=False, retries=False)
        try:
            if resp.status != 200:
                raise FetchError(f"HTTP {resp.status}")
            chunks, size = [], 0
            for chunk in resp.stream(65536):
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError("the file is too large")
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            resp.release_conn()
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise FetchError(type(exc).__name__) from exc
    finally:
        pool.close()

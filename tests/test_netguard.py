"""The SSRF guard refuses private, loopback and link-local targets unless the host is trusted."""

from __future__ import annotations

import pytest

from app.edges.netguard import UnsafeURL, check_url


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.png", "http://10.0.0.5/a", "http://192.168.1.1/", "http://[::1]/",
    "http://169.254.169.254/latest/meta-data/", "http://localhost:8000/", "file:///etc/passwd",
    "gopher://example.com/", "http:///nohost",
])
def test_refuses_non_public(url: str) -> None:
    with pytest.raises(UnsafeURL):
        check_url(url)


def test_public_literal_address_passes() -> None:
    check_url("https://8.8.8.8/image.png")


def test_trusted_upstream_host_passes() -> None:
    check_url("http://127.0.0.1:9000/v1/files/img.png", {"127.0.0.1"})


def test_relay_fetch_refuses_private_link(app: object) -> None:
    from app.core.errors import UpstreamError
    from app.edges.upstream import get_upstream

    with app.app_context(), pytest.raises(UpstreamError):  # type: ignore[attr-defined]
        get_upstream().get("http://169.254.169.254/latest/meta-data/")

"""The demo key `xiaoyi run` prints: one live key on the `demo` account, reused across starts."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from app.core.config import Settings, units_to_yuan, yuan_to_units
from app.runtime.private import URL_FILE, write_private

DEMO_ACCOUNT = "demo"
DEMO_CREDIT = "10"  # 元, credited once, when the demo account is created
DEMO_KEY_FILE = "demo-key"  # in XIAOYI_DATA_DIR, mode 0600: only the key's hash is in Redis


def _read_demo_key(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _write_demo_key(path: Path, raw: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, raw + "\n")


def demo_key(settings: Settings, url: str) -> tuple[str, int]:
    """Return the demo account's one live key (reused across starts) and its balance in units."""
    from app.core.money import keys, wallet
    from app.edges.store import close, make_redis

    r = make_redis(url, max_connections=2)
    try:
        wallet.create_account(r, DEMO_ACCOUNT, name="demo", note="demo credit",
                              initial=yuan_to_units(DEMO_CREDIT, "demo credit"))
        path = Path(settings.data_dir) / DEMO_KEY_FILE
        raw = _read_demo_key(path)
        info = keys.lookup(r, raw) if raw and keys.plausible(raw) else None
        if raw is None or info is None or info.acct != DEMO_ACCOUNT:
            raw, info = keys.create_key(r, DEMO_ACCOUNT, "demo")
            _write_demo_key(path, raw)
        for row in keys.list_keys(r, DEMO_ACCOUNT):  # one live demo key, never a pile of them
            if not row["revoked"] and row["id"] != info.id:
                keys.revoke(r, row["id"])
        return raw, wallet.balance(r, DEMO_ACCOUNT)
    finally:
        close(r)


def _shown(url: str) -> str:
    """Return a Redis URL without its password (the banner is a log, and logs hold no secrets)."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def cli_command(argv0: str | None = None) -> str:
    """Return how to type this `xiaoyi` in the shell that started it.

    `xiaoyi` when that name on PATH is this very program; else its path, relative to the working
    directory when it lies below it: `make run` starts `.venv/bin/xiaoyi`, which is on nobody's
    PATH until the venv is activated, so a bare `xiaoyi …` pasted from the banner would not run.
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    if os.path.basename(argv0) != "xiaoyi" or os.sep not in argv0:
        return "xiaoyi"  # found on PATH, or started another way (python -m app.runtime.cli)
    found = shutil.which("xiaoyi")
    if found and os.path.realpath(found) == os.path.realpath(argv0):
        return "xiaoyi"
    path = os.path.abspath(argv0)
    relative = os.path.relpath(path)
    if relative.startswith(".."):
        return path
    return relative if os.sep in relative else os.path.join(".", relative)


def banner(settings: Settings, host: str, port: int, redis_url: str, upstream: str,
           key: str, balance: int, command: str | None = None) -> str:
    """Return what `xiaoyi run` prints once everything answers: URLs, the demo key, a curl.

    Every command in it is written as this program was started (`command`, by default
    cli_command()), so each line runs as pasted.
    """
    xiaoyi = command or cli_command()
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    base = f"http://{shown}:{port}"
    admin = "" if settings.admin_token else "  (set XIAOYI_ADMIN_TOKEN to enable)"
    wechat = (f"  (try it: {xiaoyi} wechat send 你好, with the same XIAOYI_WECHAT_TOKEN)"
              if settings.wechat_token else "  (set XIAOYI_WECHAT_TOKEN to enable)")
    fake = ("" if settings.channels else
            "  (the built-in fake, not a model: set XIAOYI_UPSTREAM_BASE_URL for a real one)")
    where = "" if settings.redis_url else (f"  (embedded, AOF in {settings.data_dir}; the full "
                                           f"URL is in {os.path.join(settings.data_dir, URL_FILE)}, "
                                           "mode 0600)")
    low = "" if balance > 0 else f"  (empty: {xiaoyi} accounts topup {DEMO_ACCOUNT} 10)"
    return f"""
xiaoyi is running.
  API:      {base}/v1   (also {base}/index.php/api/v1)
  WeChat:   {base}/wechat{wechat}
  Admin:    {base}/admin{admin}
  Redis:    {_shown(redis_url)}{where}
  Upstream: {upstream}{fake}

Demo key ({units_to_yuan(balance)} 元): {key}{low}

Try:
  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"api_secret_key": "{key}", "model": "gpt-3.5", "messages": [{{"role": "user", "content": "你好"}}]}}'

Ctrl-C stops everything (open streams get XIAOYI_GRACEFUL_TIMEOUT seconds to finish).
"""



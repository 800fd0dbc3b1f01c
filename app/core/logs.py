"""Logging setup with a filter that scrubs secrets from every record."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-]{8,}")
# Credentials a URL carries (WeChat's AppSecret and access tokens): masked wherever one is quoted.
URL_SECRET = re.compile(r"\b((?:access_token|secret|appsecret)=)[^&\s'\"<>]+", re.I)


class ScrubSecrets(logging.Filter):
    """Replace developer keys and configured secrets in log messages with ***."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def scrub(self, text: str) -> str:
        """Return text with every secret masked."""
        text = URL_SECRET.sub(r"\1***", KEY_PATTERN.sub("sk-***", text))
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        """Render the message once, scrubbed."""
        message = record.getMessage()
        clean = self.scrub(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


_PROCESS = {"scrub": ScrubSecrets()}  # this process's filter (setup installs it)


def scrub(text: str) -> str:
    """Return text masked as this process's log records are (for text kept outside the logs:
    rq's stored failures)."""
    return _PROCESS["scrub"].scrub(text)


def setup(level: str, secrets: Iterable[str]) -> None:
    """Configure the root logger once per process, with the scrubbing filter on its handler."""
    root = logging.getLogger()
    scrub = _PROCESS["scrub"] = ScrubSecrets(secrets)
    if not any(isinstance(f, ScrubSecrets) for h in root.handlers for f in h.filters):
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(stream)
    for handler in root.handlers:
        handler.filters = [f for f in handler.filters if not isinstance(f, ScrubSecrets)]
        handler.addFilter(scrub)
    root.setLevel(level)

"""Seal a passive reply that shows a raw API key, so WeChat's retries can get it again.

A reply that issues a key is shown once; if WeChat's first answer is lost, its retry (same
MsgId, within ~15 s) must show the same key, or the key is lost. The webhook answering the
retry may be another process or host, so the reply is kept in Redis for at most 60 s, but
never in clear: AES-256-GCM under a key derived (HKDF-SHA256) from the WeChat secrets every
web process is configured with (token, EncodingAESKey, AppSecret) and Redis never holds; the
message's dedupe key is the associated data, so a sealed reply opens only for its own message.

Trade-off: an AOF/RDB copy, a replica or MONITOR shows only ciphertext. Someone holding both
Redis and the WeChat settings could open it within those 60 s, but could already sign webhook
calls as WeChat. A process with other settings cannot open it and serves the masked key.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.core.config import Settings

SEAL_TTL = 60  # seconds a sealed reply is kept (WeChat retries within ~15 s)
_INFO = b"xiaoyi wechat sealed reply v1"
_KEYS: dict[tuple[str, str, str], AESGCM] = {}


def _cipher(settings: Settings) -> AESGCM:
    material = (settings.wechat_token or "", settings.wechat_aes_key or "",
                settings.wechat_app_secret or "")
    cipher = _KEYS.get(material)
    if cipher is None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(
            "\0".join(material).encode("utf-8"))
        cipher = _KEYS.setdefault(material, AESGCM(key))
    return cipher


def seal(settings: Settings, dk: str, plain: str) -> str:
    """Return `plain` encrypted and bound to the message `dk` (base64 text)."""
    nonce = os.urandom(12)
    box = _cipher(settings).encrypt(nonce, plain.encode("utf-8"), dk.encode("utf-8"))
    return base64.b64encode(nonce + box).decode("ascii")


def unseal(settings: Settings, dk: str, sealed: str) -> str | None:
    """Return the sealed text, or None when it cannot be opened (other settings, tampered)."""
    try:
        raw = base64.b64decode(sealed, validate=True)
        plain = _cipher(settings).decrypt(raw[:12], raw[12:], dk.encode("utf-8"))
    except (InvalidTag, binascii.Error, ValueError):
        return None
    return plain.decode("utf-8")

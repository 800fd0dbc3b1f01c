"""Hash tags of the bot's keys: everything about one WeChat user shares one Redis Cluster slot.

A user's keys carry ``{<openid>}``; a message's keys carry its dedupe key with the openid as tag
(``{<openid>}:<rest>``: the dedupe key starts with the openid, see app/web/wechat/dedupe.py), so
a script or transaction over a message's state, the user's parked items and context stays in
one slot.
"""

from __future__ import annotations


def user(openid: str) -> str:
    """Return the tag of a user's keys: ``{openid}``."""
    return "{" + openid + "}"


def message(dk: str) -> str:
    """Return a message's key suffix: ``{openid}:<rest of the dedupe key>``."""
    openid, sep, rest = dk.partition(":")
    return "{" + openid + "}" + sep + rest

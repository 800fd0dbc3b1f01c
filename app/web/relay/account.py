"""Read-only views of the key's account: models, balance, OpenAI's legacy billing shapes."""

from __future__ import annotations

import time
from typing import Any

from flask import Response, request

from app.core.config import UNITS_PER_YUAN, units_to_yuan
from app.core.errors import InvalidKey, ModelNotFound
from app.core.money import wallet
from app.edges.store import get_redis
from app.web.relay.common import authenticate, key_body, settings
from app.web.render import json_response

CREATED = 1_700_000_000


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": CREATED, "owned_by": "xiaoyi"}


def models() -> Response:
    """List the models this service offers (public names after the model map)."""
    authenticate(None)
    data = [_model(name) for name in settings().models]
    return json_response({"object": "list", "data": data, "code": 0, "msg": ""})


def model(model_id: str) -> Response:
    """Answer one model (a public name or a legacy alias), or 404."""
    authenticate(None)
    if settings().resolve(model_id) is None:
        raise ModelNotFound(f"The model '{model_id[:100]}' does not exist.", param="model",
                            msg="模型不存在")
    return json_response({**_model(model_id), "code": 0, "msg": ""})


def _account() -> dict[str, Any]:
    # The original service's way: POST with api_secret_key in the JSON body.
    key = authenticate(key_body() if request.method == "POST" else None)
    acct = wallet.get_account(get_redis(), key.acct)
    if acct is None:
        raise InvalidKey("The key's account no longer exists.", msg="账户不存在")
    return acct


def balance() -> Response:
    """Return the key's balance in 元."""
    acct = _account()
    return json_response({"code": 0, "msg": "", "object": "balance", "account": acct["id"],
                          "balance": units_to_yuan(acct["balance"]),
                          "used": units_to_yuan(acct["used"]), "currency": "CNY"})


def subscription() -> Response:
    """Return OpenAI's legacy billing/subscription shape (amounts in 元)."""
    acct = _account()
    total = (acct["balance"] + acct["used"]) / UNITS_PER_YUAN
    return json_response({
        "object": "billing_subscription", "has_payment_method": True,
        "soft_limit_usd": total, "hard_limit_usd": total, "system_hard_limit_usd": total,
        "access_until": int(time.time()) + 365 * 86400, "plan": {"title": "xiaoyi", "id": "cny"},
        "code": 0, "msg": ""})


def usage() -> Response:
    """Return OpenAI's legacy billing/usage shape: total_usage in 0.01 元."""
    acct = _account()
    return json_response({"object": "list", "total_usage": acct["used"] / 100,
                          "code": 0, "msg": ""})

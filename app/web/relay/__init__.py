"""The developer API blueprint: every route under /v1 and /index.php/api/v1."""

from __future__ import annotations

from flask import Blueprint, Flask, Response

from app.core.errors import ApiError
from app.web.relay import account, chat, common, media

bp = Blueprint("relay", __name__)


@bp.post("/chat/completions")
def chat_completions() -> Response:
    """Relay a chat completion."""
    return chat.relay_text("chat", "/chat/completions")


@bp.post("/completions")
def completions() -> Response:
    """Relay a legacy completion."""
    return chat.relay_text("completion", "/completions")


@bp.post("/embeddings")
def embeddings() -> Response:
    """Relay an embeddings request."""
    return media.embeddings()


@bp.post("/images/generations")
def images_generations() -> Response:
    """Relay an image generation."""
    return media.images()


bp.add_url_rule("/models", "models", account.models, methods=["GET"])
bp.add_url_rule("/balance", "balance", account.balance, methods=["GET"])
bp.add_url_rule("/dashboard/billing/subscription", "billing_subscription",
                account.subscription, methods=["GET"])
bp.add_url_rule("/dashboard/billing/usage", "billing_usage", account.usage, methods=["GET"])

@bp.errorhandler(ApiError)
def api_error(err: ApiError) -> Response:
    """Answer a bad key or a rate limit before the request's own error, as if checked first.

    Views gather the key lazily (gather(defer_key=True)) so hold() can look it up in the same
    round trip as the reservation; a request that fails before hold() is checked here.
    """
    try:
        common.authenticate_deferred()
    except ApiError as key_err:
        err = key_err
    return common.json_response(err.body(), err.status, err.headers)


PREFIXES = ("/v1", "/index.php/api/v1")


def init_app(app: Flask) -> None:
    """Mount the API under both prefixes."""
    app.register_blueprint(bp, url_prefix=PREFIXES[0])
    app.register_blueprint(bp, url_prefix=PREFIXES[1], name="relay_legacy")

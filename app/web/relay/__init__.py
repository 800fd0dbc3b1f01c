"""The developer API blueprint: every route under /v1, /index.php/api/v1 and /index.php/v1."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from flask import Blueprint, Flask, Response

from app.core.errors import InvalidKey, UpstreamRefused
from app.edges import current
from app.web.relay import account, chat, cors, media, responses, screening, settle_later, usage
from app.web.relay.common import give_turn, name_bad_key, ratelimit_headers, request_id_header
from app.web.render import error_response

bp = Blueprint("relay", __name__)
bp.after_request(ratelimit_headers)  # x-ratelimit-*-requests on every successful answer


@bp.errorhandler(UpstreamRefused)
def upstream_refused(err: UpstreamRefused) -> Response:
    """Answer the upstream's refusal of a request, its message (which may quote the prompt or
    the answer) masked by [safety] api_output."""
    return error_response(screening.mask_error(err))


@bp.errorhandler(InvalidKey)
def invalid_key(err: InvalidKey) -> Response:
    """Answer a refused key, naming the key checked (Bearer or api_secret_key)."""
    return error_response(name_bad_key(err))


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


# openai<1 sends `engine=` (old LangChain's embeddings, OpenAI's 2022 examples) to
# /engines/{engine}/…, the engine naming the model: it is the model unless the body names one.
@bp.post("/engines/<engine>/chat/completions")
def engine_chat_completions(engine: str) -> Response:
    """Relay a chat completion for the model the path names."""
    current.g().engine = engine
    return chat.relay_text("chat", "/chat/completions")


@bp.post("/engines/<engine>/completions")
def engine_completions(engine: str) -> Response:
    """Relay a legacy completion for the model the path names."""
    current.g().engine = engine
    return chat.relay_text("completion", "/completions")


@bp.post("/engines/<engine>/embeddings")
def engine_embeddings(engine: str) -> Response:
    """Relay an embeddings request for the model the path names."""
    current.g().engine = engine
    return media.embeddings()


responses.register(bp)  # /responses, /responses/<id>[/input_items]
bp.add_url_rule("/models", "models", account.models, methods=["GET"])
bp.add_url_rule("/models/<path:model_id>", "model", account.model, methods=["GET"])
bp.add_url_rule("/balance", "balance", account.balance, methods=["GET", "POST"])
bp.add_url_rule("/dashboard/billing/subscription", "billing_subscription",
                account.subscription, methods=["GET"])
bp.add_url_rule("/dashboard/billing/usage", "billing_usage", account.usage, methods=["GET"])
bp.add_url_rule("/usage", "usage", usage.usage, methods=["GET"])

# /index.php/v1: the seed's base_url is http://host/index.php/ and its examples say xxxxx/v1/...
PREFIXES = ("/v1", "/index.php/api/v1", "/index.php/v1")
UNDER = tuple(p + "/" for p in PREFIXES)  # a path under one of them


SLASHES = re.compile(r"/{2,}")
# A path naming an API route under no prefix, or under a prefix's pieces only (a base_url
# without /v1, or http://host/index.php/ given to an SDK): its 404 names the route it meant.
MISSED_PREFIX = re.compile(r"(?:/(?:index\.php|api|v1))*(/(?:chat/completions|completions|"
                           r"embeddings|images/generations|models|responses|balance|engines"
                           r"|dashboard/billing)(?:/.*)?)")


def route_hint(path: str) -> str:
    """Return the hint a 404 for `path` carries: the /v1 route it meant, when it names one
    under a prefix of ours' pieces that is not one of them (under one, it is unknown as is)."""
    found = MISSED_PREFIX.fullmatch(path)
    if found is None or path[:found.start(1)] in PREFIXES:
        return ""
    return (f" The API is served under /v1 (an SDK's base_url, openai<1's api_base: "
            f"http://host/v1) and /index.php/api/v1: did you mean /v1{found.group(1)[:200]}?")


def tidy_path(path: str) -> str:
    """Return an API path as the routes spell it: runs of slashes made one (a base_url ending
    in `/` joined to `/chat/completions`) and a trailing slash dropped; other paths as they are.

    Served in place: werkzeug would answer a 308 with an HTML body, which curl, PHP and most
    plain HTTP clients neither follow nor parse.
    """
    tidy = SLASHES.sub("/", path)
    if tidy.startswith(UNDER) and tidy.endswith("/") and tidy not in UNDER:
        tidy = tidy[:-1]
    return tidy if tidy.startswith(UNDER) else path


def _tidy_paths(wsgi: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if "//" in path or path.endswith("/"):
            environ["PATH_INFO"] = tidy_path(path)
        return wsgi(environ, start_response)

    return app


def init_app(app: Flask) -> None:
    """Mount the API under every prefix (paths with doubled or trailing slashes included)."""
    app.wsgi_app = _tidy_paths(app.wsgi_app)  # type: ignore[method-assign]
    app.register_blueprint(bp, url_prefix=PREFIXES[0])
    app.register_blueprint(bp, url_prefix=PREFIXES[1], name="relay_legacy")
    app.register_blueprint(bp, url_prefix=PREFIXES[2], name="relay_seed")

    cors.init_app(app, UNDER)
    settle_later.init_app(app, app.config["SETTINGS"].relay)
    # The view returned (a stream's body then runs without a turn) or raised: Flask tears the
    # request down before the body is sent, also for stream_with_context (tests/test_turns.py).
    app.teardown_request(give_turn)

    @app.after_request
    def api_request_id(resp: Response) -> Response:
        # app-wide, so that an unknown route under a prefix (no blueprint matched) has one too
        if current.request().path.startswith(UNDER):
            return request_id_header(resp)
        return resp

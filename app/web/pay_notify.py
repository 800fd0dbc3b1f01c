"""POST /wechat/pay/notify: WeChat Pay's payment notification, verified and credited once."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, current_app, request

from app.edges.pay import check_config, handle_notify
from app.edges.store import get_redis

bp = Blueprint("pay", __name__)
NOTIFY_MAX_BYTES = 64 * 1024


def _xml(ok: bool, msg: str) -> Response:
    code = "SUCCESS" if ok else "FAIL"
    body = (f"<xml><return_code><![CDATA[{code}]]></return_code>"
            f"<return_msg><![CDATA[{msg}]]></return_msg></xml>")
    return Response(body, 200, mimetype="text/xml")


@bp.post("/wechat/pay/notify")
def pay_notify() -> Response:
    """Receive WeChat Pay's payment notification."""
    if (request.content_length or 0) > NOTIFY_MAX_BYTES:
        return _xml(False, "too large")
    body = request.stream.read(NOTIFY_MAX_BYTES + 1)
    if len(body) > NOTIFY_MAX_BYTES:
        return _xml(False, "too large")
    ok, msg = handle_notify(get_redis(), current_app.config["SETTINGS"], body)
    return _xml(ok, msg)


def init_app(app: Flask) -> None:
    """Check the [pay] settings and mount the notification route."""
    check_config(app.config["SETTINGS"])
    app.register_blueprint(bp)

"""Fake WeChat Official Account API (api.weixin.qq.com/cgi-bin/), served locally in a thread.

Point wechatpy at it with a `WeChatClient` subclass whose `API_BASE_URL` is `fake.url` and whose
`fetch_access_token` calls `self._fetch_access_token(url=fake.url + "token", params=...)`:
wechatpy 1.8.18 hard-codes the token URL (see docs/wechatpy-notes.md).

Every endpoint answers HTTP 200 with JSON, as WeChat does; errors are `{"errcode", "errmsg"}`.
"""

from __future__ import annotations

import copy
import email.message
import email.parser
import email.policy
import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

API_PREFIX = "/cgi-bin/"

# errmsg texts as WeChat words them (close enough for logs and assertions).
ERRMSGS: dict[int, str] = {
    -1: "system error",
    40001: "invalid credential, access_token is invalid or not latest",
    40002: "invalid grant_type",
    40003: "invalid openid",
    40004: "invalid media type",
    40005: "invalid file type",
    40007: "invalid media_id",
    40008: "invalid message type",
    40009: "invalid image size",
    40013: "invalid appid",
    40014: "invalid access_token",
    40016: "invalid button size",
    40017: "invalid button type",
    40018: "invalid button name size",
    40019: "invalid button key size",
    40023: "invalid sub button size",
    40066: "invalid url",
    40125: "invalid appsecret",
    41001: "access_token missing",
    41005: "media data missing",
    42001: "access_token expired",
    43001: "require GET method",
    43002: "require POST method",
    44004: "empty content",
    45002: "content size out of limit",
    45009: "reach max api daily quota limit",
    45015: "response out of time limit or subscription is canceled",
    45047: "out of response count limit",
    46003: "menu no exist",
    47001: "data format error",
    48001: "api unauthorized",
}

# Leading bytes of the image formats WeChat accepts for `type=image`.
IMAGE_MAGIC: dict[bytes, str] = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpeg",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
    b"BM": "bmp",
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
MEDIA_LIMITS: dict[str, int] = {
    "image": 2 * 1024 * 1024,
    "voice": 2 * 1024 * 1024,
    "video": 10 * 1024 * 1024,
    "thumb": 64 * 1024,
}
MESSAGE_TYPES = frozenset(
    {"text", "image", "voice", "video", "music", "news", "mpnews", "msgmenu", "wxcard",
     "miniprogrampage"}
)


@dataclass
class FakeRequest:
    """One HTTP request as the fake server saw it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeResponse:
    """One HTTP response for the fake server to send."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json; encoding=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    """Hand every request to the owning fake's `handle_request`."""

    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        """Serve a GET request."""
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        """Serve a POST request."""
        self._serve("POST")

    def _serve(self, method: str) -> None:
        """Read the request, dispatch it and write the response."""
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        request = FakeRequest(
            method=method,
            path=parts.path,
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        server: _Server = self.server  # type: ignore[assignment]
        response = server.fake.handle_request(request)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Keep test output quiet."""


class _Server(ThreadingHTTPServer):
    """Threaded HTTP server that knows which fake it serves."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], fake: LocalHTTPFake) -> None:
        super().__init__(address, _Handler)
        self.fake = fake

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore clients that hung up (a timed-out test client); report anything else."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LocalHTTPFake:
    """Base for fakes served by http.server in a background thread; use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind the socket and serve in a daemon thread."""
        if self._server is not None:
            return
        self._server = _Server(self._address, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=type(self).__name__,
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def root_url(self) -> str:
        """Return `http://host:port/` of the running server."""
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    def handle_request(self, request: FakeRequest) -> FakeResponse:
        """Answer one request (subclasses implement the protocol)."""
        raise NotImplementedError


def image_kind(data: bytes) -> str | None:
    """Return "png", "jpeg", "gif" or "bmp" from the leading bytes, else None."""
    for magic, kind in IMAGE_MAGIC.items():
        if data.startswith(magic):
            return kind
    return None


def parse_multipart(content_type: str, body: bytes) -> dict[str, dict[str, Any]] | None:
    """Split multipart/form-data into {field: {filename, content_type, data}}; None if malformed."""
    header = email.message.Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        return None
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    fields: dict[str, dict[str, Any]] = {}
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            return fields
        padding, sep, rest = chunk.partition(b"\r\n")
        if not sep or padding.strip(b" \t"):
            return None
        if rest.startswith(b"\r\n"):
            head, data = b"", rest[2:]
        else:
            head, sep, data = rest.partition(b"\r\n\r\n")
            if not sep:
                return None
        parser = email.parser.BytesHeaderParser(policy=email.policy.HTTP)
        part = parser.parsebytes(head + b"\r\n\r\n")
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        filename = part.get_filename()
        if filename is not None:
            # Raw UTF-8 in a quoted filename arrives surrogate-escaped.
            filename = filename.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        fields[name] = {
            "filename": filename, "content_type": part.get("Content-Type"), "data": data,
        }
    return None  # no closing delimiter


def _describe_file(part: dict[str, Any]) -> dict[str, Any]:
    """Summarise an uploaded file part for the call log."""
    data: bytes = part["data"]
    kind = image_kind(data)
    return {
        "filename": part["filename"],
        "content_type": part["content_type"],
        "size": len(data),
        "magic": kind,
        "is_png": kind == "png",
        "is_jpeg": kind == "jpeg",
        "sha256": hashlib.sha256(data).hexdigest(),
    }


@dataclass
class _Multipart:
    """Parsed multipart/form-data fields of a request body."""

    fields: dict[str, dict[str, Any]]


class _ApiError(Exception):
    """Answer the current request with a WeChat errcode."""

    def __init__(self, errcode: int, errmsg: str | None = None) -> None:
        super().__init__(errcode)
        self.errcode = errcode
        self.errmsg = errmsg or ERRMSGS.get(errcode, "error")


def _endpoint(path: str) -> str:
    """Normalise "/cgi-bin/menu/get", "cgi-bin/menu/get" or "menu/get" to "menu/get"."""
    path = path.strip("/")
    prefix = API_PREFIX.strip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path


def _json_reply(payload: dict[str, Any]) -> FakeResponse:
    """Encode a JSON answer the way WeChat does (UTF-8, not ASCII-escaped)."""
    return FakeResponse(body=json.dumps(payload, ensure_ascii=False).encode("utf-8"))


def _utf8_len(value: str) -> int:
    """Return the UTF-8 byte length of a string."""
    return len(value.encode("utf-8"))


class FakeWeChatAPI(LocalHTTPFake):
    """Fake of the Official Account API: token, custom messages, typing, media, menu."""

    def __init__(
        self,
        appid: str = "wxfakeappid00001",
        secret: str = "fake-app-secret",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        expires_in: int = 7200,
        text_limit_bytes: int = 2048,
        media_limits: dict[str, int] | None = None,
    ) -> None:
        super().__init__(host, port)
        self.appid = appid
        self.secret = secret
        self.expires_in = expires_in
        self.text_limit_bytes = text_limit_bytes
        self.media_limits = {**MEDIA_LIMITS, **(media_limits or {})}
        self._lock = threading.RLock()
        self._routes: dict[str, tuple[str, Callable[[FakeRequest, Any], FakeResponse]]] = {
            "token": ("GET", self._token),
            "message/custom/send": ("POST", self._custom_send),
            "message/custom/typing": ("POST", self._custom_typing),
            "media/upload": ("POST", self._media_upload),
            "media/get": ("GET", self._media_get),
            "menu/create": ("POST", self._menu_create),
            "menu/get": ("GET", self._menu_get),
            "menu/delete": ("GET", self._menu_delete),
        }
        self.reset()

    # ---- public API ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Return the API base URL, ending in "/cgi-bin/" (wechatpy's API_BASE_URL)."""
        return self.root_url + API_PREFIX.lstrip("/")

    @property
    def calls(self) -> list[dict[str, Any]]:
        """Return every recorded call: method, path, endpoint, query, body, time, errcode."""
        with self._lock:
            return list(self._calls)

    def calls_to(self, path_suffix: str) -> list[dict[str, Any]]:
        """Return the recorded calls whose path ends with `path_suffix`."""
        suffix = path_suffix.rstrip("/")
        with self._lock:
            return [c for c in self._calls if c["path"].endswith(suffix)]

    @property
    def token(self) -> str | None:
        """Return the currently valid access token (None before the first fetch or after expiry)."""
        with self._lock:
            return self._token

    @property
    def token_fetches(self) -> int:
        """Return how many access tokens were issued."""
        with self._lock:
            return self._token_count

    def expire_token(self, errcode: int = 40001) -> None:
        """Invalidate the current token: calls with it get `errcode` until a new one is fetched."""
        with self._lock:
            if self._token is not None:
                self._revoked[self._token] = errcode
            self._token = None

    def set_error(
        self, endpoint: str, errcode: int, times: int | None = None, errmsg: str | None = None
    ) -> None:
        """Answer the next `times` calls to `endpoint` with `errcode` (None: until cleared)."""
        with self._lock:
            if times is not None and times <= 0:
                self._errors.pop(_endpoint(endpoint), None)
            else:
                self._errors[_endpoint(endpoint)] = [errcode, times, errmsg]

    def clear_errors(self) -> None:
        """Forget every error set with set_error."""
        with self._lock:
            self._errors.clear()

    def set_delay(self, endpoint: str, seconds: float | None) -> None:
        """Sleep `seconds` before answering `endpoint` (None removes the delay)."""
        with self._lock:
            if seconds is None:
                self._delays.pop(_endpoint(endpoint), None)
            else:
                self._delays[_endpoint(endpoint)] = seconds

    def sent(self, touser: str | None = None) -> list[dict[str, Any]]:
        """Return the customer-service messages accepted, optionally only those to `touser`."""
        with self._lock:
            return [copy.deepcopy(m) for m in self._sent if touser is None or m["touser"] == touser]

    @property
    def uploads(self) -> list[dict[str, Any]]:
        """Return the accepted media uploads (media_id, type, filename, content_type, data, ...)."""
        with self._lock:
            return [dict(m) for m in self._media.values() if m["uploaded"]]

    def media(self, media_id: str) -> dict[str, Any] | None:
        """Return one stored media record, or None."""
        with self._lock:
            record = self._media.get(media_id)
            return dict(record) if record else None

    def add_media(
        self,
        data: bytes,
        *,
        media_type: str = "image",
        content_type: str = "image/jpeg",
        filename: str = "image.jpg",
    ) -> str:
        """Store media as if a user had sent it (for media/get) and return its MediaId."""
        with self._lock:
            return self._store_media(media_type, filename, content_type, data, uploaded=False)

    @property
    def menu(self) -> dict[str, Any] | None:
        """Return the last created menu ({"button": [...]}) or None."""
        with self._lock:
            return copy.deepcopy(self._menu)

    def reset(self) -> None:
        """Forget calls, tokens, errors, delays, messages, media and menu."""
        with self._lock:
            self._calls: list[dict[str, Any]] = []
            self._token: str | None = None
            self._token_count = 0
            self._revoked: dict[str, int] = {}
            self._errors: dict[str, list[Any]] = {}
            self._delays: dict[str, float] = {}
            self._sent: list[dict[str, Any]] = []
            self._media: dict[str, dict[str, Any]] = {}
            self._media_count = 0
            self._menu: dict[str, Any] | None = None

    # ---- request handling ---------------------------------------------------------------

    def handle_request(self, request: FakeRequest) -> FakeResponse:
        """Record the call, apply injected errors and token checks, then run the endpoint."""
        endpoint = _endpoint(request.path) if request.path.startswith(API_PREFIX) else ""
        body = self._parse_body(request)
        call: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "endpoint": endpoint,
            "query": dict(request.query),
            "body": body if not isinstance(body, _Multipart) else {
                name: _describe_file(part) for name, part in body.fields.items()
            },
            "time": time.time(),
            "errcode": None,
        }
        with self._lock:
            self._calls.append(call)
            delay = self._delays.get(endpoint, 0.0)
        if delay:
            time.sleep(delay)
        with self._lock:
            try:
                response = self._route(request, endpoint, body)
            except _ApiError as exc:
                response = _json_reply({"errcode": exc.errcode, "errmsg": exc.errmsg})
                call["errcode"] = exc.errcode
            else:
                call["errcode"] = 0
        return response

    def _route(self, request: FakeRequest, endpoint: str, body: Any) -> FakeResponse:
        """Pick the endpoint, check method, injected errors and access token."""
        route = self._routes.get(endpoint)
        if route is None:
            raise _ApiError(40066)
        method, handler = route
        if request.method != method:
            raise _ApiError(43001 if method == "GET" else 43002)
        injected = self._errors.get(endpoint)
        if injected is not None:
            errcode, times, errmsg = injected
            if times is not None:
                injected[1] = times - 1
                if injected[1] <= 0:
                    del self._errors[endpoint]
            raise _ApiError(errcode, errmsg)
        if endpoint != "token":
            self._check_token(request.query.get("access_token"))
        return handler(request, body)

    def _check_token(self, token: str | None) -> None:
        """Accept only the token issued last."""
        if not token:
            raise _ApiError(41001)
        if token != self._token:
            raise _ApiError(self._revoked.get(token, 40001))

    @staticmethod
    def _parse_body(request: FakeRequest) -> Any:
        """Return parsed JSON, _Multipart, raw bytes, or None for an empty body."""
        content_type = request.headers.get("content-type", "")
        if content_type.lower().startswith("multipart/"):
            fields = parse_multipart(content_type, request.body)
            return _Multipart(fields) if fields is not None else request.body
        if not request.body:
            return None
        try:
            return json.loads(request.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return request.body

    @staticmethod
    def _json_object(body: Any) -> dict[str, Any]:
        """Return the JSON object body or fail with 47001."""
        if not isinstance(body, dict):
            raise _ApiError(47001)
        return body

    def _token(self, request: FakeRequest, body: Any) -> FakeResponse:
        """Issue TOKEN-<n> for client_credential with the right appid and secret."""
        query = request.query
        if query.get("grant_type") != "client_credential":
            raise _ApiError(40002)
        if query.get("appid") != self.appid:
            raise _ApiError(40013)
        if query.get("secret") != self.secret:
            raise _ApiError(40125)
        if self._token is not None:
            self._revoked[self._token] = 40001
        self._token_count += 1
        self._token = f"TOKEN-{self._token_count}"
        return _json_reply({"access_token": self._token, "expires_in": self.expires_in})

    def _custom_send(self, request: FakeRequest, body: Any) -> FakeResponse:
        """Accept a customer-service message after checking its shape."""
        message = self._json_object(body)
        touser = message.get("touser")
        if not isinstance(touser, str) or not touser:
            raise _ApiError(40003)
        msgtype = message.get("msgtype")
        if msgtype not in MESSAGE_TYPES or not isinstance(message.get(msgtype), dict):
            raise _ApiError(40008)
        if msgtype == "text":
            content = message["text"].get("content")
            if not isinstance(content, str) or not content:
                raise _ApiError(44004)
            if _utf8_len(content) > self.text_limit_bytes:
                raise _ApiError(45002)
        elif msgtype in ("image", "voice"):
            media_id = message[msgtype].get("media_id")
            if not isinstance(media_id, str) or media_id not in self._media:
                raise _ApiError(40007)
        self._sent.append(copy.deepcopy(message))
        return _json_reply({"errcode": 0, "errmsg": "ok"})

    def _custom_typing(self, request: FakeRequest, body: Any) -> FakeResponse:
        """Accept a Typing/CancelTyping command."""
        command = self._json_object(body)
        if not isinstance(command.get("touser"), str) or not command["touser"]:
            raise _ApiError(40003)
        if command.get("command") not in ("Typing", "CancelTyping"):
            raise _ApiError(47001)
        return _json_reply({"errcode": 0, "errmsg": "ok"})

    def _media_upload(self, request: FakeRequest, body: Any) -> FakeResponse:
        """Store temporary media sent as multipart field `media`."""
        media_type = request.query.get("type", "")
        if media_type not in self.media_limits:
            raise _ApiError(40004)
        if not isinstance(body, _Multipart) or "media" not in body.fields:
            raise _ApiError(41005)
        part = body.fields["media"]
        data: bytes = part["data"]
        if not data:
            raise _ApiError(41005)
        if len(data) > self.media_limits[media_type]:
            raise _ApiError(40009 if media_type == "image" else 40005)
        filename = part["filename"] or ""
        if media_type == "image" and (
            not filename.lower().endswith(IMAGE_EXTENSIONS) or image_kind(data) is None
        ):
            raise _ApiError(40005)
        media_id = self._store_media(
            media_type, filename, part["content_type"], data, uploaded=True
        )
        record = self._media[media_id]
        return _json_reply(
            {"type": media_type, "media_id": media_id, "created_at": record["created_at"]}
        )

    def _store_media(
        self,
        media_type: str,
        filename: str,
        content_type: str | None,
        data: bytes,
        *,
        uploaded: bool,
    ) -> str:
        """Keep media bytes under a new MEDIA-<n> id."""
        self._media_count += 1
        media_id = f"MEDIA-{self._media_count}"
        kind = image_kind(data)
        self._media[media_id] = {
            "media_id": media_id,
            "type": media_type,
            "filename": filename,
            "content_type": content_type,
            "size": len(data),
            "magic": kind,
            "is_png": kind == "png",
            "is_jpeg": kind == "jpeg",
            "data": data,
            "created_at": int(time.time()),
            "uploaded": uploaded,
        }
        return media_id

    def _media_get(self, request: FakeRequest, body: Any) -> FakeResponse:
        """Return stored media bytes as a download."""
        record = self._media.get(request.query.get("media_id", ""))
        if record is None:
            raise _ApiError(40007)
        return FakeResponse(
            body=record["data"],
            content_type=record["content_type"] or "application/octet-stream",
            headers={"Content-disposition": f'attachment; filename="{record["filename"]}"'},
        )

    def _menu_create(self, request: FakeRequest, body: Any) -> FakeResponse:
        """Validate and keep a menu definition."""
        menu = self._json_object(body)
        buttons = menu.get("button")
        if not isinstance(buttons, list) or not 1 <= len(buttons) <= 3:
            raise _ApiError(40016)
        for button in buttons:
            if not isinstance(button, dict):
                raise _ApiError(40017)
            subs = button.get("sub_button")
            if subs:
                if not isinstance(subs, list) or len(subs) > 5:
                    raise _ApiError(40023)
                self._check_button(button, name_limit=16, needs_type=False)
                for sub in subs:
                    if not isinstance(sub, dict):
                        raise _ApiError(40017)
                    self._check_button(sub, name_limit=60, needs_type=True)
            else:
                self._check_button(button, name_limit=16, needs_type=True)
        self._menu = {"button": copy.deepcopy(buttons)}
        return _json_reply({"errcode": 0, "errmsg": "ok"})

    @staticmethod
    def _check_button(button: dict[str, Any], *, name_limit: int, needs_type: bool) -> None:
        """Check a button's name, type and click key."""
        name = button.get("name")
        if not isinstance(name, str) or not name or _utf8_len(name) > name_limit:
            raise _ApiError(40018)
        if not needs_type:
            return
        if not isinstance(button.get("type"), str):
            raise _ApiError(40017)
        if button["type"] == "click":
            key = button.get("key")
            if not isinstance(key, str) or not key or _utf8_len(key) > 128:
                raise _ApiError(40019)

    def _menu_get(self, request: FakeRequest, body: Any) -> FakeResponse:
        """Return the menu in WeChat's {"menu": {"button": [...]}} shape, or 46003."""
        if self._menu is None:
            raise _ApiError(46003)
        buttons = copy.deepcopy(self._menu["button"])
        for button in buttons:
            button.setdefault("sub_button", [])
        return _json_reply({"menu": {"button": buttons}})

    def _menu_delete(self, request: FakeRequest, body: Any) -> FakeResponse:
        """Remove the menu."""
        self._menu = None
        return _json_reply({"errcode": 0, "errmsg": "ok"})

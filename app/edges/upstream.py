"""Upstream channels: choose, call with failover, cool failing ones down, read SSE streams.

Keys (owned here):
    xy:chan:{<name>}:cool    string, TTL = cooldown: the channel is resting
    xy:chan:{<name>}:stats   hash   ok, fail, last_error, last_ok (ms)
    (one hash tag per channel: its two keys share a Redis Cluster slot)
"""

from __future__ import annotations

import logging
import os
import random
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis
import requests
from requests.utils import DEFAULT_CA_BUNDLE_PATH, default_user_agent, get_environ_proxies
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from app.core.config import Channel, Settings
from app.core.errors import (
    UpstreamError,
    UpstreamNotFound,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamTooLarge,
    UpstreamUnprocessable,
)
from app.core.metrics import FAILOVERS, UPSTREAM_FAILURES, UPSTREAM_LATENCY
from app.edges import current
from app.edges.fetch import FetchError, fetch
from app.edges.netguard import UnsafeURL, check_url, origin
from app.edges.proxied import CappedAdapter
from app.edges.sse import data_events
from app.edges.turns import DEFAULT_SIZE as DEFAULT_TURNS
from app.edges.turns import EXTENSION as TURNS
from app.edges.turns import Turns
from app.edges.upstream_http import (
    ANSWER_LIMIT,
    AnswerTooLarge,
    Origin,
    UpstreamResponse,
    read_tail,
)

__all__ = ["Upstream", "UpstreamResponse", "get_upstream", "init_app", "iter_sse",
           "iter_sse_objects"]

log = logging.getLogger(__name__)


def _cool(name: str) -> str:
    """Name a channel's cooldown key."""
    return f"xy:chan:{{{name}}}:cool"


def _stats(name: str) -> str:
    """Name a channel's stats hash."""
    return f"xy:chan:{{{name}}}:stats"


EXTENSION = "xiaoyi.upstream"
RETRYABLE = {408, 409, 429, 500, 502, 503, 504, 520, 522, 524}
OK_FLUSH_SECONDS = 1.0  # successful calls are counted in-process and added to Redis this often
# Connections kept per channel and process: one per request a gevent worker may hold (gunicorn's
# worker_connections), so none is closed after use and reopened under many slow requests. The
# pool never blocks: past this size a connection is still opened, then closed after its call.
POOL_MAXSIZE = max(1000, int(os.environ.get("XIAOYI_WEB_CONNECTIONS", "2000")))


class Upstream:
    """The HTTP client to every channel (one pooled session per process)."""

    def __init__(self, settings: Settings, r: redis.Redis, turns: Turns | None = None,
                 answer_limit: int = ANSWER_LIMIT) -> None:
        self.turns = turns or Turns(0)  # given back while a call waits (app.edges.turns)
        self.channels = sorted(settings.channels, key=lambda c: c.priority)
        self.redis = r
        self.timeout = (settings.relay.get("connect_timeout_seconds", 5),
                        settings.relay.get("timeout_seconds", 60))
        # A plain (non-stream) answer's first byte comes when all of it is written: minutes for
        # a long one, so it gets its own read timeout, under the 600 s that nginx and the openai
        # SDK wait (their timeout would fire first and hide the relay's answer); 0: none.
        self.answer_timeout = (self.timeout[0],
                               settings.relay.get("answer_timeout_seconds", 570) or None)
        self.cooldown = settings.relay.get("cooldown_seconds", 30)
        # An answer longer than this once decoded is refused on both paths (upstream_http's
        # ANSWER_LIMIT): a broken or hostile upstream, or proxy, cannot fill a worker's memory.
        self.answer_limit = answer_limit
        self.session = requests.Session()
        adapter = CappedAdapter(answer_limit, pool_connections=16, pool_maxsize=POOL_MAXSIZE,
                                max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._cool_cache: tuple[float, set[str]] = (0.0, set())
        # The hot path (post) has its own HTTP client (app.edges.upstream_http): requests.Session
        # costs ~0.4 ms of CPU per call (environment proxy lookups, cookie jar, hooks, header
        # merging), urllib3 and http.client ~0.1 ms. Channels an environment proxy applies to
        # keep the requests session, so proxies work as before.
        self._ca = (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
                    or DEFAULT_CA_BUNDLE_PATH)
        self._tls: ssl.SSLContext | None = None  # made with the first https origin
        self._origins: dict[tuple[str, str, int | None], Origin] = {}
        self._prepared: dict[int, _Prepared] = {}
        self._ok_pending: dict[str, int] = {}
        self._ok_flushed = time.monotonic()

    def cooling(self) -> set[str]:
        """Return the names of channels resting now (cached for one second)."""
        at, names = self._cool_cache
        now = time.monotonic()
        if now - at < 1.0:
            return names
        pipe = self.redis.pipeline(transaction=False)  # not MGET: the keys span slots
        for c in self.channels:
            pipe.get(_cool(c.name))
        values = pipe.execute()
        names = {c.name for c, v in zip(self.channels, values, strict=True) if v}
        self._cool_cache = (now, names)
        return names

    def health(self) -> list[dict[str, Any]]:
        """Return each channel's state from Redis: cooling seconds left, reason, ok/fail counts."""
        self.flush_ok()
        pipe = self.redis.pipeline(transaction=False)
        for c in self.channels:
            pipe.pttl(_cool(c.name))
            pipe.get(_cool(c.name))
            pipe.hgetall(_stats(c.name))
        values = pipe.execute()
        out = []
        for i, c in enumerate(self.channels):
            ttl_ms, reason, stats = values[3 * i:3 * i + 3]
            out.append({"channel": c, "cooling": ttl_ms > 0 or ttl_ms == -1,
                        "cooling_seconds": max(0.0, ttl_ms / 1000), "reason": reason or "",
                        "ok": int(stats.get("ok", 0)), "fail": int(stats.get("fail", 0)),
                        "last_error": stats.get("last_error", "")})
        return out

    def order(self, model: str) -> list[Channel]:
        """Return the channels serving a model: by priority, weighted within it, resting last."""
        serving = [c for c in self.channels if c.serves(model)]
        resting = self.cooling() if len(serving) > 1 else set()
        ordered: list[Channel] = []
        for prio in sorted({c.priority for c in serving}):
            group = [c for c in serving if c.priority == prio]
            while len(group) > 1:
                pick = random.choices(group, weights=[c.weight for c in group])[0]
                ordered.append(pick)
                group.remove(pick)
            ordered += group  # the last one: no draw
        return [c for c in ordered if c.name not in resting] + [
            c for c in ordered if c.name in resting]

    def _mark(self, channel: Channel, ok: bool, reason: str = "") -> None:
        stats = _stats(channel.name)
        try:
            if ok:
                if channel.name in self._cool_cache[1]:
                    self.redis.delete(_cool(channel.name))
                # One Redis round trip less per request: successes are summed here and added
                # at most once a second (health() flushes first, so its counts are current).
                self._ok_pending[channel.name] = self._ok_pending.get(channel.name, 0) + 1
                if time.monotonic() - self._ok_flushed >= OK_FLUSH_SECONDS:
                    self.flush_ok()
            else:
                UPSTREAM_FAILURES.labels(channel.name, reason).inc()
                pipe = self.redis.pipeline()
                pipe.set(_cool(channel.name), reason, ex=self.cooldown)
                pipe.hincrby(stats, "fail", 1)
                pipe.hset(stats, "last_error", reason)
                pipe.execute()
                self._cool_cache = (0.0, set())
        except redis.RedisError:
            log.warning("could not record channel health for %s", channel.name)

    def flush_ok(self) -> None:
        """Add the successes counted in this process to the channels' Redis stats."""
        pending, self._ok_pending = self._ok_pending, {}
        self._ok_flushed = time.monotonic()
        if not pending:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for name, count in pending.items():
                pipe.hincrby(_stats(name), "ok", count)
            pipe.execute()
        except redis.RedisError:
            log.warning("could not record channel successes")

    def _prepare(self, channel: Channel) -> _Prepared:
        """Return what calling a channel needs, computed once per channel."""
        found = self._prepared.get(id(channel))
        if found is None or found.channel is not channel:
            headers = {"User-Agent": default_user_agent(), "Accept-Encoding": "gzip, deflate",
                       "Accept": "*/*", "Content-Type": "application/json",
                       "Authorization": f"Bearer {channel.api_key}"}
            url = urlsplit(channel.base_url)
            scheme, host = url.scheme or "http", url.netloc.rpartition("@")[2]
            host = host.rpartition(":")[0] if url.port else host  # [::1] keeps its brackets
            where = None
            if not get_environ_proxies(channel.base_url):  # else requests handles the proxy
                key = (scheme, host, url.port)
                where = self._origins.get(key)
                if where is None:
                    if scheme == "https" and self._tls is None:  # (requests takes a folder too)
                        folder = os.path.isdir(self._ca)
                        self._tls = ssl.create_default_context(
                            cafile=None if folder else self._ca, capath=self._ca if folder else None)
                    where = self._origins[key] = Origin(scheme, host, url.port, POOL_MAXSIZE,
                                                        self._tls, self.answer_limit)
            prefix = (url.path or "").rstrip("/")
            found = _Prepared(channel, where, prefix, headers,
                              UPSTREAM_LATENCY.labels(channel.name), {})
            self._prepared[id(channel)] = found
        return found

    def _send(self, channel: Channel, path: str, data: bytes, stream: bool,
              quick: bool = False) -> requests.Response | UpstreamResponse:
        """POST once; raise requests' exceptions whichever client carried the call (`quick`:
        a plain answer gets timeout_seconds, not answer_timeout_seconds)."""
        prep = self._prepare(channel)
        short = stream or quick
        if prep.origin is None:
            try:
                return self.session.post(channel.base_url + path, data=data,
                                         headers=prep.headers, stream=stream,
                                         timeout=self.timeout if short else self.answer_timeout)
            except requests.ConnectionError as exc:  # requests' name for a body read timing out
                if exc.args and isinstance(exc.args[0], ReadTimeoutError):
                    raise requests.ReadTimeout(*exc.args) from exc  # it had the request
                raise
        head = prep.heads.get(path)
        if head is None:
            head = prep.heads[path] = _head(prep, path)
        return prep.origin.post(head + b"Content-Length: %d\r\n\r\n" % len(data), data,
                                self.timeout[0],
                                self.timeout[1] if short else self.answer_timeout[1], stream)

    def post(self, path: str, body: dict[str, Any], model: str, stream: bool = False,
             expect: str | None = None, quick: bool = False) -> Any:
        """POST with failover (see call()) and return the answer alone."""
        return self.call(path, body, model, stream, expect, quick).value

    def call(self, path: str, body: dict[str, Any], model: str, stream: bool = False,
             expect: str | None = None, quick: bool = False) -> Answer:
        """POST to the first healthy channel, failing over on 429/5xx/timeouts.

        A plain answer that times out (answer_timeout_seconds) does not fail over: the channel
        had the request and is likely writing a long answer. UpstreamTimeout.sent tells the
        caller the upstream had it (the prompt is billed). `quick`: a plain answer gets
        timeout_seconds instead (the bot's jobs, inside their own timeout; moderation), and
        fails over.

        Returns the response and the channel that gave it; with `expect` (a non-stream call)
        the parsed JSON object instead of the response, and a 200 whose body is not an object
        with that list field fails over too.
        """
        data = orjson.dumps(body)
        channels = self.order(model)
        if not channels:
            raise UpstreamError(f"No upstream channel serves model {model}.")
        timed_out = sent = False
        last = ""
        for i, channel in enumerate(channels):
            if i:
                FAILOVERS.inc()
            started = time.perf_counter()
            try:
                with self.turns.away():  # the wait for the answer (or its first bytes)
                    resp = self._send(channel, path, data, stream, quick)
            except requests.ReadTimeout:
                self._mark(channel, False, "timeout")
                sent = timed_out = True
                if not (stream or quick):
                    # A plain answer past answer_timeout_seconds: the channel is writing a long
                    # one (and billing it); another would run it again. The caller bills the
                    # prompt (SPEC §7.7). A stream's missing first byte is a stuck channel.
                    raise UpstreamTimeout("The upstream did not answer in time.", sent=True,
                                          retry=False) from None
                continue
            except requests.Timeout:  # connecting: nothing was sent, the next channel may answer
                timed_out = True
                self._mark(channel, False, "timeout")
                continue
            except AnswerTooLarge as exc:  # (a ConnectionError) its head says it is too long
                if exc.status == 200 and not stream:  # an answer written: not run again
                    raise _too_large() from None
                # An error status (a gateway's page), or a stream (a JSON answer to a stream
                # is the channel's failure): nothing to bill, the next channel may answer.
                last = f"HTTP {exc.status} too large"
                self._mark(channel, False, "connect")
                continue
            except requests.RequestException as exc:
                last = type(exc).__name__
                self._mark(channel, False, "connect")
                continue
            self._prepare(channel).latency.observe(time.perf_counter() - started)
            if resp.status_code == 200:
                if expect is None and stream and _json_answer(resp):
                    # A stream asked for and a JSON body given (an error a gateway sends as a
                    # 200): no event stream to relay; the channel failed, as for a 5xx.
                    resp.close()
                    last = "no event stream"
                    self._mark(channel, False, "malformed")
                    continue
                if expect is None:
                    self._mark(channel, True)
                    return Answer(resp, channel)
                try:
                    parsed = _parse(resp, expect)
                except AnswerTooLarge:  # read through requests (a proxy): found reading it
                    raise _too_large() from None
                if parsed is not None:
                    self._mark(channel, True)
                    return Answer(parsed, channel)
                last = "malformed JSON"
                self._mark(channel, False, "malformed")
                continue
            status = resp.status_code
            refused = _refusal(resp, status, channel)
            resp.close()
            if status in RETRYABLE:
                last = f"HTTP {status}"
                self._mark(channel, False, f"http_{status}")
                continue
            if refused is not None:
                refused.sent = sent  # an earlier channel that had it bills its prompt
                raise refused
            last = f"HTTP {status}"
            self._mark(channel, False, f"http_{status}")
        if last == "malformed JSON" and len(channels) == 1:
            raise UpstreamError("The upstream answered with malformed JSON.")
        if sent or (timed_out and not last):  # a channel that had the request bills its prompt
            raise UpstreamTimeout("The upstream did not answer in time.", sent=sent)
        raise UpstreamError(f"Every upstream channel failed ({last or 'timeout'}).")

    def moderate(self, content: str | list[Any], model: str) -> dict[str, Any]:
        """Ask /moderations about a text (or input parts); return its body (a results list)."""
        body = {"model": model, "input": content}
        answer: dict[str, Any] = self.post("/moderations", body, model, expect="results",
                                           quick=True)
        return answer

    def get(self, url: str, timeout: float = 30, max_bytes: int = 20 << 20) -> bytes:
        """Fetch a URL the upstream gave us (an image link): public hosts only, size-capped.

        A channel's own host and port may be private; the address checked is the one fetched.
        """
        try:
            target = check_url(url, {origin(c.base_url) for c in self.channels})
        except UnsafeURL as exc:
            raise UpstreamError(f"Refused to fetch the upstream's link: {exc}") from exc
        try:
            with self.turns.away():
                return fetch(target, timeout, max_bytes)
        except FetchError as exc:
            raise UpstreamError(f"Could not fetch the upstream's file ({exc}).") from exc


@dataclass(frozen=True)
class Answer:
    """What a call returned (a response, or parsed JSON) and the channel that answered."""

    value: Any
    channel: Channel


@dataclass(frozen=True)
class _Prepared:
    """One channel's call facts: its origin's connections (None: use requests, a proxy
    applies)."""

    channel: Channel
    origin: Origin | None
    prefix: str  # the base URL's path, e.g. /v1
    headers: dict[str, str]
    latency: Any  # the channel's UPSTREAM_LATENCY child
    heads: dict[str, bytes]  # by path: the request line and headers but Content-Length


def _head(prep: _Prepared, path: str) -> bytes:
    """Return a POST's request line and headers, all but Content-Length and the blank line.

    A header value with a line break (an API key pasted with one) would write another header,
    and one outside Latin-1 cannot be written: refused as requests refuses them (InvalidHeader,
    a RequestException: the channel fails over).
    """
    assert prep.origin is not None
    lines = [f"POST {prep.prefix}{path} HTTP/1.1", f"Host: {prep.origin.authority}",
             *(f"{name}: {value}" for name, value in prep.headers.items())]
    text = "\r\n".join(lines)
    if any(c in line for line in lines for c in "\r\n\0") or " " in prep.prefix + path:
        raise requests.exceptions.InvalidHeader(
            "a header or the path for the upstream holds a line break or a space")
    try:
        return (text + "\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise requests.exceptions.InvalidHeader(
            "a header for the upstream is not Latin-1") from None


def _too_large() -> UpstreamTooLarge:
    """The error of an answer longer than ANSWER_LIMIT: the upstream wrote (and bills) it, so
    no other channel is asked to write it again (the caller bills the request's bound)."""
    return UpstreamTooLarge(f"The upstream's answer is larger than this service relays "
                            f"({ANSWER_LIMIT >> 20} MiB). It was written, so this request is "
                            "billed at its bound (its prompt and max_tokens for every choice). "
                            "Ask for fewer choices, fewer tokens or no logprobs, or stream it.")


def _parse(resp: requests.Response | UpstreamResponse, field: str) -> dict[str, Any] | None:
    """Return the body as a JSON object holding a list `field`, or None when it is not one
    (AnswerTooLarge, a longer body read through requests, is raised)."""
    try:
        data = resp.json()
    except AnswerTooLarge:
        raise
    except (ValueError, requests.RequestException, Urllib3Error):
        return None
    return data if isinstance(data, dict) and isinstance(data.get(field), list) else None


_ERROR_WORD = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")  # an error's type or code as OpenAI writes it
# Codes about the operator's own account with the upstream, never the caller's: the relay's
# codes of the same names speak of the caller's key and wallet, so these are not passed on.
OPERATORS_CODES = frozenset(("invalid_api_key", "insufficient_quota", "rate_limit_exceeded",
                             "billing_hard_limit_reached", "account_deactivated"))


def _json_answer(resp: requests.Response | UpstreamResponse) -> bool:
    """Tell whether an answer says its body is JSON (not the event stream that was asked for)."""
    return "json" in (resp.headers.get("content-type") or "").lower()


def blot(text: str, channel: Channel) -> str:
    """Return an upstream's text with the channel's own key blotted out, should it echo it
    (some gateways quote the request's Authorization in their errors); no short key is."""
    return text.replace(channel.api_key, "***") if len(channel.api_key) >= 8 else text


def stream_error(obj: dict[str, Any]) -> UpstreamError | None:
    """Return the client's error for an upstream's error event inside a stream (`{"error":
    …}` and no choices), its message cut (iter_sse blotted the channel's key); None for any
    other event."""
    err = obj.get("error")
    if not err or obj.get("choices"):
        return None
    text = err.get("message") if isinstance(err, dict) else err
    text = str(text)[:300] if text else "no message"
    return UpstreamError("The upstream's stream ended with an error: " + text)


def _refusal(resp: requests.Response | UpstreamResponse, status: int,
             channel: Channel) -> UpstreamRefused | None:
    """Return the client's error for the upstream's refusal of the request itself (400, 404,
    422), carrying its message (the channel's key blotted out, should it echo it), and its
    type, code and param when they are well-formed and not about the operator's own account;
    None for any other status (the channel's failure, not the request's)."""
    if status not in (400, 404, 422):
        return None
    secret = channel.api_key if len(channel.api_key) >= 8 else "\0"  # (no short key is blotted)
    err: Any = None
    try:
        data = resp.json()
        err = data.get("error") if isinstance(data, dict) else data
        text = err.get("message") if isinstance(err, dict) else err
    except ValueError:
        text = blot(resp.text, channel)[:200]  # blotted before it is cut
    except (requests.RequestException, Urllib3Error, OSError):
        text = ""
    fields = err if isinstance(err, dict) else {}
    word = {k: v for k in ("type", "code") if isinstance(v := fields.get(k), str)
            and _ERROR_WORD.fullmatch(v) and v not in OPERATORS_CODES and secret not in v}
    param = fields.get("param")
    param = param if isinstance(param, str) and 0 < len(param) <= 200 and param.isprintable() \
        and secret not in param else None
    text = blot(str(text) if text else f"HTTP {status}", channel)[:300]
    message = "Upstream rejected the request: " + text
    kind = {404: UpstreamNotFound, 422: UpstreamUnprocessable}.get(status, UpstreamRefused)
    return kind(message, error_type=word.get("type"), error_code=word.get("code"), param=param)


def iter_sse(resp: requests.Response | UpstreamResponse, channel: Channel) -> Iterator[str]:
    """Yield each SSE event's data as it arrives (app.edges.sse); stops at [DONE] or EOF.

    The channel's key is blotted out of every event (a gateway quoting the request's
    Authorization in an error event must not show it to the developer), whatever relays it.

    After [DONE] (or EOF) the response's close() reads the body's tail (the chunked terminator),
    so the connection goes back to the pool: the next stream reuses it instead of opening
    another (a TCP and, for a real upstream, a TLS handshake before its first token). Callers
    close after their own end has left, so a slow tail never delays it.
    """
    chunks = resp.iter_content(chunk_size=None)
    for data in data_events(chunks):
        yield blot(data, channel)
    if isinstance(resp, UpstreamResponse):
        resp.ended(chunks)
    else:  # requests (a channel behind a proxy): read now; its close() keeps a read body's
        # connection (the proxy's CONNECT tunnel, with HTTPS); urllib3 sets its own timeout
        # again when it reuses it
        sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
        if sock is not None:
            read_tail(sock, chunks, (OSError, Urllib3Error))


class MalformedStream(requests.RequestException):
    """The upstream's stream ended without one JSON object in it: no answer, a broken stream."""


def iter_sse_objects(events: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Yield each SSE event payload that is a JSON object; skip the rest (comments, junk).

    A stream that ends having sent data but not one object raises MalformedStream, which the
    relay answers as a broken stream (an error event), never as an empty success.
    """
    found = junk = False
    for payload in events:
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            junk = True
            continue
        if isinstance(obj, dict):
            found = True
            yield obj
        else:
            junk = True
    if junk and not found:
        raise MalformedStream("the upstream's stream carried no JSON object")


def init_app(app: Any, r: redis.Redis) -> None:
    """Build this process's upstream client and the turns its callers give back while they
    wait on it (app.edges.turns)."""
    settings: Settings = app.config["SETTINGS"]
    turns = app.extensions[TURNS] = Turns(settings.relay.get("turns_per_worker", DEFAULT_TURNS))
    app.extensions[EXTENSION] = Upstream(settings, r, turns)


def get_upstream() -> Upstream:
    """Return the app's upstream client."""
    upstream: Upstream = current.app().extensions[EXTENSION]
    return upstream

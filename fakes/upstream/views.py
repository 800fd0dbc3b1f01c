"""Own the fake upstream's views: routing, chat, completions, embeddings, images, control."""

from __future__ import annotations

import base64
import functools
import itertools
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

from fakes.upstream.answers import (
    _ID_SALT,
    _IDS,
    _MODEL_LIST,
    _TAIL,
    ANSWER_PREFIX,
    EMBEDDING_DIMS,
    MAX_EMBEDDING_DIMS,
    MODEL_CREATED,
    MODELS,
    THOUGHT_PREFIX,
    _content_text,
    _int_param,
    _model,
    _new_id,
    _split,
    _stream_events,
    _texts,
    _usage,
    chat_logprobs,
    count_tokens,
    embedding_bytes,
    make_answer,
    reasoning_fields,
)
from fakes.upstream.behaviour import FakeError, _dumps, _loads, extract_markers
from fakes.upstream.images import _IMAGE_RE, IMAGE_SIZES, png_image
from fakes.upstream.moderation import answer_moderations
from fakes.upstream.protocol import FakeProtocol
from fakes.upstream.responses import (
    answer_responses,
    chat_tool_call,
    check_custom,
    forced_function,
    forced_tool,
)
from fakes.upstream.structured import structured_text
from fakes.upstream.vision import image_tokens


def _reported(usage: dict[str, Any], behaviour: dict[str, Any]) -> dict[str, Any]:
    """Replace usage counts by the ones a prompt_tokens/completion_tokens marker asks for."""
    for name in ("prompt_tokens", "completion_tokens"):
        if name in behaviour:
            usage[name] = behaviour[name]
    return usage


def _wrapped(text: str, columns: int | None) -> str:
    """Return base64 text broken into lines of `columns` (a proxy's MIME wrapping), or as is."""
    if not columns:
        return text
    return "\n".join(text[i:i + columns] for i in range(0, len(text), columns)) + "\n"


class FakeHandler(FakeProtocol):
    """Answer the fake upstream's routes; FakeProtocol does the HTTP."""

    def _dispatch(self, raw: bytes) -> None:
        """Route the request: control endpoints, health, files, then the authenticated API."""
        path = self.path.partition("?")[0]
        if path.startswith("/_fake/"):
            return self._control(path, raw)
        if path == "/healthz":
            return self._send(200, b"ok", b"text/plain; charset=utf-8")
        body: Any = None
        bad_json = False
        if raw:
            try:
                body = _loads(raw)
            except ValueError:
                bad_json = True
        self.server.state.record(
            {"method": self.command, "path": self.path, "headers": self.header_map, "body": body,
             "client_port": self.client_address[1]}  # one per connection: shows reuse
        )
        if self.command in ("GET", "HEAD") and path.startswith("/v1/files/"):
            return self._file(path)
        expected = self.server.state.expected_auth
        if expected is not None and self.lower_headers.get("authorization") != expected:
            raise FakeError(401, "Incorrect API key provided.", code="invalid_api_key")
        handler = self._route(path)
        if self.command == "POST":
            if bad_json or not isinstance(body, dict):
                raise FakeError(400, "We could not parse the JSON body of your request.")
            return handler(body)
        return handler(None)

    def _route(self, path: str) -> Callable[[Any], None]:
        """Return the bound view for the method and path, or raise 404/405."""
        views = _ROUTES.get(path)
        if views is None and path.startswith("/v1/models/"):
            views = {"GET": FakeHandler._model_view, "HEAD": FakeHandler._model_view}
        if views is None:
            raise FakeError(404, f"Invalid URL ({self.command} {path})", code="unknown_url")
        view = views.get(self.command)
        if view is None:
            raise FakeError(405, f"Method {self.command} not allowed on {path}")
        return functools.partial(view, self)

    def _chat(self, body: dict[str, Any]) -> None:
        """Answer POST /v1/chat/completions."""
        model = _model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise FakeError(400, "'messages' must be a non-empty array")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise FakeError(400, "each message must be an object with a 'role'")
        texts = [_content_text(m.get("content")) for m in messages]
        last = next(
            (i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), -1
        )
        said, markers = extract_markers(texts[last]) if last >= 0 else ("", {})
        if markers:
            texts[last] = said
        check_custom(body)
        if forced_tool(body) or forced_function(body):  # a forced call: answer with one
            prompt = sum(map(count_tokens, texts)) + 1 + image_tokens(messages, model)
            return chat_tool_call(self, body, model, said, self._behaviour(markers), prompt)
        doc = structured_text(body.get("response_format"), ANSWER_PREFIX + said)
        self._generate(body, model, said if doc is None else doc, texts, markers, chat=True,
                       images=image_tokens(messages, model), exact=doc is not None)

    def _completions(self, body: dict[str, Any]) -> None:
        """Answer POST /v1/completions."""
        model = _model(body)
        prompts, markers = [], {}
        for text in _texts(body.get("prompt"), "prompt"):
            clean, found = extract_markers(text)
            prompts.append(clean)
            markers.update(found)
        self._generate(body, model, prompts, prompts, markers, chat=False)

    def _generate(
        self, body: dict[str, Any], model: str, said: str | list[str], texts: list[str],
        markers: dict[str, Any], chat: bool, images: int = 0, exact: bool = False,
    ) -> None:  # fmt: skip
        """Answer a chat or completion request, as JSON or as a stream (images: their tokens;
        `exact`: the answer is `said` itself, a structured output)."""
        n = _int_param(body, "n", 1, 128, 1)
        limit = _int_param(body, "max_completion_tokens", 0, 2**63 - 1, None)
        limit = _int_param(body, "max_tokens", 0, 2**63 - 1, limit)
        stream = body.get("stream") is True
        top = _int_param(body, "top_logprobs", 0, 20, 0) if chat and body.get(
            "logprobs") is True else None  # None: no logprobs asked for
        behaviour = self._behaviour(markers)
        if self._apply(behaviour, stream):
            return
        answers = [make_answer(s, behaviour, limit, exact)
                   for s in ([said] if isinstance(said, str) else said)]
        answers = [a for a in answers for _ in range(n)]
        field: str | None = behaviour.get("reasoning") if chat else None
        thought = THOUGHT_PREFIX + (said if isinstance(said, str) else "") if field else ""
        usage = None
        if not behaviour.get("nousage") and "usage" not in behaviour:
            completion = sum(count_tokens("".join(pieces)) for pieces, _ in answers)
            completion += len(answers) * count_tokens(thought)
            usage = _reported(_usage(sum(map(count_tokens, texts)) + 1 + images, completion), behaviour)
        if not chat and body.get("echo") is True:  # the prompt comes back before the answer
            answers = [([p, *pieces], f) for p, (pieces, f) in zip(
                [p for p in said for _ in range(n)], answers, strict=True)]
        prefix, kind = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
        base = {"id": _new_id(prefix), "object": kind, "created": int(time.time()), "model": model}
        if stream:
            options = body.get("stream_options")
            wants_usage = isinstance(options, dict) and options.get("include_usage") is True
            if chat:
                base["object"] = "chat.completion.chunk"
            pieces, finishes = [a[0] for a in answers], [a[1] for a in answers]
            running = bool(behaviour.get("running_usage")) or isinstance(
                options, dict) and wants_usage and options.get("continuous_usage_stats") is True
            events = _stream_events(base, pieces, finishes, usage if wants_usage else None, chat,
                                    running, top, (field, _split(thought)) if field else None)
            if "usage" in behaviour and wants_usage:  # the usage-only chunk, usage as given
                events = itertools.chain(events, [(_TAIL, _dumps(
                    {**base, "choices": [], "usage": behaviour["usage"]}))])
            return self._stream(events, behaviour)
        choices = [
            self._choice(i, "".join(pieces), finish, chat,
                         None if top is None else chat_logprobs(pieces, top))
            for i, (pieces, finish) in enumerate(answers)
        ]
        if field:
            for choice in choices:
                choice["message"].update(reasoning_fields(field, thought))
        base["choices"] = choices
        if usage is not None or "usage" in behaviour:
            base["usage"] = behaviour.get("usage", usage)
        self._send_json(base)

    @staticmethod
    def _choice(index: int, text: str, finish: str, chat: bool,
                probs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Build one non-stream choice (`probs`: a chat choice's logprobs, when asked for)."""
        if chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            return {"index": index, "message": message, "logprobs": probs, "finish_reason": finish}
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}

    def _embeddings(self, body: dict[str, Any]) -> None:
        """Answer POST /v1/embeddings."""
        model = _model(body)
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise FakeError(400, "'encoding_format' must be 'float' or 'base64'")
        dims = min(_int_param(body, "dimensions", 1, 2**63 - 1, EMBEDDING_DIMS),
                   MAX_EMBEDDING_DIMS)  # as many as asked, as OpenAI's 3-small/3-large make
        texts, markers = [], {}
        for text in _texts(body.get("input"), "input"):
            clean, found = extract_markers(text)
            texts.append(clean)
            markers.update(found)
        behaviour = self._behaviour(markers)
        if self._apply(behaviour):
            return
        data = []
        fmt = behaviour.get("vectors", fmt)  # a server that answers one encoding whatever asked
        count = behaviour.get("items", len(texts))
        for index, text in enumerate((texts * count)[:count] if texts else []):
            packed = embedding_bytes(text, dims)
            vector: Any = (
                _wrapped(base64.b64encode(packed).decode("ascii"), behaviour.get("wrap"))
                if fmt == "base64"
                else list(struct.unpack(f"<{dims}f", packed))
            )
            data.append({"object": "embedding", "index": index, "embedding": vector})
        out: dict[str, Any] = {"object": "list", "data": data, "model": model}
        if not behaviour.get("nousage"):
            out["usage"] = _reported(_usage(sum(map(count_tokens, texts)) + 1), behaviour)
        self._send_json(out)

    def _images(self, body: dict[str, Any]) -> None:
        """Answer POST /v1/images/generations."""
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise FakeError(400, "'prompt' must be a non-empty string")
        n = _int_param(body, "n", 1, 10, 1)
        size = body.get("size") or "1024x1024"
        width, _, height = str(size).partition("x")
        dims = (int(width), int(height)) if width.isdigit() and height.isdigit() else (0, 0)
        if dims not in IMAGE_SIZES:
            raise FakeError(400, f"'size' {size!r} is not supported")
        fmt = body.get("response_format") or "url"
        if fmt not in ("url", "b64_json"):
            raise FakeError(400, "'response_format' must be 'url' or 'b64_json'")
        clean, markers = extract_markers(prompt)
        behaviour = self._behaviour(markers)
        if self._apply(behaviour):
            return
        host = self.lower_headers.get("host") or "{}:{}".format(*self.server.server_address[:2])
        # OpenAI revises dall-e-3's prompts only (its answer says how); the others carry none
        revised = {"revised_prompt": clean} if body.get("model") == "dall-e-3" else {}
        data = []
        for i in range(behaviour.get("items", n)):
            rgb = zlib.crc32(f"{clean}#{i}".encode()) & 0xFFFFFF
            if fmt == "b64_json":
                png = _wrapped(base64.b64encode(png_image(*dims, rgb)).decode("ascii"),
                               behaviour.get("wrap"))
                data.append({"b64_json": png, **revised})
            else:
                name = f"img-{dims[0]}x{dims[1]}-{rgb:06x}-{_ID_SALT}{next(_IDS):x}.png"
                data.append({"url": f"http://{host}/v1/files/{name}", **revised})
        self._send_json({"created": int(time.time()), "data": data})

    def _file(self, path: str) -> None:
        """Serve GET /v1/files/img-<W>x<H>-<rgb>-<id>.png, the PNG an image URL names."""
        match = _IMAGE_RE.fullmatch(path)
        dims = (int(match[1]), int(match[2])) if match else (0, 0)
        if match is None or dims not in IMAGE_SIZES:
            raise FakeError(404, f"No such file: {path}", code="not_found")
        self._send(200, png_image(*dims, int(match[3], 16)), b"image/png")

    def _models(self, _body: None) -> None:
        """Answer GET /v1/models."""
        if not self._apply(self._behaviour({})):
            self._send(200, _MODEL_LIST)

    def _model_view(self, _body: None) -> None:
        """Answer GET /v1/models/<id>."""
        name = self.path.partition("?")[0][len("/v1/models/") :]
        if name not in MODELS:
            raise FakeError(404, f"The model '{name}' does not exist", code="model_not_found")
        if not self._apply(self._behaviour({})):
            model = {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "fake"}
            self._send_json(model)

    def _control(self, path: str, raw: bytes) -> None:
        """Serve /_fake/config, /_fake/reset and /_fake/requests (no api key needed)."""
        state = self.server.state
        if path == "/_fake/requests" and self.command == "GET":
            return self._send_json(state.requests())
        if path == "/_fake/config" and self.command == "GET":
            return self._send_json(state.config)
        if path == "/_fake/reset" and self.command == "POST":
            state.reset()
            return self._send_json({"ok": True})
        if path == "/_fake/step" and self.command == "POST":
            state.step()
            return self._send_json({"ok": True})
        if path == "/_fake/config" and self.command == "POST":
            try:
                config = _loads(raw) if raw.strip() else {}
            except ValueError:
                config = None
            if not isinstance(config, dict):
                raise FakeError(400, "the config must be a JSON object")
            return self._send_json({"ok": True, "config": state.configure(config)})
        raise FakeError(404, f"Invalid URL ({self.command} {path})", code="unknown_url")


_ROUTES: dict[str, dict[str, Callable[..., None]]] = {
    "/v1/chat/completions": {"POST": FakeHandler._chat},
    "/v1/completions": {"POST": FakeHandler._completions},
    "/v1/embeddings": {"POST": FakeHandler._embeddings},
    "/v1/images/generations": {"POST": FakeHandler._images},
    "/v1/moderations": {"POST": answer_moderations},
    "/v1/models": {"GET": FakeHandler._models, "HEAD": FakeHandler._models},
    "/v1/responses": {"POST": answer_responses},
}

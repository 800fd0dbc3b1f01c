"""Serve an OpenAI-compatible fake upstream for demos, tests and benchmarks.

Routes: POST /v1/chat/completions, /v1/completions (both also streamed), /v1/embeddings,
/v1/images/generations, /v1/moderations (fakes/upstream/moderation.py); GET /v1/models[/<id>], /v1/files/img-<id>.png (the generated PNGs),
/healthz; control endpoints POST /_fake/config, POST /_fake/reset, POST /_fake/step, GET
/_fake/config and GET /_fake/requests (these and the image files ignore the api key).

Behaviour is steered per request by markers in the last user message, prompt, input or image
prompt (``[[fake:status=500]]``, removed from the echoed text), or for every request by
POST /_fake/config with a JSON object of the same names; a marker wins over the global config:

    status=N       answer HTTP N (400-599) in OpenAI error shape; a 429 carries Retry-After
    retry_after=S  the Retry-After seconds of a 429 (default 1)
    delay=S        sleep S seconds before answering
    nousage        omit usage, also from streams that asked for it with include_usage
    long=N         answer "word0 word1 ... word<N-1>", streamed one word per chunk
    chunk_delay=S  sleep S seconds between stream chunks
    step           hold the answer (a stream: each chunk after the first) until POST /_fake/step
                   lets one go (or STEP_WAIT_S passed): a test paces it by events, not the clock
    cut=N          stream: close the connection after N content chunks (no [DONE], no last chunk)
    items=N        /v1/embeddings, /v1/images/generations: answer N vectors or pictures, however
                   many were asked for
    vectors=F      /v1/embeddings: answer every vector as F (float or base64), whatever
                   encoding_format asked (vLLM and Ollama answer floats to a base64 request)
    wrap=N         base64 answers (b64_json pictures, base64 vectors) broken into lines of N
                   characters ending in a line break, as some proxies wrap base64 (MIME: 76)
    malformed      answer 200 with a body (or, streaming, an event) that is not JSON
    crlf           stream: frame events with CRLF, as sse-starlette does, each JSON payload split
                   over two `data:` lines, with a `retry:` field and `:` comment lines between
    prompt_tokens=V, completion_tokens=V
                   report these usage counts as given (any JSON value: 10**15, 9223372036854775807,
                   -1, 2.5, "3"), whatever was really counted
    usage=V        report the whole usage object as V (any JSON value: {}, null): a stream that
                   asked for include_usage gets it in its usage-only chunk
    flag[=C]       /v1/moderations: flag the input in category C (bare: harassment)
    reasoning[=F]  chat: the answer carries its reasoning ("Thinking about: <said>") before its
                   content, in field F: reasoning_content (bare, DeepSeek's), reasoning, or both
                   (vLLM's); streamed as deltas of it first; counted in the completion tokens
    parallel       chat, a forced tool_choice "required": two calls (the first two function tools,
                   or the first twice), streamed with their deltas interleaved (index 0, 1, 0, 1);
                   the second's arguments {"said": …, "call": 2}, for a strict tool an instance
                   of its parameters

A chat request's usage counts its image_url parts by OpenAI's tile rule (fakes/upstream/vision.py).

POST /v1/responses (OpenAI's Responses API, plain and typed-event streams) and tool calls for
requests that force one are served by fakes/upstream/responses.py.

The HTTP layer is a lean hand-written HTTP/1.1 reader on top of http.server (keep-alive,
Content-Length or chunked bodies, Expect: 100-continue) so the fake stays fast enough to be the
baseline of the relay benchmarks.
"""

from __future__ import annotations

from fakes.upstream.answers import (
    ANSWER_PREFIX,
    EMBEDDING_DIMS,
    MODEL_CREATED,
    MODELS,
    STREAM_PIECES,
    count_tokens,
    embedding_bytes,
    make_answer,
)
from fakes.upstream.behaviour import BEHAVIOURS, FakeError, extract_markers, parse_behaviour
from fakes.upstream.images import IMAGE_SIZES, png_image
from fakes.upstream.protocol import MAX_BODY_BYTES, FakeProtocol
from fakes.upstream.server import (
    MAX_RECORDED,
    FakeServer,
    FakeServer6,
    FakeState,
    FakeUpstream,
    main,
    make_server,
    serve,
)
from fakes.upstream.views import FakeHandler

__all__ = [
    "ANSWER_PREFIX",
    "BEHAVIOURS",
    "EMBEDDING_DIMS",
    "IMAGE_SIZES",
    "MAX_BODY_BYTES",
    "MAX_RECORDED",
    "MODEL_CREATED",
    "MODELS",
    "STREAM_PIECES",
    "FakeError",
    "FakeHandler",
    "FakeProtocol",
    "FakeServer",
    "FakeServer6",
    "FakeState",
    "FakeUpstream",
    "count_tokens",
    "embedding_bytes",
    "extract_markers",
    "main",
    "make_answer",
    "make_server",
    "parse_behaviour",
    "png_image",
    "serve",
]

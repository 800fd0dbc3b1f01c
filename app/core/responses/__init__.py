"""OpenAI's Responses API in pure functions: no I/O, no Flask, no Redis.

    request.py   check a `POST /v1/responses` body and its input items
    tools.py     its client-side tools (function, custom), tool_choice and calls in chat's shapes
    to_chat.py   items → chat messages; the whole request → a chat/completions body (for
                 chat-only upstreams); stored items → a native upstream's input (replay)
    answer.py    the Response object: its skeleton, usage in its shape, a chat completion → Response
    events.py    the typed SSE events: chat stream chunks → the event sequence, SSE framing
    native.py    a native upstream's events renumbered and given this service's response id

The relay view (app/web/relay/responses.py) reserves, calls, settles and stores; this package
only reshapes JSON.
"""

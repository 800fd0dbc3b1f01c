"""The error tree; one handler renders both shapes (the original service's code/msg + OpenAI's).

    ApiError                      status  error.code
    ├── InvalidKey                 401    invalid_api_key
    │   └── UnknownKey             401    invalid_api_key         (names the key checked)
    ├── InvalidRequest             400    invalid_request_error
    │   ├── InvalidParam           400    OpenAI's for the field (invalid_type, invalid_value,
    │   │                                 decimal_above_max_value, array_above_max_length, …)
    │   └── UpstreamRefused        400    the upstream's own    (its 404 and 422 as they came)
    ├── ModelNotFound              404    model_not_found
    ├── InsufficientQuota          429    insufficient_quota      (x-should-retry: false)
    ├── RateLimited                429    rate_limit_exceeded     (Retry-After)
    ├── RequestTooLarge            413    request_too_large
    ├── UpstreamError              502    upstream_error
    │   └── UpstreamTooLarge       502    upstream_error          (x-should-retry: false)
    ├── UpstreamTimeout            504    upstream_timeout
    ├── StoreUnavailable           503    service_unavailable     (wallet cannot be read/written)
    ├── NotFound                   404    not_found               (unknown route)
    └── MethodNotAllowed           405    method_not_allowed
"""

from __future__ import annotations

from typing import Any, ClassVar


class ApiError(Exception):
    """An error answered to a developer in both shapes."""

    status: ClassVar[int] = 500
    code: ClassVar[int] = 50000
    error_code: ClassVar[str] = "internal_error"
    error_type: ClassVar[str] = "api_error"
    default_msg: ClassVar[str] = "服务内部错误"

    def __init__(self, message: str | None = None, *, msg: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        self.message = message or self.default_msg
        self.msg = msg or self.default_msg
        self.param = param
        self.headers = headers or {}
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        """Return the JSON body carrying code/msg and the OpenAI error object."""
        return {
            "code": self.code,
            "msg": self.msg,
            "error": {"message": self.message, "type": self.error_type,
                      "param": self.param, "code": self.error_code},
        }


class InvalidKey(ApiError):
    status, code, error_code = 401, 40101, "invalid_api_key"
    error_type, default_msg = "invalid_request_error", "密钥无效"


class UnknownKey(InvalidKey):
    """A key no account holds (or revoked): the relay names the key it checked, the Bearer one
    or api_secret_key (app/web/relay/common.name_bad_key)."""

    def __init__(self) -> None:
        super().__init__("Incorrect API key provided.", msg="密钥无效")


class InvalidRequest(ApiError):
    status, code, error_code = 400, 40001, "invalid_request_error"
    error_type, default_msg = "invalid_request_error", "请求参数错误"


class InvalidValue(InvalidRequest):
    """A value OpenAI refuses as out of range for the model (`max_tokens` above its output
    cap): OpenAI's `error.code` "invalid_value", the same `code` 40001 as any bad request."""

    error_code = "invalid_value"


class StringTooLong(InvalidRequest):
    """A string longer than OpenAI's documented limit for the field (an image prompt): OpenAI's
    `error.code` "string_above_max_length", the same `code` 40001 as any bad request."""

    error_code = "string_above_max_length"


class InvalidParam(InvalidRequest):
    """A field outside OpenAI's published constraints (app/web/relay/limits.py): OpenAI's own
    `error.code` for the broken constraint (invalid_type, invalid_value,
    integer_above_max_value, string_above_max_length, array_above_max_length, …) and `param`
    naming the field, the same `code` 40001 as any bad request."""

    at = -1  # the index of the array item (or map value) at fault; -1: the field itself

    def __init__(self, message: str, *, error_code: str, param: str, msg: str) -> None:
        super().__init__(message, param=param, msg=msg)
        self.param_code = error_code

    def body(self) -> dict[str, Any]:
        """Return the error body with OpenAI's code for the constraint."""
        out = super().body()
        out["error"]["code"] = self.param_code
        return out


class UpstreamRefused(InvalidRequest):
    """The upstream refused the request itself (its 400 or 422): OpenAI's `type`, `code` and
    `param` reach the client as the upstream sent them, since SDK users branch on them
    (context_length_exceeded, content_policy_violation, unsupported_parameter…)."""

    sent = False  # an earlier channel had the request and timed out: its prompt is billed

    def __init__(self, message: str, *, error_type: str | None = None,
                 error_code: str | None = None, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.upstream_type, self.upstream_code = error_type, error_code

    def body(self) -> dict[str, Any]:
        """Return the error body with the upstream's type and code where it gave them."""
        out = super().body()
        out["error"]["type"] = self.upstream_type or out["error"]["type"]
        out["error"]["code"] = self.upstream_code or out["error"]["code"]
        return out


class UpstreamNotFound(UpstreamRefused):
    """The upstream answered 404 (a model it does not serve…): a 404, as OpenAI's."""

    status, code = 404, 40400


class UpstreamUnprocessable(UpstreamRefused):
    """The upstream answered 422 (a request it parsed but cannot process): a 422, as it said."""

    status, code = 422, 42200


class ModelNotFound(ApiError):
    status, code, error_code = 404, 40401, "model_not_found"
    error_type, default_msg = "invalid_request_error", "模型不存在"


class NotFound(ApiError):
    status, code, error_code = 404, 40400, "not_found"
    error_type, default_msg = "invalid_request_error", "接口不存在"


class MethodNotAllowed(ApiError):
    status, code, error_code = 405, 40500, "method_not_allowed"
    error_type, default_msg = "invalid_request_error", "请求方法不允许"


class InsufficientQuota(ApiError):
    status, code, error_code = 429, 42901, "insufficient_quota"
    error_type, default_msg = "insufficient_quota", "余额不足，请充值"

    def __init__(self, message: str | None = None, **kw: Any) -> None:
        super().__init__(message or "Your balance cannot cover this request. Please recharge.",
                         headers={"x-should-retry": "false"}, **kw)


def go_duration(ms: int) -> str:
    """Format milliseconds as OpenAI does (Go's Duration): 12ms, 1s, 8.64s, 6m0s, 1h0m0s."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    minutes, secs = divmod(ms / 1000, 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


class RateLimited(ApiError):
    status, code, error_code = 429, 42902, "rate_limit_exceeded"
    error_type, default_msg = "requests", "请求过于频繁，请稍后再试"

    def __init__(self, retry_after: int, message: str | None = None,
                 limit: int | None = None) -> None:
        """`limit`: the key's requests a minute, whose window this is: the answer then carries
        OpenAI's x-ratelimit-*-requests headers too (none left, reset when Retry-After says)."""
        headers = {"Retry-After": str(retry_after)}
        if limit:
            headers.update({"x-ratelimit-limit-requests": str(limit),
                            "x-ratelimit-remaining-requests": "0",
                            "x-ratelimit-reset-requests": go_duration(retry_after * 1000)})
        super().__init__(message or f"Rate limit reached. Retry after {retry_after}s.",
                         headers=headers)


class RequestTooLarge(ApiError):
    status, code, error_code = 413, 41301, "request_too_large"
    error_type, default_msg = "invalid_request_error", "请求体过大"


class UpstreamError(ApiError):
    status, code, error_code = 502, 50201, "upstream_error"
    error_type, default_msg = "api_error", "上游服务出错，请稍后再试"


class UpstreamTooLarge(UpstreamError):
    """The upstream wrote an answer longer than the relay reads (ANSWER_LIMIT, 256 MiB: a
    hundred choices of long answers with 20 top_logprobs each): written, and billed by the
    upstream, but never delivered. The request is billed at its bound and not sent to another
    channel, nor retried by the SDKs (it would be written, and billed, again)."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, msg="上游的回答太大，无法转发；已按本次请求的预扣上限计费。请减少 n、"
                                      "max_tokens 或 logprobs，或改用流式请求",
                         headers={"x-should-retry": "false"})


class UpstreamTimeout(ApiError):
    status, code, error_code = 504, 50401, "upstream_timeout"
    error_type, default_msg = "api_error", "上游服务超时，请稍后再试"

    def __init__(self, message: str | None = None, *, sent: bool = False,
                 retry: bool = True) -> None:
        """`sent`: the upstream had the request (it timed out reading the answer); `retry`
        False tells the SDKs not to send it again (x-should-retry: a plain answer that ran out
        of time would run out again, and be billed again)."""
        super().__init__(message, headers=None if retry else {"x-should-retry": "false"})
        self.sent = sent


class ServerBusy(ApiError):
    """This process is at its bound for some costly work: retry shortly."""

    status, code, error_code = 503, 50303, "server_busy"
    error_type, default_msg = "api_error", "服务繁忙，请稍后再试"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class StoreUnavailable(ApiError):
    status, code, error_code = 503, 50301, "service_unavailable"
    error_type, default_msg = "api_error", "服务暂不可用，请稍后再试"

"""Error bodies worded and shaped like the real API's (see docs/simulator.md for the table)."""

from __future__ import annotations

from typing import Any

from .buckets import Rejection, format_duration

ORGANIZATION = "org-simulator"
_RATE_LIMITS_URL = "https://platform.openai.com/account/rate-limits"

NO_API_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer "
    "auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if you're "
    "accessing the API from your browser and are prompted for a username. You can obtain an API key from "
    "https://platform.openai.com/account/api-keys."
)
INSUFFICIENT_QUOTA = (
    "You exceeded your current quota, please check your plan and billing details. For more information on "
    "this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
)
SERVER_ERROR = (
    "The server had an error processing your request. Sorry about that! You can retry your request, or "
    "contact us through our help center at help.openai.com if you keep seeing this error."
)
OVERLOADED = "That model is currently overloaded with other requests. You can retry your request, or contact us through our help center at help.openai.com if the error persists."  # noqa: E501
INVALID_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
    "library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you "
    "have trouble figuring out how to fix this, please contact us through our help center at "
    "help.openai.com.)"
)
MISSING_MODEL = "you must provide a model parameter"
# What a CDN in front of the API answers when the origin is down: HTML, not JSON.
BAD_GATEWAY_HTML = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


def error_body(message: str, type_: str | None, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def invalid_api_key(key: str) -> dict[str, Any]:
    # The real API shows the first and last few characters only.
    shown = f"{key[:3]}*****{key[-4:]}" if len(key) > 8 else "*****"
    message = (
        f"Incorrect API key provided: {shown}. You can find your API key at "
        "https://platform.openai.com/account/api-keys."
    )
    return error_body(message, "invalid_request_error", "invalid_api_key")


def not_found(method: str, path: str) -> dict[str, Any]:
    return error_body(f"Invalid URL ({method} {path})", "invalid_request_error")


def rate_limited(model: str, rejection: Rejection, *, name_wait: bool = True) -> dict[str, Any]:
    """The 429 body for an RPM, TPM or too-large rejection; without ``name_wait``, no "Please try again"."""
    if rejection.kind == "too_large":
        message = (
            f"Request too large for {model} in organization {ORGANIZATION} on tokens per min (TPM): "
            f"Limit {rejection.limit}, Requested {rejection.requested}. The input or output tokens must be "
            f"reduced in order to run successfully. Visit {_RATE_LIMITS_URL} to learn more."
        )
        return error_body(message, "tokens", "rate_limit_exceeded")
    unit = "requests per min (RPM)" if rejection.kind == "requests" else "tokens per min (TPM)"
    wait = f"Please try again in {format_duration(rejection.wait or 0.0)}. " if name_wait else ""
    message = (
        f"Rate limit reached for {model} in organization {ORGANIZATION} on {unit}: Limit {rejection.limit}, "
        f"Used {rejection.used}, Requested {rejection.requested}. {wait}"
        f"Visit {_RATE_LIMITS_URL} to learn more."
    )
    return error_body(message, rejection.kind, "rate_limit_exceeded")


def insufficient_quota() -> dict[str, Any]:
    return error_body(INSUFFICIENT_QUOTA, "insufficient_quota", "insufficient_quota")


def server_error() -> dict[str, Any]:
    return error_body(SERVER_ERROR, "server_error")


def overloaded() -> dict[str, Any]:
    return error_body(OVERLOADED, "server_error", "server_is_overloaded")

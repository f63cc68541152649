"""Engine failures rendered as OpenAI error replies, kind by kind (no sockets)."""

from __future__ import annotations

import json

import pytest

from trio_mapper.engine.core.outcome import Failed
from trio_mapper.engine.fronts.http.errors import SHAPES, render_failure
from trio_mapper.engine.upstream.client import ReplyBody
from trio_mapper.kinds import ErrorKind


@pytest.mark.parametrize(
    ("kind", "status", "code", "retry_after"),
    [
        (ErrorKind.INVALID_REQUEST, 400, "invalid_request", None),
        (ErrorKind.REQUEST_TOO_LARGE, 400, "request_too_large", None),
        (ErrorKind.RATE_LIMITED, 429, "insufficient_quota", None),
        (ErrorKind.OVERLOADED, 503, "overloaded", b"1"),
        (ErrorKind.TIMEOUT, 504, "timeout", b"1"),
        (ErrorKind.SHUTTING_DOWN, 503, "shutting_down", b"1"),
        (ErrorKind.UPSTREAM_UNREACHABLE, 502, "upstream_unreachable", None),
        (ErrorKind.INTERNAL_ERROR, 500, "internal_error", None),
    ],
)
def test_each_engine_kind_has_a_status_a_code_and_retry_advice(
    kind: ErrorKind, status: int, code: str, retry_after: bytes | None
) -> None:
    rendered_status, headers, body = render_failure(Failed(kind=kind, message="why"))
    error = json.loads(body)["error"]
    assert rendered_status == status
    assert error == {"message": "why", "type": SHAPES[kind].type, "param": None, "code": code}
    assert dict(headers).get(b"retry-after") == retry_after
    assert dict(headers).get(b"retry-after-ms") == (retry_after + b"000" if retry_after else None)
    assert dict(headers)[b"x-should-retry"] == (b"true" if retry_after else b"false")


def test_a_refusal_names_the_parameter_at_fault() -> None:
    failed = Failed(kind=ErrorKind.INVALID_REQUEST, message="body.n must be a positive integer", param="n")
    assert json.loads(render_failure(failed)[2])["error"]["param"] == "n"


def test_every_kind_is_rendered() -> None:
    assert set(SHAPES) == set(ErrorKind)


def test_an_upstream_answer_passes_through_with_its_status_and_body() -> None:
    upstream = (
        b'{"error": {"message": "no such model", "type": "invalid_request_error", "param": null, '
        b'"code": "model_not_found"}}'
    )
    failed = Failed(kind=ErrorKind.UPSTREAM_ERROR, message="m", status=404, body=ReplyBody(upstream))
    status, headers, body = render_failure(failed)
    assert (status, body) == (404, upstream)
    assert dict(headers)[b"x-should-retry"] == b"false"


def test_an_html_page_from_a_cdn_becomes_an_openai_error() -> None:
    failed = Failed(kind=ErrorKind.UPSTREAM_ERROR, message="bad gateway", status=502, body=ReplyBody(b"<html>"))
    status, _, body = render_failure(failed)
    assert status == 502 and json.loads(body)["error"]["message"] == "bad gateway"


def test_a_deadline_after_a_retryable_answer_is_a_timeout() -> None:
    failed = Failed(kind=ErrorKind.TIMEOUT, message="late", status=503, body=ReplyBody(b'{"error": {}}'))
    status, _, body = render_failure(failed)
    assert status == 504 and json.loads(body)["error"]["code"] == "timeout"


def test_the_upstream_refusing_the_engines_key_is_a_gateway_error_not_the_clients() -> None:
    upstream = b'{"error": {"message": "Incorrect API key provided: [REDACTED]", "code": "invalid_api_key"}}'
    failed = Failed(
        kind=ErrorKind.UPSTREAM_ERROR, message="check the engine's key", status=401, body=ReplyBody(upstream)
    )
    status, headers, body = render_failure(failed)
    error = json.loads(body)["error"]
    assert status == 502 and error["code"] == "upstream_authentication"
    assert error["message"] == "check the engine's key"
    assert dict(headers)[b"x-should-retry"] == b"false"

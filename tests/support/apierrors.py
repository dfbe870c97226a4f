"""The two APIs' error shapes, asserted exactly, and a raw POST that keeps whatever came back."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp


def assert_openai_error(body: Any, code: str | None = None) -> str:
    """The OpenAI error shape exactly; returns the message."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None
    assert error["code"] == code
    message: str = error["message"]
    return message


def assert_anthropic_error(body: Any, kind: str, code: str | None = None) -> str:
    """The Anthropic error shape exactly (``code`` is our extra field for invalid markers)."""
    assert isinstance(body, dict) and set(body) == {"type", "error"} and body["type"] == "error", body
    error = body["error"]
    assert error["type"] == kind
    assert isinstance(error["message"], str) and error["message"]
    if code is None:
        assert set(error) == {"type", "message"}
    else:
        assert set(error) == {"type", "message", "code"} and error["code"] == code
    message: str = error["message"]
    return message


def assert_error(api: str, status: int, body: Any, code: str | None = None) -> str:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 408: "invalid_request_error", 413: "request_too_large",
             429: "rate_limit_error", 502: "api_error", 503: "overloaded_error"}
    if api == "openai":
        return assert_openai_error(body, code)
    return assert_anthropic_error(body, kinds[status], code)


async def post_raw(http: aiohttp.ClientSession, url: str, data: Any,
                   headers: dict[str, str] | None = None) -> tuple[int, Any, str | None]:
    async with http.post(url, data=data, headers=headers or {}) as response:
        raw = await response.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        return response.status, body, response.headers.get("x-request-id")


async def post_bytes(base_url: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, Any]:
    """A POST written byte for byte on a socket, for header bytes no HTTP client sends (they encode text): the
    status and the JSON (or raw bytes) that came back."""
    host, _, port = base_url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + head +
                     b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        response = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    try:
        return int(status_line.split()[1]), json.loads(payload)
    except ValueError:
        return int(status_line.split()[1]), payload

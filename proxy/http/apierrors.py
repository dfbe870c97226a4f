"""Errors in the calling API's own JSON shape, so SDK clients raise their usual exceptions."""

from __future__ import annotations

from aiohttp import web

from promptcache.proxy.domain.blocks import Api

_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 408: "invalid_request_error", 409: "invalid_request_error", 413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error", 503: "overloaded_error", 504: "api_error",
}
_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 408: "invalid_request_error", 409: "invalid_request_error",
                 413: "invalid_request_error"}
_OPENAI_CODE_TYPES = {"insufficient_quota": "insufficient_quota"}
"""Codes OpenAI gives a type of their own: a used-up quota (our budgets) is ``insufficient_quota`` twice."""


def error_response(api: Api, status: int, message: str, code: str | None = None,
                   request_id: str | None = None) -> web.Response:
    headers = {"x-request-id": request_id} if request_id else None
    if api == "anthropic":
        error = {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}
        if code:
            error["code"] = code
        body: dict[str, object] = {"type": "error", "error": error}
    else:
        kind = _OPENAI_CODE_TYPES.get(code or "") or _OPENAI_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error")
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)

"""docs/design.md#the-admin-server: the usage reports as a read-only JSON endpoint, for dashboards and billing systems.

A small aiohttp server of its own (``promptcache admin``), not a route on the proxies: proxies face tenants and
hold a role that cannot read the ledger, while a report reads every tenant's bill. It serves

- ``GET /v1/usage?by=principal,model&since=T&until=T&principal=P&models=a,b``: the body of
  ``promptcache usage --output json`` for the same query (``principal`` repeatable);
- ``GET /healthz``: ``ok`` without credentials, for probes.

Every other request needs ``Authorization: Bearer <token>``, compared in constant time with the token it was
started with; a missing or wrong one is 401. A bad query is 400 naming the parameter, Postgres unavailable 503;
errors are ``{"error": {"type", "message"}}``.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from promptcache.proxy.storage.errors import IndexUnavailable
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.usage import UsageError, columns, parse, plain, report

_PARAMETERS = frozenset({"by", "since", "until", "principal", "models"})
_DB: web.AppKey[Database] = web.AppKey("db", Database)
_log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, kind: str, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message}}, status=status, headers=headers)


def app(db: Database, token: str) -> web.Application:
    """The admin application over ``db``, accepting ``token``."""
    expected = token.encode()

    @web.middleware
    async def authenticated(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/healthz":
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(errors="replace"), expected):
            return error(401, "authentication_error", "a valid admin token is required (Authorization: Bearer …)",
                         **{"WWW-Authenticate": 'Bearer realm="promptcache-admin"'})
        return await handler(request)

    application = web.Application(middlewares=[authenticated])
    application[_DB] = db
    application.router.add_get("/v1/usage", usage)
    application.router.add_get("/healthz", healthz)
    return application


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def usage(request: web.Request) -> web.Response:
    params = request.query
    unknown = sorted(set(params) - _PARAMETERS)
    if unknown:
        return error(400, "invalid_request_error", f"unknown parameter {unknown[0][:40]!r}: use "
                     f"{', '.join(sorted(_PARAMETERS))}")
    repeated = next((name for name in _PARAMETERS - {"principal"} if len(params.getall(name, [])) > 1), None)
    if repeated is not None:
        return error(400, "invalid_request_error", f"{repeated} is given twice")
    try:
        query = parse(params.get("by", ""), params.get("since"), params.get("until"), params.getall("principal", []),
                      params.get("models"))
        rows = await report(request.app[_DB], query)
    except UsageError as exc:
        return error(400, "invalid_request_error", f"invalid {exc.field}: {exc.detail}")
    except IndexUnavailable as exc:
        _log.warning("usage report failed: %s", exc)
        return error(503, "unavailable", "the ledger cannot be read right now; retry shortly")
    return web.json_response({"columns": list(columns(query)), "rows": [plain(row) for row in rows]})

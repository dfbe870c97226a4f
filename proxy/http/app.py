"""The HTTP surface (docs/design.md#the-request-path): OpenAI and Anthropic endpoints with cache-aware billing.

For each request: authenticate, parse, validate markers (400 before anything is forwarded),
then forward upstream at once while the prefix chain is hashed, counted and looked up
concurrently, bounded by the classify deadline. The bill is settled when the upstream's usage
arrives and committed off the response path, only for a complete 2xx response the client received.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from opentelemetry import trace as trace_api
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST

from promptcache.proxy.config import ModelConfig, ProxyConfig
from promptcache.proxy.domain.blocks import ENDPOINTS, Api
from promptcache.proxy.domain.classify import ChainBlock, Classification, candidates, classify, reads_only
from promptcache.proxy.domain.diagnose import Diagnosis, diagnose
from promptcache.proxy.domain.entries import PRINCIPAL_RULE, Scope, valid_principal
from promptcache.proxy.domain.errors import BadRequest, InvalidCacheControl
from promptcache.proxy.domain.nesting import deeper_than, too_deep
from promptcache.proxy.domain.prepare import Admission, admit, input_tokens
from promptcache.proxy.domain.pricing import Split, Tariff, reconcile
from promptcache.proxy.domain.salt import cache_salt
from promptcache.proxy.domain.steps import run_async
from promptcache.proxy.domain.tokens import BlockCounter
from promptcache.proxy.http import diagnostics, jsonio
from promptcache.proxy.http.apierrors import error_response
from promptcache.proxy.http.authguard import AuthGuard
from promptcache.proxy.http.bodies import BodyTooLarge, UndecodableBody, decoded
from promptcache.proxy.http.gate import ClassifyGate
from promptcache.proxy.http.sse import encode, events
from promptcache.proxy.http.usage import engine_cached, rewrite, upstream_totals
from promptcache.proxy.metrics import Metrics
from promptcache.proxy.routing import Replica, routing_key
from promptcache.proxy.runtime import ModelRuntime, Runtimes
from promptcache.proxy.storage.errors import IndexUnavailable
from promptcache.proxy.storage.ledger import RequestRecord
from promptcache.proxy.storage.requestids import valid_client_id
from promptcache.proxy.storage.secrets import KEY_BYTES
from promptcache.proxy.storage.store import Store
from promptcache.proxy.tracing import Tracing

_log = logging.getLogger("promptcache.proxy")

CLIENT_CLOSED = 499
"""Status logged when the client went away before the response was complete (nginx's convention)."""
ANTHROPIC_VERSION = "2023-06-01"
OVERLOAD_RETRY_AFTER = 1
"""Seconds a shed request is told to wait: the gate's queue drains at hundreds of requests a second."""
REQUEST_ID = web.RequestKey("request_id", str)
class _Reject(Exception):
    """A request the proxy answers itself, in the calling API's error shape."""

    def __init__(self, status: int, message: str, code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.model: str | None = None
        """The served model it was for, once known (never a name the client made up: labels stay bounded)."""


@dataclass
class Exchange:
    """One request in flight: what it asked, what we know so far, and what it will commit."""

    request_id: str
    api: Api
    started_at: datetime
    t0: float
    runtime: ModelRuntime
    scope: Scope
    admission: Admission
    chain: list[ChainBlock] = field(default_factory=list)
    sent: list[str | None] = field(default_factory=list)
    """The client's breakpoint tier per chain block, for the request log."""
    classification: asyncio.Task[Classification | None] | None = None
    asked: diagnostics.Asked | None = None
    """What the client asked cache-miss diagnostics against, if it did."""
    diagnosis: asyncio.Task[Diagnosis] | None = None
    response_id: str | None = None
    """The upstream's id of its answer, for the request log."""
    read_replica: str | None = None
    """The replica that computed the entry this request reads, as the index remembers it."""
    replica: str | None = None
    """The replica that answered."""

    @property
    def model(self) -> ModelConfig:
        return self.runtime.config

    async def settled(self) -> Classification | None:
        """The classification, or None (list price) if there is none or it failed unexpectedly."""
        if self.classification is None:
            return None
        try:
            return await self.classification
        except Exception:
            _log.exception("classification failed; billing list price", extra={"request_id": self.request_id})
            return None


class _MalformedHttp(logging.Filter):
    """aiohttp answers bytes its HTTP parser refuses (a control byte or an 8 KB line in a header, broken chunking)
    with a plain-text 400 before any handler runs, and logs each at ERROR with a traceback. They are a client's
    malformed request, not the proxy's failure: one WARNING line (docs/design.md#request-bodies)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = f"{record.getMessage()}: {type(exc).__name__}: {str(exc.message)[:200]}", ()
            record.exc_info, record.exc_text = None, None
        return True


class Proxy:
    def __init__(self, config: ProxyConfig, store: Store, metrics: Metrics, *, degraded_ok: bool = False,
                 runtimes: Runtimes | None = None, tracing: Tracing | None = None) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.tracing = tracing or Tracing(None)
        self.degraded_ok = degraded_ok
        self.salt_key = secrets.token_bytes(KEY_BYTES)
        """Keys the forwarded ``cache_salt``: this process's own until the database's shared one is read (salts then
        differ between replicas, so KV reuse is lower for a while but never crosses principals)."""
        self.salt_key_shared = False
        self.runtimes = runtimes or Runtimes()
        self.auth_guard = AuthGuard()
        self.gate = self._gate(config)
        self.http: aiohttp.ClientSession | None = None
        self.commits: set[asyncio.Future[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def app(self, *, metrics: bool = True) -> web.Application:
        """The API; ``metrics=False`` leaves /metrics to :meth:`metrics_app` on a port of its own."""
        server_log = logging.getLogger("aiohttp.server")
        if not any(isinstance(f, _MalformedHttp) for f in server_log.filters):
            server_log.addFilter(_MalformedHttp())
        # Bodies are decoded here (bodies.decoded), not by aiohttp: a bad or unknown encoding is the API's 400, and a
        # compressed body cannot expand past the body limit.
        app = web.Application(client_max_size=1024**3, middlewares=[self._request_id],
                              handler_args={"auto_decompress": False,
                                            "keepalive_timeout": self.config.limits.header_timeout_seconds})
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        if metrics:
            app.router.add_get("/metrics", self.metrics_endpoint)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    def metrics_app(self) -> web.Application:
        """/metrics alone (and /healthz, for a probe of that port)."""
        app = web.Application()
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def _startup(self, _: web.Application) -> None:
        self.http = aiohttp.ClientSession(auto_decompress=True)

    async def _cleanup(self, _: web.Application) -> None:
        if self.commits:
            await asyncio.gather(*self.commits, return_exceptions=True)
        if self.http is not None:
            await self.http.close()

    def apply_config(self, config: ProxyConfig, tariffs: Mapping[str, Tariff]) -> None:
        self.runtimes.apply(config, tariffs)
        if (config.limits.classify_concurrency, config.limits.max_queued_classifications) != \
                (self.gate.slots, self.gate.queue_limit):
            self.gate = self._gate(config)  # classifications already waiting finish on the old one
        self.config = config

    def _gate(self, config: ProxyConfig) -> ClassifyGate:
        limits = config.limits
        return ClassifyGate(limits.classify_concurrency, limits.max_queued_classifications, self.metrics)

    @web.middleware
    async def _request_id(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        request[REQUEST_ID] = "req_" + uuid.uuid4().hex
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # the router's own 404 / 405, in the API's shape so SDKs raise their errors
            api: Api = "anthropic" if request.path.startswith("/v1/messages") or \
                "anthropic-version" in request.headers else "openai"
            if exc.status == 405:
                message = f"{request.method} is not allowed on {request.path}"
            else:
                message = (f"no route {request.method} {request.path}: this proxy serves POST /v1/chat/completions,"
                           " POST /v1/responses, POST /v1/messages, POST /v1/messages/count_tokens and GET /v1/models")
            return error_response(api, exc.status, message, None, request[REQUEST_ID])
        if not response.prepared:
            response.headers["x-request-id"] = request[REQUEST_ID]
        return response

    # -- operational endpoints ---------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        """The aliases served on the calling API (Anthropic's SDK sends anthropic-version), in that API's list shape;
        a key is needed, as for the endpoints themselves."""
        api: Api = "anthropic" if "anthropic-version" in request.headers else "openai"
        try:
            await self._principal(request)
        except _Reject as rej:
            return self._rejected(api, request[REQUEST_ID], rej)
        shapes: tuple[Api, ...] = ("anthropic",) if api == "anthropic" else ("openai", "openai-responses")
        aliases = [alias for alias, model in self.config.models.items()
                   if any(served in shapes for served in model.upstream.apis)]
        if api == "anthropic":
            data = [{"type": "model", "id": a, "display_name": a, "created_at": "1970-01-01T00:00:00Z"}
                    for a in aliases]
            return web.json_response({"data": data, "has_more": False, "first_id": aliases[0] if aliases else None,
                                      "last_id": aliases[-1] if aliases else None})
        listing = [{"id": a, "object": "model", "created": 0, "owned_by": "promptcache"} for a in aliases]
        return web.json_response({"object": "list", "data": listing})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        postgres = "up"
        try:
            if self.store.pg is None:
                raise IndexUnavailable("postgres", "not configured")
            await self.store.pg.ping()
        except IndexUnavailable as exc:
            postgres = f"down: {exc}"
        ready = postgres == "up" or self.degraded_ok
        self.metrics.ready.set(1 if ready else 0)
        body = {"status": "ready" if ready else "not ready", "config": self.config.digest[:12],
                "postgres": postgres, "degraded": postgres != "up", "spooled": self.store.spool.count}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- the API endpoints -------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, "openai")

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, "anthropic")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, "openai-responses")

    async def handle(self, request: web.Request, api: Api) -> web.StreamResponse:
        tracer = self.tracing.tracer
        request_id = request[REQUEST_ID]
        with tracer.start_as_current_span(
                f"{request.method} {request.path}", self.tracing.incoming(request.headers), SpanKind.SERVER,
                {"promptcache.request_id": request_id, "promptcache.api": api}) as span:
            response = await self._handle(request, api)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    async def _handle(self, request: web.Request, api: Api) -> web.StreamResponse:
        tracer = self.tracing.tracer
        try:
            with tracer.start_as_current_span("admit", record_exception=False, set_status_on_exception=False) as span:
                try:
                    exchange, body = await self._admit(request, api)
                except _Reject as rej:
                    span.set_attribute("promptcache.rejected", rej.status)
                    raise
        except _Reject as rej:
            return self._rejected(api, request[REQUEST_ID], rej)
        trace_span = trace_api.get_current_span()
        trace_span.set_attribute("promptcache.model", exchange.model.alias)
        trace_span.set_attribute("promptcache.principal", exchange.scope.principal_id)
        request_id = exchange.request_id
        try:
            if body.get("stream") is True:
                return await self._stream(request, exchange, body)
            return await self._complete(request, exchange)
        except Exception:
            _log.exception("unexpected failure", extra={"request_id": request_id})
            if exchange.classification is not None:
                exchange.classification.cancel()
            return error_response(api, 502, "the proxy could not complete this request", None, request_id)

    async def count_tokens(self, request: web.Request) -> web.Response:
        """Anthropic's token counting, answered from the model's tokenizer: no upstream call, nothing billed."""
        limits = self.config.limits
        try:
            await self._principal(request)
            body = await self._body(request, limits.max_body_bytes, limits.body_timeout_seconds)
            runtime = self._runtime(body, "anthropic")
            if runtime.counter is None:
                raise _Reject(400, f"model {runtime.config.alias!r} has no tokenizer configured, so its tokens "
                                   "cannot be counted")
            self._admission(body, "anthropic", runtime.config)  # the markers are checked as for a request
            try:
                tokens = await run_async(input_tokens(body, "anthropic", runtime.counter))
            except BadRequest as exc:
                raise _Reject(400, str(exc)) from None
        except _Reject as rej:
            return self._rejected("anthropic", request[REQUEST_ID], rej)
        self.metrics.requests.labels("anthropic", runtime.config.alias, "count_tokens").inc()
        return web.json_response({"input_tokens": tokens})

    def _admission(self, body: dict[str, Any], api: Api, model: ModelConfig) -> Admission:
        """The body's structure and markers checked (a 400 naming the rule), before anything is forwarded."""
        try:
            return admit(body, api, model.policy, model.upstream.forward_cache_control)
        except InvalidCacheControl as exc:
            self.metrics.markers_rejected.labels(exc.rule).inc()
            raise _Reject(400, str(exc), exc.code) from None
        except BadRequest as exc:
            raise _Reject(400, str(exc)) from None

    def _runtime(self, body: dict[str, Any], api: Api) -> ModelRuntime:
        """The model the body names, served on ``api``."""
        alias = body.get("model")
        if not isinstance(alias, str) or not alias:
            raise _Reject(400, "model must be a non-empty string")
        runtime = self.runtimes.models.get(alias)
        if runtime is None:
            raise _Reject(404, f"model {alias!r} does not exist; see GET /v1/models")
        served = runtime.config.upstream.apis
        if api not in served:
            others = " or ".join(ENDPOINTS[other] for other in served)
            raise _Reject(400, f"model {alias!r} is not served on {ENDPOINTS[api]}; use {others}")
        return runtime

    def _rejected(self, api: Api, request_id: str, rej: _Reject) -> web.Response:
        """A request answered by the proxy itself: counted, logged, in the API's error shape."""
        self.metrics.requests.labels(api, rej.model or "-", "rejected_" + str(rej.status)).inc()
        _log.info("rejected", extra={"request_id": request_id, "status": rej.status, "reason": str(rej)})
        response = error_response(api, rej.status, str(rej), rej.code, request_id)
        if rej.retry_after is not None:
            response.headers["Retry-After"] = str(rej.retry_after)
        return response

    async def _admit(self, request: web.Request, api: Api) -> tuple[Exchange, dict[str, Any]]:
        config = self.config
        principal = await self._principal(request)
        body = await self._body(request, config.limits.max_body_bytes, config.limits.body_timeout_seconds)
        runtime = self._runtime(body, api)
        try:
            return await self._admit_for(request, api, principal, body, runtime)
        except _Reject as rej:
            rej.model = runtime.config.alias
            raise

    async def _admit_for(self, request: web.Request, api: Api, principal: str, body: dict[str, Any],
                         runtime: ModelRuntime) -> tuple[Exchange, dict[str, Any]]:
        """The rest of admission, once the model is known (its rejections are counted under it)."""
        model, alias = runtime.config, runtime.config.alias
        if "stream" in body and not isinstance(body["stream"], bool):
            raise _Reject(400, "stream must be true or false")
        options = body.get("stream_options")
        if api != "anthropic" and options is not None and not isinstance(options, dict):
            raise _Reject(400, "stream_options must be an object")
        admission = self._admission(body, api, model)
        try:
            asked = diagnostics.asked(body, request.headers, api)
        except BadRequest as exc:
            raise _Reject(400, str(exc)) from None
        if runtime.counter is not None and self.gate.full:
            self.metrics.index_fallbacks.labels("shed").inc()
            raise _Reject(429, "the proxy is overloaded; retry shortly", retry_after=OVERLOAD_RETRY_AFTER)
        scope = Scope(principal, alias, runtime.tokenizer_version)
        self._budget(principal, alias)
        await self._client_request_id(request, principal)
        exchange = Exchange(request[REQUEST_ID], api, datetime.now(UTC), time.perf_counter(), runtime, scope,
                            admission, asked=asked)
        return exchange, body

    def _budget(self, principal: str, model: str) -> None:
        """A principal over its monthly budget (as last loaded, never waited for) is refused before anything is
        forwarded (docs/design.md#budgets); before budgets could be read, the request goes ahead: the ledger bills
        it either way."""
        try:
            over = self.store.over_budget(principal)
        except IndexUnavailable:
            self.metrics.index_fallbacks.labels("budget_unknown").inc()
            return
        if over is not None:
            self.metrics.budget_refusals.labels(model).inc()
            raise _Reject(429, f"principal {principal} has used its monthly budget of ${over.monthly} (spent "
                               f"${over.spent} since {over.month:%Y-%m-%d}); it resets at the start of next month "
                               "(UTC) or when the budget is raised", code="insufficient_quota")

    async def _client_request_id(self, request: web.Request, principal: str) -> None:
        """The client's ``x-request-id``, when it is a valid one, becomes the request's id and ledger key; it is
        reserved first, so an id keys one request only (docs/design.md#client-request-ids)."""
        sent = request.headers.get("x-request-id")
        if sent is None or not valid_client_id(sent):
            return
        try:
            free = await self.store.reserve_request_id(sent, principal)
        except IndexUnavailable:
            self.metrics.index_fallbacks.labels("request_id_unreserved").inc()
            return  # ours it is: the response says so
        if not free:
            raise _Reject(409, f"x-request-id {sent} was already used; send a new id with every new request")
        request[REQUEST_ID] = sent

    async def _principal(self, request: web.Request) -> str:
        auth = self.config.auth
        if auth.mode == "header":
            principal = request.headers.get(auth.header, "").strip()
            if not principal:
                raise _Reject(401, f"missing trusted principal header {auth.header}")
            if not valid_principal(principal):
                raise _Reject(401, f"trusted principal header {auth.header}: {PRINCIPAL_RULE}")
            return principal
        key = request.headers.get("x-api-key", "").strip()
        bearer = request.headers.get("authorization", "")
        if not key and bearer.lower().startswith("bearer "):
            key = bearer[7:].strip()
        if not key:
            raise _Reject(401, "missing API key: send Authorization: Bearer <key> or x-api-key")
        if not (key.isascii() and key.isprintable()):
            raise _Reject(401, "invalid API key")  # keys are printable ASCII; this one cannot be any key
        digest = hashlib.sha256(key.encode()).digest()
        address = request.remote or "-"
        if self.store.cached_principal(digest) is None:  # a lookup would be needed: only if it may be worth one
            if self.auth_guard.known_unknown(digest):
                raise _Reject(401, "invalid API key")
            wait = self.auth_guard.retry_after(address)
            if wait is not None:
                self.metrics.auth_throttled.inc()
                raise _Reject(429, f"too many invalid API keys from this address; retry in {wait} s",
                              retry_after=wait)
        try:
            known = await self.store.principal_for_key(key)
        except IndexUnavailable:
            self.metrics.index_fallbacks.labels("auth_unavailable").inc()
            raise _Reject(503, "cannot verify API keys right now; retry shortly") from None
        if known is None:
            self.auth_guard.failed(address, digest)
            raise _Reject(401, "invalid API key")
        return known

    @staticmethod
    async def _body(request: web.Request, limit: int, within: float) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > limit:
            raise _Reject(413, f"request body is larger than the {limit}-byte limit")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(within):
                while size <= limit:  # read() returns what has arrived so far, not n bytes
                    chunk = await request.content.read(limit + 1 - size)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
        except TimeoutError:
            raise _Reject(408, f"request body not received within {within:g} s") from None
        if size > limit:
            raise _Reject(413, f"request body is larger than the {limit}-byte limit")
        try:
            raw = decoded(b"".join(chunks), request.headers.get("Content-Encoding", ""), limit)
        except BodyTooLarge as exc:
            raise _Reject(413, str(exc)) from None
        except UndecodableBody as exc:
            raise _Reject(400, str(exc)) from None
        try:
            body = jsonio.loads_text(raw)
        except jsonio.UnpairedSurrogate as exc:
            raise _Reject(400, f"request body {exc}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Reject(400, f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise _Reject(400, f"request body is {too_deep()}") from None
        if not isinstance(body, dict):
            raise _Reject(400, "request body must be a JSON object")
        if deeper_than(body):
            raise _Reject(400, f"request body is {too_deep()}")
        return body

    # -- classification, concurrent with the upstream call ----------------------------------

    def _start_classification(self, ex: Exchange) -> None:
        if ex.runtime.counter is None:
            self.metrics.index_fallbacks.labels("no_tokenizer").inc()
        else:
            ex.classification = asyncio.create_task(self._classify(ex))
        if ex.asked is not None:
            ex.diagnosis = asyncio.create_task(self._diagnose(ex, ex.asked))

    async def _diagnose(self, ex: Exchange, asked: diagnostics.Asked) -> Diagnosis:
        """Why this request did not read what the one it names wrote: once it is classified, from the two chains."""
        if asked.previous is None:
            return Diagnosis(None)  # asked on a first turn: nothing to compare with yet
        classification = await ex.settled()
        try:
            previous = await self.store.previous_request(ex.scope.principal_id, asked.previous)
        except IndexUnavailable:
            return Diagnosis("unavailable")
        read = classification.read_tokens if classification is not None else None
        return diagnose(ex.chain, read, ex.model.alias, previous, ex.model.policy, ex.started_at)

    async def diagnostics_field(self, ex: Exchange) -> tuple[str, dict[str, Any]] | None:
        """The diagnostics field for the response, when asked for; never fails the answer."""
        if ex.diagnosis is None:
            return None
        try:
            diagnosis = await ex.diagnosis
        except Exception:
            _log.exception("diagnostics failed", extra={"request_id": ex.request_id})
            diagnosis = Diagnosis("unavailable")
        return diagnostics.rendered(ex.api, diagnosis)

    async def _classify(self, ex: Exchange) -> Classification | None:
        """The cache split, or None (list price) when the index fails or the deadline passes."""
        counter = ex.runtime.counter
        assert counter is not None
        # Hashing takes a core: start it a moment after the forward, so it overlaps the model's latency
        # instead of competing with the request's upload or the upstream reading it, and in steps, so
        # a large body still uploading is not held up.
        if not ex.runtime.router.waits:  # a request routed by its lookup is not sent before it: nothing to overlap
            await asyncio.sleep(self.config.limits.classify_start_delay_seconds)
        async with self.gate.turn():
            return await self._classify_now(ex, counter)

    async def _classify_now(self, ex: Exchange, counter: BlockCounter) -> Classification | None:
        """Classification in its turn; the deadline counts from here, not from the wait for the turn."""
        with self.tracing.tracer.start_as_current_span("classify") as span:
            result = await self._classified(ex, counter)
            span.set_attribute("promptcache.chain_blocks", len(ex.chain))
            if result is None:
                span.set_attribute("promptcache.list_price", True)
            else:
                span.set_attribute("promptcache.read_tokens", result.read_tokens)
            return result

    async def _classified(self, ex: Exchange, counter: BlockCounter) -> Classification | None:
        start = time.perf_counter()  # classify_seconds: the work (hash, count, look up), not the wait for it
        prepared = await run_async(ex.admission.preparing(counter))
        ex.chain, ex.sent = prepared.chain or [], prepared.sent
        policy = ex.model.policy
        wanted = candidates(ex.chain, policy)
        if not wanted:
            return classify(ex.chain, {}, policy, ex.started_at)
        deadline = self.config.limits.classify_deadline_seconds - (time.perf_counter() - start)
        lookup_start = time.perf_counter()
        # Shielded, and cancelled without waiting on it: a cancelled query's connection clean-up
        # (asyncpg waits for the server to acknowledge the cancel) must not hold the bill past the deadline.
        with self.tracing.tracer.start_as_current_span("lookup", record_exception=False) as span:
            span.set_attribute("promptcache.candidates", len(wanted))
            lookup = asyncio.ensure_future(self.store.lookup(ex.scope, wanted, ex.started_at))
            try:
                async with asyncio.timeout(max(deadline, 0.0)):
                    found = await asyncio.shield(lookup)
            except TimeoutError:
                self.metrics.index_fallbacks.labels("deadline").inc()
                span.set_attribute("promptcache.fallback", "deadline")
                return None
            except IndexUnavailable as exc:
                self.metrics.index_fallbacks.labels(exc.reason).inc()
                span.set_attribute("promptcache.fallback", exc.reason)
                return None
            finally:
                lookup.cancel()
        self.metrics.lookup_seconds.observe(time.perf_counter() - lookup_start)
        result = classify(ex.chain, found.entries, policy, ex.started_at)
        if result.read is not None:
            ex.read_replica = found.entries[result.read.hash].replica
        if not found.complete:
            result = reads_only(result)
        self.metrics.classify_seconds.observe(time.perf_counter() - start)
        return result

    # -- upstream ----------------------------------------------------------------------------

    def _upstream_request(self, ex: Exchange, request: web.Request, data: bytes, base: str) -> Any:
        up = ex.model.upstream
        headers = {"content-type": "application/json"}
        secret = os.environ.get(up.api_key_env) if up.api_key_env else None
        if ex.api == "anthropic":
            headers["anthropic-version"] = request.headers.get("anthropic-version", ANTHROPIC_VERSION)
            if "anthropic-beta" in request.headers:
                headers["anthropic-beta"] = request.headers["anthropic-beta"]
            if secret:
                headers["x-api-key"] = secret
        elif secret:
            headers["authorization"] = f"Bearer {secret}"
        self.tracing.outgoing(request.headers, headers)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10,
                                        sock_read=self.config.limits.upstream_timeout_seconds)
        assert self.http is not None
        return self.http.post(up.endpoint(ex.api, base), data=data, headers=headers, timeout=timeout)

    @contextlib.asynccontextmanager
    async def _upstream(self, ex: Exchange, request: web.Request,
                        body: dict[str, Any]) -> AsyncIterator[aiohttp.ClientResponse]:
        """The upstream's response, in the upstream span (a client span: its context is the one the upstream gets),
        from the replica routing chose (docs/design.md#replica-routing)."""
        router = ex.runtime.router
        preferred, key = await self._route_hint(ex, body) if router.waits else (None, None)
        attributes = {"promptcache.upstream_model": ex.model.upstream.model}
        with self.tracing.tracer.start_as_current_span("upstream", kind=SpanKind.CLIENT, attributes=attributes,
                                                       record_exception=False) as span:
            upstream, replica = await self._connect(ex, request, jsonio.dumps(body), preferred, key)
            span.set_attribute("server.address", replica.url)
            try:
                async with upstream:
                    span.set_attribute("http.response.status_code", upstream.status)
                    yield upstream
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError,
                    ConnectionResetError):
                self._replica_failed(ex, replica)
                raise
            finally:
                self._in_flight(ex, replica, -1)

    async def _route_hint(self, ex: Exchange, body: dict[str, Any]) -> tuple[str | None, bytes | None]:
        """The replica of the entry the request reads, else the ring key of its first write; (None, None) when
        it does neither (or could not be classified): the least-loaded replica takes it."""
        result = await ex.settled()
        if result is None:
            return None, None
        if result.read is not None and ex.read_replica is not None:
            return ex.read_replica, None
        if not result.writes:
            return None, None
        salt = body.get("cache_salt")
        return None, routing_key(result.writes[0].hash, ex.scope.principal_id, ex.admission.cache_key,
                                 salt if isinstance(salt, str) else None)

    async def _connect(self, ex: Exchange, request: web.Request, data: bytes, preferred: str | None,
                       key: bytes | None) -> tuple[aiohttp.ClientResponse, Replica]:
        """The response head from the chosen replica; one that refuses the connection, or drops it before
        answering, is passed over and the next choice tried at once (it never saw the request, or never answered
        it: nothing is billed for it), until every replica has failed this request."""
        router, alias = ex.runtime.router, ex.model.alias
        tried: list[Replica] = []
        while True:
            route = router.choose(preferred, key, exclude=tried)
            replica = route.replica
            self.metrics.routes.labels(alias, replica.url, route.decision).inc()
            if route.fallback is not None:
                self.metrics.routing_fallbacks.labels(alias, route.fallback).inc()
            self._in_flight(ex, replica, 1)
            try:
                try:
                    upstream: aiohttp.ClientResponse = await self._upstream_request(ex, request, data, replica.url)
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                    if isinstance(exc, aiohttp.ClientConnectorError):
                        raise
                    # Closed or reset before the head: a pooled keep-alive connection the server had closed, or
                    # a server that died holding the request. Once more on a new connection tells them apart.
                    upstream = await self._upstream_request(ex, request, data, replica.url)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                self._in_flight(ex, replica, -1)
                self._replica_failed(ex, replica)
                tried.append(replica)
                if len(tried) >= len(router.replicas):
                    raise
                continue
            router.answered(replica)
            ex.replica = replica.url
            return upstream, replica

    def _in_flight(self, ex: Exchange, replica: Replica, change: int) -> None:
        """The bounded load's count, and its gauge, as a request to ``replica`` starts (1) or ends (-1)."""
        replica.in_flight += change
        self.metrics.replica_in_flight.labels(ex.model.alias, replica.url).inc(change)

    def _replica_failed(self, ex: Exchange, replica: Replica) -> None:
        ex.runtime.router.failed(replica)
        self.metrics.replica_failures.labels(ex.model.alias, replica.url).inc()

    def _forward_body(self, ex: Exchange) -> dict[str, Any]:
        body = dict(ex.admission.forward)
        body["model"] = ex.model.upstream.model
        if ex.api == "openai" and body.get("stream") is True:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        if ex.api == "anthropic":
            body.pop("diagnostics", None)  # ours to answer, not the upstream's
        if ex.model.upstream.cache_salt == "principal":  # ours replaces any the client sent: isolation is not theirs
            body["cache_salt"] = cache_salt(self.salt_key, ex.scope)
        return body

    async def _upstream_failed(self, ex: Exchange, status: int, message: str) -> web.Response:
        self._finish(ex, status, None, "upstream_" + str(status))
        return error_response(ex.api, status, message, None, ex.request_id)

    async def _complete(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        forward = self._forward_body(ex)
        self._start_classification(ex)
        try:
            sent = time.perf_counter()
            async with self._upstream(ex, request, forward) as upstream:
                raw = await upstream.read()
                status = upstream.status
                upstream_took = time.perf_counter() - sent
        except TimeoutError:
            return await self._upstream_failed(ex, 504, "the upstream model timed out")
        except aiohttp.ClientError as exc:
            return await self._upstream_failed(ex, 502, f"the upstream model is unreachable: {exc}")
        self.metrics.upstream_seconds.labels(ex.model.alias).observe(time.perf_counter() - ex.t0)
        if status >= 300:
            return await self._relay_error(ex, status, raw)
        try:
            data = jsonio.loads(raw)
        except ValueError:
            return await self._upstream_failed(ex, 502, "the upstream model answered with invalid JSON")
        totals = upstream_totals(data.get("usage") if isinstance(data, dict) else None, ex.api)
        if totals is None:
            self._finish(ex, 502, None, "no_usage")
            return error_response(ex.api, 502, "the upstream model reported no usage", None, ex.request_id)
        split = reconcile(*totals, await ex.settled())
        engine = engine_cached(data, ex.api)
        data["usage"] = rewrite(split, data["usage"], ex.api)
        ex.response_id = diagnostics.response_id(data.get("id"))
        if "model" in data:
            data["model"] = ex.model.alias  # the name the client asked for, not the upstream's
        extra = await self.diagnostics_field(ex)
        if extra is not None:
            data[extra[0]] = extra[1]
        if request.transport is None or request.transport.is_closing():
            self._finish(ex, CLIENT_CLOSED, None, "client_disconnect")
            return web.Response(status=CLIENT_CLOSED)
        response = web.Response(body=jsonio.dumps(data), content_type="application/json",
                                headers={"x-request-id": ex.request_id})
        try:
            await response.prepare(request)
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            self._finish(ex, CLIENT_CLOSED, None, "client_disconnect")
            return response
        self.metrics.added_seconds.labels(ex.model.alias).observe(time.perf_counter() - ex.t0 - upstream_took)
        self._finish(ex, 200, split, "ok", engine)  # after the answer is out: the commit never delays it
        return response

    async def _relay_error(self, ex: Exchange, status: int, raw: bytes) -> web.Response:
        """An upstream 4xx is the client's business (passed through); a 5xx is a bad gateway."""
        if ex.classification is not None:
            ex.classification.cancel()
        if status < 500:
            self._finish(ex, status, None, "upstream_" + str(status))
            return web.Response(status=status, body=raw, content_type="application/json",
                                headers={"x-request-id": ex.request_id})
        detail = raw[:500].decode("utf-8", errors="replace")
        return await self._upstream_failed(ex, 502, f"the upstream model failed with HTTP {status}: {detail}")

    async def _stream(self, request: web.Request, ex: Exchange, body: dict[str, Any]) -> web.StreamResponse:
        options = body.get("stream_options")
        wants_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        forward = self._forward_body(ex)
        response: web.StreamResponse | None = None
        status, split, outcome = 502, None, "upstream_disconnect"
        self._start_classification(ex)
        try:
            sent = time.perf_counter()
            async with self._upstream(ex, request, forward) as upstream:
                head = time.perf_counter()
                self.metrics.upstream_seconds.labels(ex.model.alias).observe(head - ex.t0)
                if upstream.status >= 300:
                    return await self._relay_error(ex, upstream.status, await upstream.read())
                if request.transport is None or request.transport.is_closing():  # gone before the first byte
                    self._finish(ex, CLIENT_CLOSED, None, "client_disconnect")
                    return web.Response(status=CLIENT_CLOSED)
                response = web.StreamResponse(headers={
                    "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "x-request-id": ex.request_id})
                await response.prepare(request)
                self.metrics.added_seconds.labels(ex.model.alias).observe(time.perf_counter() - ex.t0 - (head - sent))
                rewriter = _StreamRewriter(self, ex, wants_usage)
                async for event in events(upstream.content):
                    out = await rewriter.rewrite(event)
                    if out:
                        try:
                            await response.write(out)
                        except (ConnectionError, aiohttp.ClientConnectionResetError):
                            status, outcome = CLIENT_CLOSED, "client_disconnect"
                            break
                else:
                    if rewriter.complete:
                        status, split, outcome = 200, rewriter.split, "ok"
        except TimeoutError:
            status, outcome = 504, "upstream_timeout"
        except (aiohttp.ClientError, ConnectionError) as exc:
            if response is None:
                return await self._upstream_failed(ex, 502, f"the upstream model is unreachable: {exc}")
        if response is None:
            return await self._upstream_failed(ex, status, "the upstream model timed out")
        if status != 200 and status != CLIENT_CLOSED:
            with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
                await response.write(_stream_error(ex.api, "the upstream stream ended before it completed"))
        self._finish(ex, status, split, outcome, rewriter.engine_cached if split is not None else None)
        with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
            await response.write_eof()
        return response

    # -- settling ----------------------------------------------------------------------------

    def _finish(self, ex: Exchange, status: int, split: Split | None, outcome: str,
                engine_cached_tokens: int | None = None) -> None:
        """Record the outcome and commit in the background: billed only for a complete 2xx with usage."""
        model = ex.model.alias
        self.metrics.requests.labels(ex.api, model, outcome).inc()
        if ex.diagnosis is not None and not ex.diagnosis.done():
            ex.diagnosis.cancel()  # nothing will read it now
        classification: Classification | None = None
        if split is None:
            split = Split(0, 0)
            if ex.classification is not None and not ex.classification.done():
                ex.classification.cancel()
        elif ex.classification is not None and ex.classification.done() and not ex.classification.cancelled():
            classification = ex.classification.result()
        record = RequestRecord(
            request_id=ex.request_id, started_at=ex.started_at, scope=ex.scope, api=ex.api, status=status,
            split=split, tariff=ex.runtime.tariff, chain=ex.chain, sent_tiers=ex.sent if ex.chain else None,
            classification=classification if split.cache_valid else None,
            latency_ms=(time.perf_counter() - ex.t0) * 1000, engine_cached_tokens=engine_cached_tokens,
            prompt_cache_key=ex.admission.cache_key, response_id=ex.response_id, replica=ex.replica,
        )
        if record.billable:
            self.metrics.read_tokens.labels(model).inc(split.read)
            if engine_cached_tokens is not None:
                self.metrics.engine_cached_tokens.labels(model).inc(engine_cached_tokens)
            if not split.cache_valid or split.scaled:
                self.metrics.billing_caps.labels(model, "scaled" if split.cache_valid else "list_price").inc()
            for tier, tokens in split.creation.items():
                if tokens:
                    self.metrics.creation_tokens.labels(model, tier).inc(tokens)
            self.metrics.billed_cost.labels(model).inc(float(record.cost))
            self.metrics.list_cost.labels(model).inc(float(record.list_cost))
            self.metrics.prompt_tokens.labels(model).inc(split.prompt)
            self.metrics.billed_requests.labels(model, "hit" if split.read else "miss").inc()
            self.metrics.principal_cost.labels(ex.scope.principal_id).inc(float(record.cost))
            self.metrics.principal_list_cost.labels(ex.scope.principal_id).inc(float(record.list_cost))
        _log.info("request", extra={
            "request_id": ex.request_id, "principal": ex.scope.principal_id, "model": model, "status": status,
            "outcome": outcome, "prompt_tokens": split.prompt, "read_tokens": split.read,
            "creation_tokens": split.creation_tokens, "engine_cached_tokens": engine_cached_tokens,
            "cost": str(record.cost) if record.billable else None,
        })
        span = self.tracing.tracer.start_span("commit", attributes={
            "promptcache.billable": record.billable, "promptcache.prompt_tokens": split.prompt,
            "promptcache.read_tokens": split.read})
        task = self.store.submit(record)
        self.commits.add(task)
        task.add_done_callback(self.commits.discard)
        task.add_done_callback(lambda _: span.end())  # when the row landed or was spooled, after the answer


class _StreamRewriter:
    """Rewrites the usage-bearing events of a stream; everything else passes byte for byte."""

    def __init__(self, proxy: Proxy, ex: Exchange, wants_usage: bool) -> None:
        self.proxy = proxy
        self.ex = ex
        self.wants_usage = wants_usage
        self.alias = ex.model.alias if ex.model.alias != ex.model.upstream.model else None
        """Replaces the upstream's model name in every event that carries one; None when they are the same."""
        self.prompt: int | None = None
        self.split: Split | None = None
        self.complete = False
        self.engine_cached: int | None = None
        """The upstream's own cache count, from whichever event reported it last."""

    async def rewrite(self, event: Any) -> bytes | None:
        if self.ex.api == "openai":
            return await self._openai(event)
        if self.ex.api == "openai-responses":
            return await self._responses(event)
        return await self._anthropic(event)

    def _renames(self, event: Any) -> bool:
        return self.alias is not None and event.data is not None and '"model"' in event.data

    async def _openai(self, event: Any) -> bytes | None:
        if event.data == "[DONE]":
            self.complete = self.split is not None
            return bytes(event.raw)
        renames = self._renames(event)
        if not renames and (event.data is None or '"usage"' not in event.data):
            return bytes(event.raw)
        chunk = event.json()
        if not isinstance(chunk, dict):
            return bytes(event.raw)
        if renames and "model" in chunk:
            chunk["model"] = self.alias
        self.ex.response_id = self.ex.response_id or diagnostics.response_id(chunk.get("id"))
        totals = upstream_totals(chunk["usage"], "openai") if chunk.get("usage") else None
        if totals is None:
            return encode(event.name, chunk) if renames else bytes(event.raw)
        self.engine_cached = engine_cached(chunk, "openai")
        self.split = reconcile(*totals, await self.ex.settled())
        if not self.wants_usage:
            if not chunk.get("choices"):
                return None
            chunk.pop("usage")
            return encode(event.name, chunk)
        chunk["usage"] = rewrite(self.split, chunk["usage"], "openai")
        extra = await self.proxy.diagnostics_field(self.ex)
        if extra is not None:
            chunk[extra[0]] = extra[1]
        return encode(event.name, chunk)

    async def _responses(self, event: Any) -> bytes | None:
        """Every event that carries the response names the alias; the terminal one carries the usage we bill.
        ``response.incomplete`` (the output limit was reached) is an answer as ``response.completed`` is."""
        renames = self._renames(event)
        if not renames and (event.data is None or '"usage"' not in event.data):
            return bytes(event.raw)
        payload = event.json()
        response = payload.get("response") if isinstance(payload, dict) else None
        if not isinstance(response, dict):
            return bytes(event.raw)
        if renames and "model" in response:
            response["model"] = self.alias
        self.ex.response_id = self.ex.response_id or diagnostics.response_id(response.get("id"))
        totals = upstream_totals(response.get("usage"), "openai-responses") \
            if payload.get("type") in ("response.completed", "response.incomplete") else None
        if totals is not None:
            self.engine_cached = engine_cached(response, "openai-responses")
            self.split = reconcile(*totals, await self.ex.settled())
            response["usage"] = rewrite(self.split, response["usage"], "openai-responses")
            extra = await self.proxy.diagnostics_field(self.ex)
            if extra is not None:
                response[extra[0]] = extra[1]
            self.complete = True
        return encode(event.name, payload)

    async def _anthropic(self, event: Any) -> bytes | None:
        if event.name == "message_stop":
            self.complete = self.split is not None
            return bytes(event.raw)
        if event.name not in ("message_start", "message_delta"):
            return bytes(event.raw)
        payload = event.json()
        if not isinstance(payload, dict):
            return bytes(event.raw)
        if event.name == "message_start":
            message = payload.get("message")
            if not isinstance(message, dict):
                return bytes(event.raw)
            renamed = self._renames(event) and "model" in message
            if renamed:
                message["model"] = self.alias
            self.ex.response_id = diagnostics.response_id(message.get("id"))
            extra = await self.proxy.diagnostics_field(self.ex)  # held for it only when asked for
            if extra is not None:
                message[extra[0]] = extra[1]
                renamed = True
            usage = message.get("usage")
            totals = upstream_totals(usage, "anthropic")
            if totals is None:
                return encode(event.name, payload) if renamed else bytes(event.raw)
            self.prompt = totals[0]
            self.engine_cached = engine_cached(message, "anthropic")
            task = self.ex.classification
            ready = task is not None and task.done() and not task.cancelled()
            early = reconcile(totals[0], totals[1], task.result() if ready and task is not None else None)
            message["usage"] = rewrite(early, usage, "anthropic")
            if not ready:
                # Not held back for the lookup: the split follows in message_delta. Its per-tier breakdown
                # is left out here, since the SDK keeps message_start's and would show zeros.
                message["usage"]["cache_creation"] = None
            return encode(event.name, payload)
        usage = payload.get("usage")
        if self.prompt is None or not isinstance(usage, dict):
            return bytes(event.raw)
        completion = usage.get("output_tokens")
        if not isinstance(completion, int) or isinstance(completion, bool) or completion < 0:
            return bytes(event.raw)
        self.engine_cached = engine_cached(payload, "anthropic") if "cache_read_input_tokens" in usage \
            else self.engine_cached
        self.split = reconcile(self.prompt, completion, await self.ex.settled())
        payload["usage"] = rewrite(self.split, usage, "anthropic")
        return encode(event.name, payload)


def _stream_error(api: Api, message: str) -> bytes:
    if api == "anthropic":
        return encode("error", {"type": "error", "error": {"type": "api_error", "message": message}})
    return encode(None, {"error": {"message": message, "type": "server_error", "param": None, "code": None}})

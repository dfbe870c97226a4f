"""OpenTelemetry spans (docs/design.md#traces), recorded by the SDK's in-memory exporter: the tree a request makes,
its attributes, the trace context the client sent and the one the upstream receives, and tracing off."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anthropic
import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from promptcache.proxy.testing.simulator import Simulator
from promptcache.proxy.tracing import provider_from_env

from support.conversation import EXPECTED, openai_turns
from support.proxy import RunningProxy, model_config, new_key, running_proxy, settle, unique

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path,
                 exporter: InMemorySpanExporter) -> AsyncIterator[RunningProxy]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = {"models": [model_config("chat", simulator[0] + "/v1", "openai", word_tokenizer, enabledTtls=["5m", "1h"]),
                         model_config("claude", simulator[0], "anthropic", word_tokenizer)]}
    async with running_proxy(config, tmp_path, pg_dsn, tracer_provider=provider) as proxy:
        yield proxy


def tree(spans: tuple[ReadableSpan, ...]) -> dict[str, list[str]]:
    """Each span's name with the names of its children (sorted), for spans of one trace."""
    by_id = {span.context.span_id: span for span in spans}
    children: dict[str, list[str]] = {span.name: [] for span in spans}
    for span in spans:
        if span.parent is not None and span.parent.span_id in by_id:
            children[by_id[span.parent.span_id].name].append(span.name)
    return {name: sorted(kids) for name, kids in children.items()}


async def test_a_request_is_one_span_tree_that_joins_the_clients_trace_and_reaches_the_upstream(
        traced: RunningProxy, exporter: InMemorySpanExporter, pg_dsn: str, simulator: tuple[str, Simulator]) -> None:
    principal = unique("trace")
    key = await new_key(pg_dsn, principal)
    client = openai.AsyncOpenAI(base_url=traced.url + "/v1", api_key=key, max_retries=0,
                                default_headers={"traceparent": TRACEPARENT})
    turns = openai_turns()
    await client.chat.completions.create(model="chat", messages=turns[0])  # type: ignore[arg-type]
    await settle(traced)
    exporter.clear()
    raw = await client.chat.completions.with_raw_response.create(model="chat", messages=turns[1])  # type: ignore[arg-type]
    request_id = raw.headers["x-request-id"]
    await settle(traced)

    spans = exporter.get_finished_spans()
    assert {span.context.trace_id for span in spans} == {int(CLIENT_TRACE, 16)}  # all in the client's trace
    assert tree(spans) == {"POST /v1/chat/completions": ["admit", "classify", "commit", "upstream"],
                           "admit": [], "classify": ["lookup"], "lookup": [], "upstream": [], "commit": []}
    named = {span.name: span for span in spans}
    root = named["POST /v1/chat/completions"]
    assert root.parent is not None and root.parent.span_id == int(CLIENT_SPAN, 16) and root.parent.is_remote
    assert root.kind == SpanKind.SERVER and named["upstream"].kind == SpanKind.CLIENT
    assert dict(root.attributes or {}) == {
        "promptcache.request_id": request_id, "promptcache.api": "openai", "promptcache.model": "chat",
        "promptcache.principal": principal,
        "http.response.status_code": 200}
    prompt, _, read, *_ = EXPECTED[1]
    assert dict(named["classify"].attributes or {}) == {"promptcache.chain_blocks": 4, "promptcache.read_tokens": read}
    assert dict(named["lookup"].attributes or {}) == {"promptcache.candidates": 4}
    assert dict(named["commit"].attributes or {}) == {
        "promptcache.billable": True, "promptcache.prompt_tokens": prompt, "promptcache.read_tokens": read}
    upstream = named["upstream"]
    assert dict(upstream.attributes or {})["http.response.status_code"] == 200
    # the upstream was sent the upstream span's context: a model server that traces continues this trace
    sent = f"00-{CLIENT_TRACE}-{upstream.context.span_id:016x}-01"
    assert simulator[1].trace_contexts.count(sent) == 1
    began = root.start_time
    assert began is not None
    assert all(span.end_time is not None and span.start_time is not None and span.start_time >= began
               for span in spans)


async def test_a_streamed_request_and_a_rejection(traced: RunningProxy, exporter: InMemorySpanExporter,
                                                  pg_dsn: str) -> None:
    key = await new_key(pg_dsn, unique("trace"))
    client = anthropic.AsyncAnthropic(base_url=traced.url, api_key=key, max_retries=0)
    async with client.messages.stream(model="claude", max_tokens=8,
                                      messages=[{"role": "user", "content": "hello there"}]) as stream:
        await stream.get_final_message()
    await settle(traced)
    spans = exporter.get_finished_spans()
    assert len({span.context.trace_id for span in spans}) == 1  # no client context: a trace of its own
    assert tree(spans)["POST /v1/messages"] == ["admit", "classify", "commit", "upstream"]
    [root] = [span for span in spans if span.parent is None]
    assert root.attributes is not None and root.attributes["promptcache.model"] == "claude"

    exporter.clear()
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(model="nope", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    spans = exporter.get_finished_spans()
    assert tree(spans) == {"POST /v1/messages": ["admit"], "admit": []}
    named = {span.name: span for span in spans}
    assert dict(named["admit"].attributes or {}) == {"promptcache.rejected": 404}
    assert dict(named["POST /v1/messages"].attributes or {})["http.response.status_code"] == 404


async def test_tracing_off_records_nothing_and_passes_the_clients_context_through(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    config = {"models": [model_config("chat", simulator[0] + "/v1", "openai", word_tokenizer)]}
    async with running_proxy(config, tmp_path, pg_dsn) as proxy:
        assert not proxy.server.proxy.tracing.on
        key = await new_key(pg_dsn, unique("trace"))
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0,
                                    default_headers={"traceparent": TRACEPARENT.replace("4bf9", "5bf9")})
        await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
        await settle(proxy)
    assert simulator[1].trace_contexts.count(TRACEPARENT.replace("4bf9", "5bf9")) == 1  # as the client sent it


def test_an_otlp_endpoint_turns_tracing_on() -> None:
    assert provider_from_env({}) is None
    provider = provider_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "promptcache-proxy"
    finally:
        provider.shutdown()

"""A simulated OpenAI- and Anthropic-compatible model server (Chat Completions, Responses, Messages), for the demo,
tests and benches.

It is not a model: it counts the prompt with a real tokenizer (text parts, canonical JSON for
other blocks, plus a fixed per-message overhead as chat templates add), answers a fixed reply
and reports usage like the real APIs. The URL path picks a behaviour, so one server can play a
healthy upstream and every failure the proxy must survive:

``/v1/...`` healthy · ``/error/v1/...`` HTTP 500 · ``/hang/v1/...`` never answers ·
``/disconnect/v1/...`` drops the connection mid-stream · ``/cached/v1/...`` reports provider
cache fields that the proxy must replace · ``/huge/v1/...`` reports 2³¹ more prompt tokens than it counted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from promptcache.proxy.domain.blocks import Api, extract_blocks
from promptcache.proxy.domain.tokens import BlockCounter, Tokenizer

REPLY = "Simulated reply from the local test upstream."
BEHAVIOURS = ("ok", "error", "hang", "disconnect", "cached", "huge")


@dataclass
class SimulatorSettings:
    tokenizer: Tokenizer
    per_message_tokens: int = 3
    """Template overhead per message, as real chat templates add; it lands in uncached tokens."""
    latency: float = 0.0
    """Seconds from a request's arrival to the first byte of its answer (the bench's fixed-latency
    upstream): the simulator's own parsing and counting happen inside it, as a remote model's would."""
    image_tokens: int = 0
    keep_requests: bool = True
    """Keep every parsed body in ``requests`` (tests read them; a long bench would only grow)."""


async def _until(when: float) -> None:
    delay = when - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


class Simulator:
    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.counter = BlockCounter(settings.tokenizer, settings.image_tokens)
        self.reply_tokens = settings.tokenizer.count(REPLY)
        self.requests: list[dict[str, Any]] = []
        self.trace_contexts: list[str | None] = []
        """Each kept request's ``traceparent`` header (None: it had none), beside :attr:`requests`."""
        self._ids = itertools.count(1)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for prefix in ("", "/{behaviour}"):
            app.router.add_post(prefix + "/v1/chat/completions", self._openai)
            app.router.add_post(prefix + "/v1/messages", self._anthropic)
            app.router.add_post(prefix + "/v1/responses", self._responses)
        return app

    def prompt_tokens(self, body: dict[str, Any], api: Api) -> int:
        blocks = extract_blocks(body, api)
        total = self.counter.cumulative(blocks)
        if api == "openai-responses":
            items = body.get("input")
            messages = (len(items) if isinstance(items, list) else int(items is not None)) + \
                (1 if body.get("instructions") else 0)
        else:
            messages = len(body.get("messages", [])) + (1 if api == "anthropic" and body.get("system") else 0)
        return (total[-1] if total else 0) + self.settings.per_message_tokens * messages

    async def _begin(self, request: web.Request) -> tuple[str, dict[str, Any], float]:
        """The behaviour, the body, and the loop time at which the answer may start."""
        answer_at = asyncio.get_running_loop().time() + self.settings.latency
        behaviour = request.match_info.get("behaviour", "ok")
        if behaviour not in BEHAVIOURS:
            raise web.HTTPNotFound(text=f"unknown behaviour {behaviour}")
        body = await request.json()
        if self.settings.keep_requests:
            self.requests.append(body)
            self.trace_contexts.append(request.headers.get("traceparent"))
        if behaviour in ("hang", "error"):
            await _until(answer_at)
        if behaviour == "hang":
            # Never answers, but gives up once the client has: a handler left sleeping after its client
            # went away would hold the server's graceful shutdown for its full timeout (60 s). Polled:
            # aiohttp (without handler cancellation) gives a handler nothing to await for a lost client.
            while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            raise web.HTTPGatewayTimeout()
        if behaviour == "error":
            raise web.HTTPInternalServerError(
                text=json.dumps({"error": {"type": "server_error", "message": "simulated failure"}}),
                content_type="application/json",
            )
        return behaviour, body, answer_at

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        behaviour, body, answer_at = await self._begin(request)
        prompt = self.prompt_tokens(body, "openai") + (2**31 if behaviour == "huge" else 0)
        await _until(answer_at)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": self.reply_tokens,
            "total_tokens": prompt + self.reply_tokens,
        }
        if behaviour == "cached":
            usage["prompt_tokens_details"] = {"cached_tokens": prompt // 2}
        ident = f"chatcmpl-sim-{next(self._ids)}"
        model = body.get("model", "sim")
        if not body.get("stream"):
            return web.json_response({
                "id": ident, "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY},
                             "finish_reason": "stop"}],
                "usage": usage,
            })
        response = await self._sse(request)
        base = {"id": ident, "object": "chat.completion.chunk", "created": 0, "model": model}
        words = REPLY.split(" ")
        for i, word in enumerate(words):
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": " " + word}
            await _event(response, {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            if behaviour == "disconnect" and i == 1:
                return _drop(request, response)
        await _event(response, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            await _event(response, {**base, "choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        behaviour, body, answer_at = await self._begin(request)
        prompt = self.prompt_tokens(body, "anthropic") + (2**31 if behaviour == "huge" else 0)
        await _until(answer_at)
        usage: dict[str, Any] = {"input_tokens": prompt, "output_tokens": self.reply_tokens}
        if behaviour == "cached":
            usage.update(cache_read_input_tokens=prompt // 2, cache_creation_input_tokens=0)
            usage["input_tokens"] = prompt - prompt // 2
        ident = f"msg_sim_{next(self._ids)}"
        message = {"id": ident, "type": "message", "role": "assistant", "model": body.get("model", "sim")}
        if not body.get("stream"):
            return web.json_response({
                **message, "content": [{"type": "text", "text": REPLY}],
                "stop_reason": "end_turn", "stop_sequence": None, "usage": usage,
            })
        response = await self._sse(request)
        start_usage = {**usage, "output_tokens": 1}
        await _event(response, {"type": "message_start", "message": {
            **message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}},
            "message_start")
        await _event(response, {"type": "content_block_start", "index": 0,
                                "content_block": {"type": "text", "text": ""}}, "content_block_start")
        for i, word in enumerate(REPLY.split(" ")):
            await _event(response, {"type": "content_block_delta", "index": 0,
                                    "delta": {"type": "text_delta", "text": (" " if i else "") + word}},
                         "content_block_delta")
            if behaviour == "disconnect" and i == 1:
                return _drop(request, response)
        await _event(response, {"type": "content_block_stop", "index": 0}, "content_block_stop")
        await _event(response, {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                "usage": {"output_tokens": self.reply_tokens}}, "message_delta")
        await _event(response, {"type": "message_stop"}, "message_stop")
        await response.write_eof()
        return response

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API: a response object, or its event stream as vLLM and OpenAI send it."""
        behaviour, body, answer_at = await self._begin(request)
        prompt = self.prompt_tokens(body, "openai-responses") + (2**31 if behaviour == "huge" else 0)
        await _until(answer_at)
        number = next(self._ids)
        cached = prompt // 2 if behaviour == "cached" else 0
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                 "output_tokens": self.reply_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": prompt + self.reply_tokens}
        part = {"type": "output_text", "text": REPLY, "annotations": []}
        item = {"type": "message", "id": f"msg_sim_{number}", "role": "assistant", "status": "completed",
                "content": [part]}
        response: dict[str, Any] = {
            "id": f"resp_sim_{number}", "object": "response", "created_at": 0, "model": body.get("model", "sim"),
            "status": "completed", "output": [item], "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": [], "previous_response_id": body.get("previous_response_id"), "usage": usage,
        }
        if not body.get("stream"):
            return web.json_response(response)
        stream = await self._sse(request)
        sequence = itertools.count()

        async def send(kind: str, **data: Any) -> None:
            await _event(stream, {"type": kind, "sequence_number": next(sequence), **data}, kind)

        started = {**response, "status": "in_progress", "output": [], "usage": None}
        await send("response.created", response=started)
        await send("response.in_progress", response=started)
        await send("response.output_item.added", output_index=0,
                   item={**item, "status": "in_progress", "content": []})
        where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        await send("response.content_part.added", **where, part={**part, "text": ""})
        for i, word in enumerate(REPLY.split(" ")):
            await send("response.output_text.delta", **where, delta=(" " if i else "") + word, logprobs=[])
            if behaviour == "disconnect" and i == 1:
                return _drop(request, stream)
        await send("response.output_text.done", **where, text=REPLY, logprobs=[])
        await send("response.content_part.done", **where, part=part)
        await send("response.output_item.done", output_index=0, item=item)
        await send("response.completed", response=response)
        await stream.write_eof()
        return stream

    @staticmethod
    async def _sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        return response


async def _event(response: web.StreamResponse, data: dict[str, Any], name: str | None = None) -> None:
    prefix = f"event: {name}\n" if name else ""
    await response.write(f"{prefix}data: {json.dumps(data)}\n\n".encode())


def _drop(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Cut the TCP connection without finishing the chunked body, as a crashed upstream would."""
    if request.transport is not None:
        request.transport.abort()
    return response

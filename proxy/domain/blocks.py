"""Turn a request body into its ordered blocks, their canonical bytes and cumulative prefix hashes.

docs/design.md#blocks-and-prefix-hashes: tools first, then the Anthropic ``system`` field or the Responses API's
``instructions``, then every message's content parts (a string is one text part) followed by OpenAI ``tool_calls``;
a Responses input item that is not a message is one block. A block's canonical bytes are its role, a NUL, and its
JSON without its marker key in Python's sorted compact form, so the hash depends neither on markers nor on which
JSON library parsed the body.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from promptcache.proxy.domain.errors import BadRequest, InvalidCacheControl
from promptcache.proxy.domain.steps import Steps, run

Api = Literal["openai", "anthropic", "openai-responses"]
"""Chat Completions, Messages and the Responses API: the request shapes the proxy reads."""
APIS: tuple[Api, ...] = ("openai", "anthropic", "openai-responses")
ENDPOINTS: dict[Api, str] = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages",
                             "openai-responses": "/v1/responses"}

MARKER = "cache_control"
BREAKPOINT = "prompt_cache_breakpoint"
"""OpenAI's own marker on a content part (docs/design.md#openais-caching-parameters)."""
MARKER_KEYS: dict[Api, tuple[str, ...]] = {"openai": (MARKER, BREAKPOINT), "anthropic": (MARKER,),
                                           "openai-responses": (MARKER, BREAKPOINT)}
"""The keys that mark a block in each API; the block is hashed without them."""
IMAGE_TYPES = frozenset({"image", "image_url", "input_image"})
TEXT_TYPES = frozenset({"text", "input_text", "output_text"})
RESPONSES_TEXT = frozenset({"input_text", "output_text"})
_RESPONSES_TEXT_KEYS = frozenset({"type", "text", "annotations", MARKER, BREAKPOINT})
ITEM_ROLES = {"function_call": "tool_call", "function_call_output": "tool"}
"""The role of a Responses input item that is not a message, as its Chat Completions counterpart has; any other
item's role is its type."""


class _Missing:
    def __repr__(self) -> str:
        return "<no marker>"


NO_MARKER: Any = _Missing()


@dataclass(slots=True)
class Block:
    position: int
    role: str
    content: dict[str, Any]
    marker: Any
    message: int | None
    """The index of its message (or Responses input item) in ``items``; None for a request-level field."""
    field: str
    """Where the block sits: ``tools``, ``system``, ``instructions``, ``input``, ``content``, ``tool_calls``, or
    ``""`` for a whole input item."""
    part: int | None
    """Its index in that array, or None for a string ``system``, ``instructions``, content or a whole item."""
    items: str = "messages"
    """The body's array of messages: ``messages``, or ``input`` in the Responses API."""
    marker_key: str = MARKER
    """Which key carried ``marker``: ``cache_control`` or OpenAI's ``prompt_cache_breakpoint``."""
    ignored: bool = False
    canonical: bytes = b""
    """The canonical bytes (UTF-8), set by :func:`hash_blocks` with ``hash``."""
    hash: bytes = b""

    @property
    def path(self) -> str:
        """The block's place in the body for error messages, e.g. ``messages[3].content[0]``.
        Built on demand: most requests never need one."""
        return _path(self.message, self.field, self.part, self.items)

    @property
    def text(self) -> str | None:
        """The text a tokenizer counts for a text part; None for every other kind of block."""
        kind = self.content.get("type")
        if isinstance(kind, str) and kind in TEXT_TYPES:
            text = self.content.get("text")
            if isinstance(text, str):
                return text
        return None

    @property
    def is_image(self) -> bool:
        kind = self.content.get("type")
        return isinstance(kind, str) and kind in IMAGE_TYPES  # a list or object "type" is unhashable


def canonical_json(content: Mapping[str, Any]) -> bytes:
    """Python's ``json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``,
    UTF-8 encoded.

    orjson writes exactly those bytes (strings, key order, integers and literals are checked
    against ``json`` in the tests) about a hundred times faster, except floats, which it formats
    its own way, and integers beyond 64 bits, which it refuses: those take ``json`` itself.
    """
    text = content.get("text")
    if len(content) == 2 and type(text) is str and content.get("type") == "text":  # most blocks: no walk, no sort
        try:
            return b'{"text":' + orjson.dumps(text) + b',"type":"text"}'
        except TypeError:
            pass
    elif not _has_float(content):
        try:
            return orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
        except TypeError:
            pass
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _has_float(value: Any) -> bool:
    """Walks the containers, not the characters: cheap for prompt content, a few nodes per block."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def extract_blocks(body: Any, api: Api, ignore_prefixes: Sequence[str] = ()) -> list[Block]:
    """All blocks in the order the model sees them (docs/design.md#block-order), hashed; blocks matching
    ``ignore_prefixes`` are marked ignored."""
    blocks = parse_blocks(body, api, ignore_prefixes)
    hash_blocks(blocks)
    return blocks


_Site = tuple[str, Any, int | None, str, int | None, str]
"""A block's role, its part as sent (a string content is one text part), message, field, index and items."""


def parse_blocks(body: Any, api: Api, ignore_prefixes: Sequence[str] = ()) -> list[Block]:
    """All blocks in the order the model sees them (docs/design.md#block-order), not yet hashed (hashing is the
    expensive part: the proxy does it
    while the upstream works)."""
    ignore, keys = tuple(ignore_prefixes), MARKER_KEYS[api]
    return [_block(position, *site, ignore, keys, api) for position, site in enumerate(_walk(body, api))]


def scan_markers(body: Any, api: Api, ignore_prefixes: Sequence[str] = ()) -> tuple[list[Block], int, Block | None]:
    """What marker validation needs, without building every block: the blocks that carry a
    ``cache_control`` key, how many blocks there are, and the last block of the chain.

    The proxy runs this before forwarding; it walks the body exactly as :func:`parse_blocks` does,
    so it rejects the same malformed bodies and numbers the blocks alike.
    """
    ignore, keys = tuple(ignore_prefixes), MARKER_KEYS[api]
    marked: list[Block] = []
    last: _Site | None = None
    last_position = count = 0
    for count, site in enumerate(_walk(body, api), 1):
        part = site[1]
        if isinstance(part, dict) and any(key in part for key in keys):
            marked.append(_block(count - 1, *site, ignore, keys, api))
        if site[0] != "system" or not _ignored("system", _content(part, api), ignore):
            last, last_position = site, count - 1
    return marked, count, None if last is None else _block(last_position, *last, ignore, keys, api)


def _walk(body: Any, api: Api) -> Iterator[_Site]:
    """Every block in the order the model sees them (docs/design.md#block-order); raises for every malformed
    structure, so before anything is forwarded."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    for i, tool in enumerate(_list(body, "tools")):
        yield _object("tool_definition", tool, None, "tools", i)
    if api == "openai-responses":
        yield from _responses(body)
        return
    if api == "anthropic" and body.get("system") is not None:
        yield from _parts("system", body["system"], None, "system")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("messages must be an array")
    for m, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{m}] must be an object")
        yield from _message(message, m, "messages", api)
        if api == "openai" and "tool_calls" in message:
            for c, call in enumerate(_list(message, "tool_calls", m)):
                yield _object("tool_call", call, m, "tool_calls", c)


def _message(message: dict[str, Any], m: int, items: str, api: Api) -> Iterator[_Site]:
    role = message.get("role")
    if not isinstance(role, str) or not role or "\x00" in role:
        # NUL is the role/content separator of the canonical bytes, and Postgres text refuses it.
        raise BadRequest(f"{items}[{m}].role must be a non-empty string without NUL characters")
    for key in MARKER_KEYS[api]:
        if message.get(key) is not None:
            raise InvalidCacheControl(
                None, f"{items}[{m}]", "placement", f"{key} on a whole message is not read; put it on a content part",
            )
    content = message.get("content")
    if isinstance(content, str):
        yield role, content, m, "content", None, items
    elif content is not None or api != "openai":
        yield from _parts(role, content, m, "content", items)


def _responses(body: dict[str, Any]) -> Iterator[_Site]:
    """The Responses API after its tools: ``instructions`` (a system prompt), then ``input``, a string (one user
    text part) or items: a message's content parts, and any other item (function call, its output, reasoning...)
    as one block."""
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest("instructions must be a string")
        yield "system", instructions, None, "instructions", None, "input"
    items = body.get("input")
    if items is None:
        return
    if isinstance(items, str):
        yield "user", items, None, "input", None, "input"
        return
    if not isinstance(items, list):
        raise BadRequest("input must be a string or an array of input items")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest(f"input[{i}] must be an object")
        kind = item.get("type")
        if kind == "message" or (kind is None and "role" in item):
            yield from _message(item, i, "input", "openai-responses")
        elif not isinstance(kind, str) or not kind or "\x00" in kind:
            raise BadRequest(f"input[{i}].type must be a non-empty string without NUL characters")
        else:
            yield ITEM_ROLES.get(kind, kind), item, i, "", None, "input"


def _parts(role: str, content: Any, message: int | None, field: str, items: str = "messages") -> Iterator[_Site]:
    """A string is one text part; an array is its parts."""
    if isinstance(content, str):
        yield role, content, message, field, None, items
    elif isinstance(content, list):
        for i, part in enumerate(content):
            yield _object(role, part, message, field, i, items)
    else:
        raise BadRequest(f"{_path(message, field, None, items)} must be a string or an array of content parts")


def _object(role: str, part: Any, message: int | None, field: str, index: int, items: str = "messages") -> _Site:
    if not isinstance(part, dict):
        raise BadRequest(f"{_path(message, field, index, items)} must be an object")
    return role, part, message, field, index, items


def _content(part: dict[str, Any] | str, api: Api) -> dict[str, Any]:
    """What a block is hashed as: a string is a text part; in the Responses API, so is an ``input_text`` or
    ``output_text`` part that carries only its text (docs/design.md#one-model-on-several-apis): the same text is
    one block whichever API or form sent it."""
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if api == "openai-responses" and part.get("type") in RESPONSES_TEXT and \
            set(part).issubset(_RESPONSES_TEXT_KEYS) and isinstance(part.get("text"), str) and \
            part.get("annotations", []) == []:
        return {"type": "text", "text": part["text"], **{k: part[k] for k in MARKER_KEYS[api] if k in part}}
    return part


def _block(position: int, role: str, part: dict[str, Any] | str, message: int | None, field: str,
           index: int | None, items: str, ignore: tuple[str, ...], keys: tuple[str, ...], api: Api) -> Block:
    content = _content(part, api)
    present = [key for key in keys if key in content]
    marker, marker_key = NO_MARKER, MARKER
    if present:
        if len(present) > 1:
            raise InvalidCacheControl(position, _path(message, field, index, items), "placement",
                                      f"a block carries one marker; this one has {' and '.join(present)}")
        marker_key = present[0]
        marker = content[marker_key]
        content = {k: v for k, v in content.items() if k != marker_key}
    return Block(position, role, content, marker, message, field, index, items, marker_key,
                 _ignored(role, content, ignore))


def _ignored(role: str, content: dict[str, Any], ignore: tuple[str, ...]) -> bool:
    """docs/design.md#blocks-and-prefix-hashes ignorePrefixes: a system text part starting with one of them is left
    out of the chain."""
    if not ignore or role != "system" or content.get("type") != "text":
        return False
    text = content.get("text")
    return isinstance(text, str) and text.startswith(ignore)


def _path(message: int | None, field: str, index: int | None = None, items: str = "messages") -> str:
    where = field if message is None else f"{items}[{message}].{field}".rstrip(".")
    return where if index is None else f"{where}[{index}]"


def _list(obj: dict[str, Any], key: str, message: int | None = None) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"{_path(message, key)} must be an array")
    return value


def hash_blocks(blocks: Sequence[Block]) -> None:
    """Canonical bytes and the cumulative prefix hash of every block that is not ignored."""
    run(hashing(blocks))


STEP_BYTES = 256 * 1024
"""Canonical bytes hashed between two pauses of :func:`hashing` (about half a millisecond)."""


def hashing(blocks: Sequence[Block]) -> Steps[None]:
    """:func:`hash_blocks` in steps of about :data:`STEP_BYTES`."""
    running = hashlib.sha256()
    since_pause = 0
    for block in blocks:
        if block.ignored:
            continue
        try:
            block.canonical = canonical_json(block.content)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"{block.path} cannot be serialised: {exc}") from None
        running.update(block.role.encode())
        running.update(b"\x00")
        running.update(block.canonical)
        block.hash = running.copy().digest()
        since_pause += len(block.canonical)
        if since_pause >= STEP_BYTES:
            since_pause = 0
            yield


def strip_markers(body: dict[str, Any], marked: Sequence[Block], request_keys: Sequence[str] = (MARKER,)
                  ) -> dict[str, Any]:
    """The body as forwarded: without its request-level markers (``request_keys``) and the markers of ``marked``
    (the blocks :func:`scan_markers` found carrying one, so the walk that finds markers is the one that validates
    them).

    Tool schemas are never touched, and the caller's body is not mutated: what holds a marker is
    copied, everything else is shared; a body without markers is returned as it is.
    """
    if not marked and not any(key in body for key in request_keys):
        return body
    out = {k: v for k, v in body.items() if k not in request_keys}
    arrays: dict[tuple[int | None, str], list[Any]] = {}
    for block in marked:
        if block.message is not None and not block.field:  # a whole Responses input item
            items = _own_items(out, body, block.items)
            items[block.message] = _unmarked(items[block.message], block.marker_key)
            continue
        assert block.part is not None  # a string content carries no marker
        parts = arrays.get((block.message, block.field))
        if parts is None:
            holder = out if block.message is None else _own_message(out, body, block.message, block.items)
            parts = arrays[block.message, block.field] = holder[block.field] = list(holder[block.field])
        parts[block.part] = _unmarked(parts[block.part], block.marker_key)
    return out


def _unmarked(part: dict[str, Any], key: str) -> dict[str, Any]:
    """The part as sent without its marker (not the block's content: that is the part as hashed)."""
    return {k: v for k, v in part.items() if k != key}


def _own_items(out: dict[str, Any], body: dict[str, Any], items: str) -> list[Any]:
    """``out``'s messages (or input items) array, copied from ``body`` on first use."""
    if out[items] is body[items]:
        out[items] = list(body[items])
    copied: list[Any] = out[items]
    return copied


def _own_message(out: dict[str, Any], body: dict[str, Any], message: int, items: str) -> dict[str, Any]:
    """Message ``message`` of ``out``, copied from ``body`` (with its array) on first use."""
    messages = _own_items(out, body, items)
    if messages[message] is body[items][message]:
        messages[message] = dict(messages[message])
    own: dict[str, Any] = messages[message]
    return own

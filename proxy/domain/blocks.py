"""Turn a request body into its ordered blocks, their canonical bytes and cumulative prefix hashes.

docs/design.md#blocks-and-prefix-hashes: tools first, then the Anthropic ``system`` field, then every message's
content parts
(a string is one text part) followed by OpenAI ``tool_calls``. A block's canonical bytes are its
role, a NUL, and its JSON without the top-level ``cache_control`` key in Python's sorted compact
form, so the hash depends neither on markers nor on which JSON library parsed the body.
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

Api = Literal["openai", "anthropic"]
APIS: tuple[Api, ...] = ("openai", "anthropic")

MARKER = "cache_control"
IMAGE_TYPES = frozenset({"image", "image_url", "input_image"})


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
    field: str
    """Where the block sits: ``tools``, ``system``, ``content`` or ``tool_calls``."""
    part: int | None
    """Its index in that array, or None for a string ``system`` or message content."""
    ignored: bool = False
    canonical: bytes = b""
    """The canonical bytes (UTF-8), set by :func:`hash_blocks` with ``hash``."""
    hash: bytes = b""

    @property
    def path(self) -> str:
        """The block's place in the body for error messages, e.g. ``messages[3].content[0]``.
        Built on demand: most requests never need one."""
        return _path(self.message, self.field, self.part)

    @property
    def text(self) -> str | None:
        """The text a tokenizer counts for a text part; None for every other kind of block."""
        if self.content.get("type") == "text":
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


_Site = tuple[str, Any, int | None, str, int | None]
"""A block's role, its part as sent (a string content is one text part), message, field and index."""


def parse_blocks(body: Any, api: Api, ignore_prefixes: Sequence[str] = ()) -> list[Block]:
    """All blocks in the order the model sees them (docs/design.md#block-order), not yet hashed (hashing is the
    expensive part: the proxy does it
    while the upstream works)."""
    ignore = tuple(ignore_prefixes)
    return [_block(position, *site, ignore) for position, site in enumerate(_walk(body, api))]


def scan_markers(body: Any, api: Api, ignore_prefixes: Sequence[str] = ()) -> tuple[list[Block], int, Block | None]:
    """What marker validation needs, without building every block: the blocks that carry a
    ``cache_control`` key, how many blocks there are, and the last block of the chain.

    The proxy runs this before forwarding; it walks the body exactly as :func:`parse_blocks` does,
    so it rejects the same malformed bodies and numbers the blocks alike.
    """
    ignore = tuple(ignore_prefixes)
    marked: list[Block] = []
    last: _Site | None = None
    last_position = count = 0
    for count, site in enumerate(_walk(body, api), 1):
        part = site[1]
        if isinstance(part, dict) and MARKER in part:
            marked.append(_block(count - 1, *site, ignore))
        if site[0] != "system" or not _ignored("system", _content(part), ignore):
            last, last_position = site, count - 1
    return marked, count, None if last is None else _block(last_position, *last, ignore)


def _walk(body: Any, api: Api) -> Iterator[_Site]:
    """Every block in the order the model sees them (docs/design.md#block-order); raises for every malformed
    structure, so before anything is forwarded."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    for i, tool in enumerate(_list(body, "tools")):
        yield _object("tool_definition", tool, None, "tools", i)
    if api == "anthropic" and body.get("system") is not None:
        yield from _parts("system", body["system"], None, "system")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("messages must be an array")
    for m, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{m}] must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role or "\x00" in role:
            # NUL is the role/content separator of the canonical bytes, and Postgres text refuses it.
            raise BadRequest(f"messages[{m}].role must be a non-empty string without NUL characters")
        if message.get(MARKER) is not None:
            raise InvalidCacheControl(
                None, f"messages[{m}]", "placement",
                "cache_control on a whole message is not read; put it on a content part",
            )
        content = message.get("content")
        if isinstance(content, str):
            yield role, content, m, "content", None
        elif content is not None or api == "anthropic":
            yield from _parts(role, content, m, "content")
        if api == "openai" and "tool_calls" in message:
            for c, call in enumerate(_list(message, "tool_calls", m)):
                yield _object("tool_call", call, m, "tool_calls", c)


def _parts(role: str, content: Any, message: int | None, field: str) -> Iterator[_Site]:
    """A string is one text part; an array is its parts."""
    if isinstance(content, str):
        yield role, content, message, field, None
    elif isinstance(content, list):
        for i, part in enumerate(content):
            yield _object(role, part, message, field, i)
    else:
        raise BadRequest(f"{_path(message, field)} must be a string or an array of content parts")


def _object(role: str, part: Any, message: int | None, field: str, index: int) -> _Site:
    if not isinstance(part, dict):
        raise BadRequest(f"{_path(message, field, index)} must be an object")
    return role, part, message, field, index


def _content(part: dict[str, Any] | str) -> dict[str, Any]:
    return {"type": "text", "text": part} if isinstance(part, str) else part


def _block(position: int, role: str, part: dict[str, Any] | str, message: int | None, field: str,
           index: int | None, ignore: tuple[str, ...]) -> Block:
    content = _content(part)
    marker = content.get(MARKER, NO_MARKER)
    if marker is not NO_MARKER:
        content = {k: v for k, v in content.items() if k != MARKER}
    return Block(position, role, content, marker, message, field, index, _ignored(role, content, ignore))


def _ignored(role: str, content: dict[str, Any], ignore: tuple[str, ...]) -> bool:
    """docs/design.md#blocks-and-prefix-hashes ignorePrefixes: a system text part starting with one of them is left
    out of the chain."""
    if not ignore or role != "system" or content.get("type") != "text":
        return False
    text = content.get("text")
    return isinstance(text, str) and text.startswith(ignore)


def _path(message: int | None, field: str, index: int | None = None) -> str:
    where = field if message is None else f"messages[{message}].{field}"
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


def strip_markers(body: dict[str, Any], marked: Sequence[Block]) -> dict[str, Any]:
    """The body as forwarded: without its top-level marker and the markers of ``marked`` (the
    blocks :func:`scan_markers` found carrying one, so the walk that finds markers is the one that
    validates them).

    Tool schemas are never touched, and the caller's body is not mutated: what holds a marker is
    copied, everything else is shared; a body without markers is returned as it is.
    """
    if not marked and MARKER not in body:
        return body
    out = {k: v for k, v in body.items() if k != MARKER}
    arrays: dict[tuple[int | None, str], list[Any]] = {}
    for block in marked:
        assert block.part is not None  # a string content carries no marker
        parts = arrays.get((block.message, block.field))
        if parts is None:
            holder = out if block.message is None else _own_message(out, body, block.message)
            parts = arrays[block.message, block.field] = holder[block.field] = list(holder[block.field])
        parts[block.part] = block.content
    return out


def _own_message(out: dict[str, Any], body: dict[str, Any], message: int) -> dict[str, Any]:
    """Message ``message`` of ``out``, copied from ``body`` (with the messages array) on first use."""
    if out["messages"] is body["messages"]:
        out["messages"] = list(body["messages"])
    messages: list[dict[str, Any]] = out["messages"]
    if messages[message] is body["messages"][message]:
        messages[message] = dict(messages[message])
    return messages[message]

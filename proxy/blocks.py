"""Turn a request body into its ordered blocks, their canonical bytes and cumulative prefix hashes.

SPEC §2: tools first, then the Anthropic ``system`` field, then every message's content parts
(a string is one text part) followed by OpenAI ``tool_calls``. A block's canonical bytes are its
role, a NUL, and its JSON without the top-level ``cache_control`` key in Python's sorted compact
form, so the hash depends neither on markers nor on which JSON library parsed the body.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from promptcache.proxy.errors import BadRequest, InvalidCacheControl

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
    canonical: str = ""
    """Set by :func:`hash_blocks`, with ``hash``."""
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


def canonical_json(content: Mapping[str, Any]) -> str:
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def extract_blocks(body: Any, api: Api, ignore_prefixes: Sequence[str] = ()) -> list[Block]:
    """All blocks in SPEC order, hashed; blocks matching ``ignore_prefixes`` are marked ignored."""
    blocks = parse_blocks(body, api, ignore_prefixes)
    hash_blocks(blocks)
    return blocks


def parse_blocks(body: Any, api: Api, ignore_prefixes: Sequence[str] = ()) -> list[Block]:
    """All blocks in SPEC order, not yet hashed: enough to validate markers and forward the body.

    Hashing is the expensive part, so the proxy defers it to the classification that runs while
    the upstream works.
    """
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    blocks: list[Block] = []
    for i, tool in enumerate(_list(body, "tools")):
        _add(blocks, "tool_definition", tool, None, "tools", i)
    if api == "anthropic" and body.get("system") is not None:
        _add_parts(blocks, "system", body["system"], None, "system")
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
        if content is not None or api == "anthropic":
            _add_parts(blocks, role, content, m, "content")
        if api == "openai":
            for c, call in enumerate(_list(message, "tool_calls", f"messages[{m}].")):
                _add(blocks, "tool_call", call, m, "tool_calls", c)
    if ignore_prefixes:
        ignore = tuple(ignore_prefixes)
        for block in blocks:
            if block.role == "system":
                text = block.text
                block.ignored = text is not None and text.startswith(ignore)
    return blocks


def _path(message: int | None, field: str, index: int | None = None) -> str:
    where = field if message is None else f"messages[{message}].{field}"
    return where if index is None else f"{where}[{index}]"


def _add(blocks: list[Block], role: str, part: Any, message: int | None, field: str, index: int | None) -> None:
    if not isinstance(part, dict):
        raise BadRequest(f"{_path(message, field, index)} must be an object")
    marker = part.get(MARKER, NO_MARKER)
    content = {k: v for k, v in part.items() if k != MARKER} if marker is not NO_MARKER else part
    blocks.append(Block(len(blocks), role, content, marker, message, field, index))


def _add_parts(blocks: list[Block], role: str, content: Any, message: int | None, field: str) -> None:
    """A string is one text part; an array is its parts."""
    if isinstance(content, str):
        _add(blocks, role, {"type": "text", "text": content}, message, field, None)
    elif isinstance(content, list):
        for i, part in enumerate(content):
            _add(blocks, role, part, message, field, i)
    else:
        raise BadRequest(f"{_path(message, field)} must be a string or an array of content parts")


def _list(obj: dict[str, Any], key: str, prefix: str = "") -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"{prefix}{key} must be an array")
    return value


def hash_blocks(blocks: Sequence[Block]) -> None:
    """Canonical JSON and the cumulative prefix hash of every block that is not ignored."""
    running = hashlib.sha256()
    for block in blocks:
        if block.ignored:
            continue
        try:
            block.canonical = canonical_json(block.content)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"{block.path} cannot be serialised: {exc}") from None
        running.update(block.role.encode())
        running.update(b"\x00")
        running.update(block.canonical.encode())
        block.hash = running.copy().digest()


def strip_markers(body: dict[str, Any], api: Api) -> dict[str, Any]:
    """The body as forwarded: markers removed at top level, tools, system, parts and tool calls.

    Tool schemas are never touched, and the caller's body is not mutated: what holds a marker is
    copied, everything else is shared.
    """
    out = {k: v for k, v in body.items() if k != MARKER}
    if isinstance(out.get("tools"), list):
        out["tools"] = _unmark_all(out["tools"])
    if api == "anthropic" and isinstance(out.get("system"), list):
        out["system"] = _unmark_all(out["system"])
    if isinstance(out.get("messages"), list):
        out["messages"] = [_unmark_message(m) for m in out["messages"]]
    return out


def _unmark_all(parts: list[Any]) -> list[Any]:
    """``parts`` without markers: the same list when none has one."""
    if not any(isinstance(p, dict) and MARKER in p for p in parts):
        return parts
    return [{k: v for k, v in p.items() if k != MARKER} if isinstance(p, dict) and MARKER in p else p
            for p in parts]


def _unmark_message(message: Any) -> Any:
    if not isinstance(message, dict):
        return message
    content, calls = message.get("content"), message.get("tool_calls")
    new_content = _unmark_all(content) if isinstance(content, list) else content
    new_calls = _unmark_all(calls) if isinstance(calls, list) else calls
    if new_content is content and new_calls is calls:
        return message
    out = dict(message)
    if new_content is not content:
        out["content"] = new_content
    if new_calls is not calls:
        out["tool_calls"] = new_calls
    return out

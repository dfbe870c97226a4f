"""Fast JSON on the request path (orjson), with the standard library for what orjson refuses or changes.

orjson rejects a few inputs ``json`` accepts (NaN, numbers past a double, lone surrogates); falling back keeps
the accepted language the standard library's. One difference stays, deliberately: orjson reads an integer past
64 bits as a float (``2**64`` is forwarded as ``1.8446744073709552e+19``). No field of either API takes such an
integer, the same bytes always take the same path (so prefix hashes stay deterministic), and finding them first
would cost more than the parse itself.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


class UnpairedSurrogate(ValueError):
    """An escaped lone surrogate: ``json`` parses it, but it is no Unicode and cannot be hashed or sent."""


def loads_text(raw: bytes) -> Any:
    """:func:`loads` for a request body: UTF-8 (RFC 8259 §8.1; ``json`` alone would also take UTF-16 and UTF-32, and
    decode a raw surrogate's bytes), real Unicode throughout (raises :class:`UnpairedSurrogate`).

    orjson refuses all of these itself, so only a document it could not parse is checked, and the common case
    pays nothing.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = json.loads(raw.decode("utf-8"))  # strict: raises UnicodeDecodeError
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise UnpairedSurrogate("contains an unpaired UTF-16 surrogate escape") from None
    return value


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False).encode()
